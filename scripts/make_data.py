"""Write the labelled prompt sets under data/ (fixed seed: the same files every time).

    python scripts/make_data.py            # writes data/arithmetic.jsonl and data/facts.jsonl
    python scripts/make_data.py --check    # exit 1 if the files differ from what this script writes

- data/arithmetic.jsonl: 200 questions, 50 each of one-digit sums, two-digit sums,
  two-digit differences (never negative) and times tables up to 12 x 12, drawn with SEED.
- data/facts.jsonl: short factual questions whose answers are written below (capitals,
  chemical symbols, authors, counts and dates, general knowledge).

Every line has "answer" and "grader". Small chat models echo the question before answering
("17 + 8 = 25"), so the arithmetic lines use a regex grader that accepts the result at the
start, after "=" or after "is" rather than `number` (the first number, here an operand).
Names are graded with word-bounded, case-insensitive regexes (so "Tunis" is not found inside
"Tunisia" in an echoed question), accented names with their plain spellings too; counts and
years with the `number` grader; chemical symbols case-sensitively.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

SEED = 15
ROOT = Path(__file__).resolve().parent.parent / "data"

CAPITALS = """Afghanistan: Kabul; Albania: Tirana; Algeria: Algiers; Andorra: Andorra la Vella; Angola: Luanda;
Argentina: Buenos Aires; Armenia: Yerevan; Australia: Canberra; Austria: Vienna; Azerbaijan: Baku; Bahamas: Nassau;
Bahrain: Manama; Bangladesh: Dhaka; Barbados: Bridgetown; Belarus: Minsk; Belgium: Brussels; Belize: Belmopan;
Bhutan: Thimphu; Bosnia and Herzegovina: Sarajevo; Botswana: Gaborone; Brazil: Brasília|Brasilia; Bulgaria: Sofia;
Burkina Faso: Ouagadougou; Cambodia: Phnom Penh; Cameroon: Yaoundé|Yaounde; Canada: Ottawa; Chile: Santiago;
China: Beijing; Colombia: Bogotá|Bogota; Costa Rica: San José|San Jose; Croatia: Zagreb; Cuba: Havana; Cyprus: Nicosia;
the Czech Republic: Prague; Denmark: Copenhagen; the Dominican Republic: Santo Domingo; Ecuador: Quito; Egypt: Cairo;
El Salvador: San Salvador; Eritrea: Asmara; Estonia: Tallinn; Ethiopia: Addis Ababa; Fiji: Suva; Finland: Helsinki;
France: Paris; Gabon: Libreville; Georgia (the country): Tbilisi; Germany: Berlin; Ghana: Accra; Greece: Athens;
Guatemala: Guatemala City; Guinea: Conakry; Guyana: Georgetown; Haiti: Port-au-Prince; Honduras: Tegucigalpa;
Hungary: Budapest; Iceland: Reykjavík|Reykjavik; India: New Delhi; Iran: Tehran; Iraq: Baghdad; Ireland: Dublin;
Italy: Rome; Jamaica: Kingston; Japan: Tokyo; Jordan: Amman; Kazakhstan: Astana; Kenya: Nairobi; Kuwait: Kuwait City;
Kyrgyzstan: Bishkek; Laos: Vientiane; Latvia: Riga; Lebanon: Beirut; Liberia: Monrovia; Libya: Tripoli;
Lithuania: Vilnius; Madagascar: Antananarivo; Malawi: Lilongwe; Malaysia: Kuala Lumpur; Mali: Bamako; Malta: Valletta;
Mauritania: Nouakchott; Mexico: Mexico City; Moldova: Chișinău|Chisinau; Mongolia: Ulaanbaatar|Ulan Bator;
Montenegro: Podgorica; Morocco: Rabat; Mozambique: Maputo; Namibia: Windhoek; Nepal: Kathmandu; the Netherlands: Amsterdam;
New Zealand: Wellington; Nicaragua: Managua; Niger: Niamey; Nigeria: Abuja; North Korea: Pyongyang;
North Macedonia: Skopje; Norway: Oslo; Oman: Muscat; Pakistan: Islamabad; Panama: Panama City;
Papua New Guinea: Port Moresby; Paraguay: Asunción|Asuncion; Peru: Lima; the Philippines: Manila; Poland: Warsaw;
Portugal: Lisbon; Qatar: Doha; Romania: Bucharest; Russia: Moscow; Rwanda: Kigali; Saudi Arabia: Riyadh; Senegal: Dakar;
Serbia: Belgrade; Sierra Leone: Freetown; Slovakia: Bratislava; Slovenia: Ljubljana; Somalia: Mogadishu;
South Korea: Seoul; South Sudan: Juba; Spain: Madrid; Sudan: Khartoum; Suriname: Paramaribo; Sweden: Stockholm;
Switzerland: Bern|Berne; Syria: Damascus; Tajikistan: Dushanbe; Tanzania: Dodoma; Thailand: Bangkok; Togo: Lomé|Lome;
Tunisia: Tunis; Turkey: Ankara; Turkmenistan: Ashgabat; Uganda: Kampala; Ukraine: Kyiv|Kiev;
the United Arab Emirates: Abu Dhabi; the United Kingdom: London; the United States: Washington; Uruguay: Montevideo;
Uzbekistan: Tashkent; Venezuela: Caracas; Vietnam: Hanoi; Zambia: Lusaka; Zimbabwe: Harare"""

# Symbols that are also common words ("He", "Be", "As", "In", "I", "No") are left out.
ELEMENTS = """hydrogen: H; lithium: Li; boron: B; carbon: C; nitrogen: N; oxygen: O; fluorine: F; neon: Ne; sodium: Na;
magnesium: Mg; aluminium: Al; silicon: Si; phosphorus: P; sulfur: S; chlorine: Cl; argon: Ar; potassium: K; calcium: Ca;
titanium: Ti; chromium: Cr; manganese: Mn; iron: Fe; cobalt: Co; nickel: Ni; copper: Cu; zinc: Zn; bromine: Br;
krypton: Kr; strontium: Sr; silver: Ag; tin: Sn; xenon: Xe; caesium: Cs; barium: Ba; tungsten: W; platinum: Pt; gold: Au;
mercury: Hg; lead: Pb; radon: Rn; radium: Ra; uranium: U; plutonium: Pu"""

AUTHORS = """Romeo and Juliet: Shakespeare; Hamlet: Shakespeare; Macbeth: Shakespeare; Othello: Shakespeare;
Pride and Prejudice: Austen; Emma: Austen; Nineteen Eighty-Four: Orwell; Animal Farm: Orwell; War and Peace: Tolstoy;
Anna Karenina: Tolstoy; Don Quixote: Cervantes; Moby-Dick: Melville; Great Expectations: Dickens; Oliver Twist: Dickens;
A Tale of Two Cities: Dickens; Crime and Punishment: Dostoevsky|Dostoyevsky; The Divine Comedy: Dante;
Frankenstein: Mary Shelley|Shelley; Dracula: Stoker; The Adventures of Tom Sawyer: Twain;
Adventures of Huckleberry Finn: Twain; Les Misérables: Hugo; The Old Man and the Sea: Hemingway;
The Great Gatsby: Fitzgerald; Jane Eyre: Brontë|Bronte; Wuthering Heights: Brontë|Bronte; The Raven: Poe;
Brave New World: Huxley; The Hobbit: Tolkien; The Lord of the Rings: Tolkien;
Harry Potter and the Philosopher's Stone: Rowling; Alice's Adventures in Wonderland: Carroll;
On the Origin of Species: Darwin; Faust: Goethe; Madame Bovary: Flaubert; Ulysses (the 1922 novel): Joyce;
The Catcher in the Rye: Salinger; To Kill a Mockingbird: Harper Lee; Robinson Crusoe: Defoe; Gulliver's Travels: Swift;
Treasure Island: Stevenson; The Jungle Book: Kipling; The Time Machine: Wells;
Twenty Thousand Leagues Under the Seas: Verne; One Hundred Years of Solitude: García Márquez|Garcia Marquez|Márquez|Marquez;
The Little Prince: Saint-Exupéry|Saint-Exupery|Exupéry|Exupery; A Brief History of Time: Hawking;
The Canterbury Tales: Chaucer; Paradise Lost: Milton; The Metamorphosis: Kafka; Of Mice and Men: Steinbeck;
The Grapes of Wrath: Steinbeck; Lolita: Nabokov"""

NUMBERS = """How many legs does a spider have?: 8; How many days are there in a week?: 7;
How many continents are there on Earth?: 7; How many sides does a hexagon have?: 6; How many sides does a triangle have?: 3;
How many sides does a pentagon have?: 5; How many sides does an octagon have?: 8; How many minutes are in an hour?: 60;
How many seconds are in a minute?: 60; How many hours are in a day?: 24; How many months are in a year?: 12;
How many days are in a leap year?: 366; How many days are in a common (non-leap) year?: 365;
How many legs does an insect have?: 6; How many players does a soccer team have on the field?: 11;
How many planets are in the Solar System?: 8; At how many degrees Celsius does water boil at sea level?: 100;
At how many degrees Celsius does water freeze?: 0; How many strings does a standard guitar have?: 6;
How many keys does a standard piano have?: 88; How many bones are in the adult human body?: 206;
How many cents are in a US dollar?: 100; How many letters are in the English alphabet?: 26;
How many weeks are in a year?: 52; How many degrees are in a right angle?: 90; How many degrees are in a full circle?: 360;
How many degrees do the angles of a triangle add up to?: 180; How many hearts does an octopus have?: 3;
How many zeros are in one million?: 6; How many centimetres are in a metre?: 100; How many grams are in a kilogram?: 1000;
How many metres are in a kilometre?: 1000; How many years are in a century?: 100; How many years are in a decade?: 10;
How many chromosomes does a human cell normally have?: 46; In what year did World War II end?: 1945;
In what year did humans first walk on the Moon?: 1969; In what year did World War I begin?: 1914;
In what year did Columbus first reach the Americas?: 1492; In what year did the Berlin Wall fall?: 1989;
How many squares are on a chessboard?: 64; How many players does a basketball team have on the court?: 5;
How many sides does a square have?: 4; At how many degrees Fahrenheit does water freeze?: 32;
What is the smallest prime number?: 2; What is the square root of 81?: 9; How many wheels does a bicycle have?: 2;
How many years are in a millennium?: 1000; How many eyes does a human have?: 2; How many lungs does a human have?: 2"""

GENERAL = """What is the largest planet in the Solar System?: Jupiter; Which planet is known as the Red Planet?: Mars;
What is the largest ocean on Earth?: Pacific; What is the longest river in Africa?: Nile;
What is the tallest mountain in the world?: Everest; What is the hardest natural substance?: diamond;
Which animal is known as the king of the jungle?: lion; What is the largest mammal?: blue whale|whale;
What is the fastest land animal?: cheetah; What colour do you get by mixing blue and yellow?: green;
What colour do you get by mixing red and white?: pink; Who painted the Mona Lisa?: Leonardo|da Vinci;
Who painted The Starry Night?: van Gogh; Who developed the theory of relativity?: Einstein;
Who discovered penicillin?: Fleming; Who was the first President of the United States?: Washington;
Who formulated the laws of motion and universal gravitation?: Newton; What is the currency of Japan?: yen;
What is the currency of the United Kingdom?: pound|sterling; What is the currency of India?: rupee;
What language is mainly spoken in Brazil?: Portuguese; What language is mainly spoken in Mexico?: Spanish;
What is the largest country in the world by area?: Russia; Which organ pumps blood through the body?: heart;
Which part of the cell is called its powerhouse?: mitochondria|mitochondrion; What do bees make?: honey;
Which metal is liquid at room temperature?: mercury; What is the main gas in Earth's atmosphere?: nitrogen;
What gas do plants take in from the air for photosynthesis?: carbon dioxide|CO2; What is frozen water called?: ice;
What is the opposite of hot?: cold; What is the closest star to Earth?: Sun; What is the chemical formula of water?: H2O;
What is the largest continent?: Asia; Which ocean lies between Europe and North America?: Atlantic;
What is the smallest planet in the Solar System?: Mercury; Which planet is closest to the Sun?: Mercury;
Which instrument has 88 keys?: piano; What do caterpillars turn into?: butterfly|butterflies|moth|moths;
Which bird is a symbol of peace?: dove; Which country is home to the kangaroo?: Australia;
In which country are the pyramids of Giza?: Egypt; In which city is the Eiffel Tower?: Paris;
In which city is the Colosseum?: Rome; What is the capital city of England?: London"""


def pairs(block: str) -> list[tuple[str, list[str]]]:
    """'key: a|b; key2: c' -> [(key, [a, b]), (key2, [c])]."""
    out = []
    for item in " ".join(block.split("\n")).split("; "):
        key, _, value = item.rpartition(": ")
        out.append((key.strip(), [v.strip() for v in value.split("|")]))
    return out


def words(names: list[str], case: bool = False) -> str:
    """A regex finding any of `names` as whole words (case-insensitive unless `case`)."""
    return ("" if case else "(?i)") + r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b"


def arithmetic() -> list[dict]:
    rng = random.Random(SEED)
    kinds = [
        ("sum1", lambda: (rng.randint(1, 9), "+", rng.randint(1, 9))),
        ("sum2", lambda: (rng.randint(10, 99), "+", rng.randint(10, 99))),
        ("diff2", lambda: (lambda a: (a, "-", rng.randint(1, a - 1)))(rng.randint(11, 99))),
        ("times", lambda: (rng.randint(2, 12), "x", rng.randint(2, 12))),
    ]
    out = []
    for kind, draw in kinds:
        for i in range(50):
            a, op, b = draw()
            value = a + b if op == "+" else a - b if op == "-" else a * b
            # the result at the start, after "=" or after "is": not an operand of an echoed question
            pattern = rf"(?:^|=|\bis:?)\s*{value}(?![\d.,]*\d)"
            out.append(
                {
                    "id": f"{kind}-{i:02d}",
                    "prompt": f"Calculate: {a} {op} {b} = ?\nGive just the result.",
                    "answer": pattern,
                    "grader": "regex",
                    "value": value,
                }
            )
    return out


def facts() -> list[dict]:
    out = []
    for i, (country, names) in enumerate(pairs(CAPITALS)):
        out.append(
            {
                "id": f"capital-{i:03d}",
                "prompt": f"What is the capital of {country}? Answer in a few words.",
                "answer": words(names),
                "grader": "regex",
            }
        )
    for i, (element, (symbol,)) in enumerate(pairs(ELEMENTS)):
        element = element.split()[-1]
        out.append(
            {
                "id": f"symbol-{i:02d}",
                "prompt": f"What is the chemical symbol of {element}?",
                "answer": words([symbol], case=True),
                "grader": "regex",
            }
        )
    for i, (work, names) in enumerate(pairs(AUTHORS)):
        out.append(
            {
                "id": f"author-{i:02d}",
                "prompt": f"Who wrote {work}? Answer with the author's name.",
                "answer": words(names),
                "grader": "regex",
            }
        )
    for i, (question, (value,)) in enumerate(pairs(NUMBERS)):
        out.append(
            {
                "id": f"count-{i:02d}",
                "prompt": f"{question} Answer with a number.",
                "answer": int(value),
                "grader": "number",
            }
        )
    for i, (question, names) in enumerate(pairs(GENERAL)):
        out.append({"id": f"general-{i:02d}", "prompt": question, "answer": words(names), "grader": "regex"})
    return out


def render(items: list[dict]) -> str:
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    a = p.parse_args()
    files = {"arithmetic.jsonl": render(arithmetic()), "facts.jsonl": render(facts())}
    stale = [name for name, text in files.items() if not (ROOT / name).is_file() or (ROOT / name).read_text() != text]
    if a.check:
        print("stale: " + ", ".join(stale) if stale else "data/ is up to date")
        return 1 if stale else 0
    ROOT.mkdir(exist_ok=True)
    for name, text in files.items():
        (ROOT / name).write_text(text, encoding="utf-8")
        print(f"{ROOT / name}: {text.count(chr(10))} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
