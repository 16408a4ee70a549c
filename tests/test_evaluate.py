"""`corevital evaluate` (docs/evaluate.md): graders, AUROC / interval / PRR against
independent recomputations, the files it writes, and its errors."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from corevital.analysis import evaluation as evaluate
from corevital.analysis import scoring
from corevital.assess import health, signals
from corevital.core import grading
from corevital.core.grading import GradeError, grade
from corevital.core.prompts import PromptError, load_prompts
from corevital.output import table

from synthetic import clean_capture, header

# --- graders ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output,answer,grader,correct,graded",
    [
        ("  Paris\n", "paris", "exact", True, "paris"),
        ("Paris is the capital", "Paris", "exact", False, "paris is the capital"),
        ("The  capital is\tPARIS.", "capital is paris", "contains", True, "the capital is paris."),
        ("Lyon", ["Paris", "Lyon"], "contains", True, "lyon"),
        ("The answer is 1,234.", 1234, "number", True, "1,234"),
        ("It is -7 degrees", "-7", "number", True, "-7"),
        ("about 3.50 now", 3.5, "number", True, "3.50"),
        ("56 + 26 = 82", 82, "number", False, "56"),  # the first number counts
        ("no digits here", 4, "number", False, ""),
        ("x = 10<|im_end|>", "^x = 10$", "regex", True, "x = 10"),  # trailing end marker removed
        ("Answer: B", [r"\bA\b", r"\bB\b"], "regex", True, "Answer: B"),
        ("Paris</s>", "paris", "exact", True, "paris"),
    ],
)
def test_graders(output, answer, grader, correct, graded):
    assert grade(output, answer, grader) == (correct, graded)


def test_unknown_grader():
    with pytest.raises(GradeError, match="unknown grader 'fuzzy'"):
        grade("x", "x", "fuzzy")


def test_prompt_file_answers(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"prompt": "a", "answer": 42, "grader": "number"}\n{"prompt": "b", "answer": ["x", "y"]}\n{"prompt": "c"}\n'
    )
    a, b, c = load_prompts(str(path), None, "")
    assert (a.answer, a.grader, b.answer, b.grader, c.answer, c.grader) == (
        ("42",),
        "number",
        ("x", "y"),
        "contains",
        None,
        None,
    )


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "a", "answer": "x", "grader": "fuzzy"}', r"q\.jsonl:2: unknown grader 'fuzzy'"),
        ('{"prompt": "a", "grader": "exact"}', r"q\.jsonl:2: \"grader\" is set but there is no \"answer\""),
        (
            '{"prompt": "a", "answer": "ten", "grader": "number"}',
            r"q\.jsonl:2: the number grader needs a numeric answer",
        ),
        ('{"prompt": "a", "answer": "(", "grader": "regex"}', r"q\.jsonl:2: the regex answer '\(' does not compile"),
        ('{"prompt": "a", "answer": []}', r"q\.jsonl:2: \"answer\" must be"),
        (
            '{"prompt": "a", "answer": ""}',
            r"q\.jsonl:2: \"answer\" is empty; an empty answer would grade every output correct",
        ),
        ('{"prompt": "a", "answer": " \\t "}', r"q\.jsonl:2: \"answer\" is empty"),
        ('{"prompt": "a", "answer": ["x", ""]}', r"q\.jsonl:2: \"answer\" is empty"),
    ],
)
def test_prompt_file_answer_errors(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "fine", "answer": "x"}\n' + line + "\n")
    with pytest.raises(PromptError, match=message):
        load_prompts(str(path), None, "")


# --- the scores against brute force ----------------------------------------------------------


def brute_auroc(wrong, scores):
    """Every (wrong, correct) pair: 1 when the wrong one scores higher, 1/2 on a tie."""
    w = [s for s, x in zip(scores, wrong) if x and not math.isnan(s)]
    c = [s for s, x in zip(scores, wrong) if not x and not math.isnan(s)]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in w for b in c) / (len(w) * len(c))


def brute_prr(wrong, scores):
    """PRR from its definition, ties broken every possible way and averaged (small n only)."""
    pairs = [(s, not x) for s, x in zip(scores, wrong) if not math.isnan(s)]
    n = len(pairs)
    q = [c for _, c in pairs]

    def area(order):  # order: indices, least risky first
        return sum(sum(q[i] for i in order[:k]) / k for k in range(1, n + 1)) / n

    def expected_area(risk):
        orders = [
            p for p in itertools.permutations(range(n)) if all(risk[p[i]] <= risk[p[i + 1]] for i in range(n - 1))
        ]
        return sum(area(o) for o in orders) / len(orders)

    random = sum(q) / n
    oracle = area(sorted(range(n), key=lambda i: -q[i]))
    return (expected_area([s for s, _ in pairs]) - random) / (oracle - random)


def loop_prr(wrong, scores):
    """PRR with the k least risky traces counted one k at a time: those strictly below the k-th
    risk, plus the rest of k drawn from the tie group at the boundary (its mean correctness)."""
    pairs = sorted((s, not x) for s, x in zip(scores, wrong) if not math.isnan(s))
    n = len(pairs)
    risk, q = [s for s, _ in pairs], [float(c) for _, c in pairs]

    def area(risk, q):
        total = 0.0
        for k in range(1, n + 1):
            boundary = sorted(risk)[k - 1]
            below = [c for r, c in zip(risk, q) if r < boundary]
            tied = [c for r, c in zip(risk, q) if r == boundary]
            total += (sum(below) + (k - len(below)) * sum(tied) / len(tied)) / k
        return total / n

    random = sum(q) / n
    return (area(risk, q) - random) / (area([-c for c in q], q) - random)


def lm_polygraph_prr(wrong, scores):
    """LM-Polygraph's PredictionRejectionArea (max_rejection = 1), normalised by random and oracle: no ties."""

    def pra(ue, target):
        order = np.argsort(ue)
        sorted_metrics = np.asarray(target, float)[order]
        cumsum = np.cumsum(sorted_metrics)
        return np.sum((cumsum / np.arange(1, len(ue) + 1))[::-1]) / len(ue)

    quality = (~np.asarray(wrong)).astype(float)
    return (pra(scores, quality) - quality.mean()) / (pra(-quality, quality) - quality.mean())


def test_auroc_equals_pair_count():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 60))
        wrong = rng.random(n) < 0.4
        wrong[0], wrong[1] = True, False
        scores = rng.integers(0, 6, n).astype(float) if trial % 2 else rng.normal(size=n)  # ties, or none
        scores[rng.random(n) < 0.1] = np.nan
        if np.isnan(scores[:2]).any():
            scores[:2] = [1.0, 0.0]
        assert scoring.auroc(wrong, scores) == pytest.approx(brute_auroc(wrong, scores), abs=1e-12)


def test_auroc_interval_is_deterministic_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    wrong = rng.random(200) < 0.3
    scores = rng.normal(size=200) + wrong
    low, high = scoring.auroc_interval(wrong, scores)
    assert (low, high) == scoring.auroc_interval(wrong, scores)
    assert low < scoring.auroc(wrong, scores) < high and high - low < 0.25
    # the weighted count equals the AUROC of an explicitly resampled set: n traces drawn with replacement
    rng = np.random.default_rng(scoring.SEED)
    drawn = np.bincount(rng.integers(0, len(wrong), len(wrong)), minlength=len(wrong))  # n picks, counted per trace
    one = scoring.auroc(np.repeat(wrong, drawn), np.repeat(scores, drawn))
    got = scoring.auroc_interval(wrong, scores, resamples=1)
    assert got[0] == pytest.approx(one)
    # by question, with tied scores: a drawn question brings all its traces, ties count one half
    questions, tied = np.arange(200) // 4, np.round(scores)
    rng = np.random.default_rng(scoring.SEED)
    drawn = np.bincount(rng.integers(0, 50, 50), minlength=50)[questions]
    one = brute_auroc(np.repeat(wrong, drawn), np.repeat(tied, drawn))
    assert scoring.auroc_interval(wrong, tied, resamples=1, groups=questions)[0] == pytest.approx(one, abs=1e-12)


def test_prr_against_brute_force_and_lm_polygraph():
    rng = np.random.default_rng(2)
    for trial in range(25):
        n = int(rng.integers(3, 8))
        wrong = rng.random(n) < 0.5
        wrong[0], wrong[1] = True, False
        scores = rng.integers(0, 3, n).astype(float)  # many ties
        assert scoring.prr(wrong, scores) == pytest.approx(brute_prr(wrong, scores), abs=1e-12)
        assert loop_prr(wrong, scores) == pytest.approx(brute_prr(wrong, scores), abs=1e-12)
    for _ in range(10):
        wrong = rng.random(50) < 0.4
        scores = rng.normal(size=50) + wrong
        assert scoring.prr(wrong, scores) == pytest.approx(lm_polygraph_prr(wrong, scores), abs=1e-12)
    wrong = np.array([True, False, True, False])
    assert scoring.prr(wrong, wrong.astype(float)) == pytest.approx(1.0)
    assert scoring.prr(wrong, -wrong.astype(float)) == pytest.approx(-1.0)
    assert math.isnan(scoring.prr([False, False], [1.0, 2.0])) and math.isnan(scoring.auroc([True], [1.0]))


def test_roc_curve_area_is_the_auroc():
    rng = np.random.default_rng(4)
    wrong = rng.random(80) < 0.5
    scores = rng.integers(0, 5, 80).astype(float)
    fpr, tpr = scoring.roc_curve(wrong, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(scoring.auroc(wrong, scores))


# --- directions: written here from what each signal means, never read from the code ---------

# +1: a higher value means more risk of a wrong answer; -1: a lower one does.
RISK = {
    "generated_tokens": +1,  # long answers ramble: the length baseline
    "mean_token_logprob": -1,
    "min_token_logprob": -1,
    "first_token_logprob": -1,  # unlikely tokens: unsure
    "mean_logits_entropy": +1,
    "max_logits_entropy": +1,  # a flat next-token distribution: unsure
    "mean_logits_top1_prob": -1,
    "mean_top1_top2_margin": -1,  # a weak or contested favourite: unsure
    "repeat_4gram_share": +1,  # repeating itself: degenerate
    "mid_attn_entropy": +1,  # diffuse reading of the context
    "mid_attn_concentration": -1,  # no head reads any key sharply
    "mid_prompt_attention": -1,  # looking away from the question (Lookback Lens)
    "mid_prev_attention": +1,  # leaning on its own last token
    "rauq": +1,  # an uncertainty score
    "rauq_head_mean": +1,
    "last_norm_ratio": +1,  # the residual stream leaving the prompt's scale
}


def test_every_signal_points_the_way_its_meaning_says():
    assert {s.name: s.direction for s in signals.SIGNALS} == RISK
    assert [d for c, d in evaluate.ranked() if c.startswith("flag_")] == [+1] * len(
        health.FLAGS
    )  # a fired flag: trouble


def test_the_logit_signals_rank_an_unsure_trace_above_a_sure_one():
    """Two traces alike but for their generated rows: one sure (likely tokens, low entropy,
    a clear favourite), one unsure; direction x value must be higher for the unsure one."""
    sure, unsure = clean_capture(seed=5), clean_capture(seed=5)
    gen = slice(sure.prompt_len, None)
    for cap, logprob, entropy, top1, margin in ((sure, -0.05, 0.2, 0.95, 0.9), (unsure, -2.5, 3.0, 0.3, 0.02)):
        cap["token_logprob"][gen], cap["logits_entropy"][gen] = logprob, entropy
        cap["logits_top1_prob"][gen], cap["logits_top1_top2_margin"][gen] = top1, margin
    a, b = signals.compute(sure), signals.compute(unsure)
    for name in (
        "mean_token_logprob",
        "min_token_logprob",
        "first_token_logprob",
        "mean_logits_entropy",
        "max_logits_entropy",
        "mean_logits_top1_prob",
        "mean_top1_top2_margin",
    ):
        assert RISK[name] * b[name] > RISK[name] * a[name], name


# --- the command on synthetic runs -----------------------------------------------------------


def write_job(job: Path, model: str, n: int, seed: int, answer=("42",), grader="number", source="q.jsonl") -> None:
    """A job dir whose traces.parquet holds n synthetic traces; about 40% answer "41" (wrong),
    and wrong ones carry a lower first-token log-prob, so signals have something to find."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cap = clean_capture(P=12, G=int(rng.integers(2, 10)), L=4, seed=seed * 1000 + i)
        is_wrong = rng.random() < 0.4
        cap["token_logprob"][12] -= 2.0 * is_wrong
        h = header(
            i,
            model,
            None if answer is None else list(answer),
            grader,
            source,
            trace_id=f"{model}-{seed}-{i}",
            seed=seed,
        )
        rows.append(table.trace_row(cap, h, ("41" if is_wrong else "42") + "<|im_end|>", health.assess(cap)))
    job.mkdir(parents=True)
    pq.write_table(table.traces_table(rows), job / "traces.parquet")


@pytest.fixture
def sweep(tmp_path):
    write_job(tmp_path / "sweep" / "model=a", "a", 40, 1)
    write_job(tmp_path / "sweep" / "model=b", "b", 30, 2)
    return tmp_path / "sweep"


def test_evaluate_writes_files_equal_to_an_independent_recomputation(sweep, capsys):
    assert evaluate.main([str(sweep), "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "model all: 70 traces" in out and "(baseline)" in out
    labels = pd.read_parquet(sweep / "evaluation" / "labels.parquet")
    ranking = pd.read_parquet(sweep / "evaluation" / "signals.parquet")
    assert [str(t) for t in pq.read_schema(sweep / "evaluation" / "signals.parquet").types] == [
        "string",
        "string",
        "int32",
        "int32",
        "int32",
        "double",
        "double",
        "double",
        "double",
    ]
    assert list(labels.columns) == ["trace_id", "model", "correct", "graded"] and set(labels.graded) == {"41", "42"}
    traces = pd.concat([pd.read_parquet(p) for p in sorted(sweep.glob("*/traces.parquet"))])
    assert (labels.correct == (traces.output_text.str[:2] == "42").to_numpy()).all()
    merged = traces.merge(labels, on=["trace_id", "model"])
    ranked = (
        [(s.name, RISK[s.name]) for s in signals.SIGNALS]
        + [("answer_agreement", -1)]
        + [(f.column, 1) for f in health.FLAGS]
    )
    merged = merged.reset_index(drop=True)
    agreement = []
    for _, r in merged.iterrows():  # the question's other traces: the other model's answer to it
        same = merged[(merged.prompt_source == r.prompt_source) & (merged.prompt_index == r.prompt_index)]
        agreement.append(brute_agreement(list(same.graded), list(same.trace_id).index(r.trace_id)))
    merged["answer_agreement"] = agreement
    assert len(ranking) == len(ranked) * 3 and list(dict.fromkeys(ranking.model)) == ["all", "a", "b"]
    for model, g in [("all", merged), ("a", merged[merged.model == "a"]), ("b", merged[merged.model == "b"])]:
        rows = ranking[ranking.model == model]
        assert rows.auroc.dropna().is_monotonic_decreasing
        for name, direction in ranked:
            r = rows[rows.signal == name].iloc[0]
            values = g[name].astype(float).to_numpy()
            wrong = ~g.correct.to_numpy()
            keep = ~np.isnan(values)
            assert (r.direction, r.n, r.n_wrong) == (direction, keep.sum(), wrong[keep].sum()), name
            if wrong[keep].all() or not wrong[keep].any():
                assert math.isnan(r.auroc)
                continue
            assert r.auroc == pytest.approx(brute_auroc(wrong, direction * values), abs=1e-12), name
            assert r.auroc_low <= r.auroc + 1e-9 and r.auroc <= r.auroc_high + 1e-9
            assert r.prr == pytest.approx(loop_prr(wrong, direction * values), abs=1e-9), name
    best = ranking[(ranking.model == "all")].iloc[0]
    assert best.signal == "first_token_logprob" and best.auroc > 0.9
    page = (sweep / "evaluation" / "report.html").read_text()
    assert "data:image/png;base64," in page and "first_token_logprob" in page


def test_interval_resamples_questions_not_traces():
    """Five identical samples of each question: resampled by question, the interval is that of
    the questions alone (each drawn question brings all five); resampled by trace it would be
    narrower, as if there were five times as many independent answers."""
    rng = np.random.default_rng(4)
    wrong = rng.random(120) < 0.4
    scores = rng.normal(size=120) + wrong
    five_w, five_s, questions = np.repeat(wrong, 5), np.repeat(scores, 5), np.repeat(np.arange(120), 5)
    by_question = scoring.auroc_interval(five_w, five_s, 500, groups=questions)
    assert by_question == pytest.approx(scoring.auroc_interval(wrong, scores, 500), abs=1e-12)
    by_trace = scoring.auroc_interval(five_w, five_s, 500)
    assert by_trace[1] - by_trace[0] < 0.6 * (by_question[1] - by_question[0])


def brute_agreement(graded: list[str], i: int) -> float:
    others = [g for j, g in enumerate(graded) if j != i]
    return sum(g == graded[i] for g in others) / len(others) if others else float("nan")


def test_answer_agreement_against_brute_force():
    rng = np.random.default_rng(2)
    n = 60
    traces = pd.DataFrame(
        {
            "trace_id": [f"t{i}" for i in range(n)],
            "model": rng.choice(["a", "b"], n),
            "prompt_source": rng.choice(["x.jsonl", "y.jsonl"], n),
            "prompt_index": rng.integers(0, 4, n),
        }
    )
    labels = pd.DataFrame({"trace_id": traces.trace_id, "graded": rng.choice(["41", "42", "43"], n)})
    got = evaluate.answer_agreement(traces, labels)
    for i, r in traces.iterrows():
        same = traces[traces.prompt_source == r.prompt_source]  # a question's traces, whichever model
        same = same[same.prompt_index == r.prompt_index]
        graded = list(labels.set_index("trace_id").graded[same.trace_id])
        expected = brute_agreement(graded, list(same.trace_id).index(r.trace_id))
        assert got[i] == pytest.approx(expected, nan_ok=True)


def test_functions_for_pandas_users(sweep):
    from corevital import analysis

    labels, ranking = analysis.evaluate(sweep, resamples=50)
    assert len(labels) == 70 and set(ranking.model) == {"all", "a", "b"}


def test_answers_from_the_prompt_file_when_the_table_has_none(tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"question {i}", "answer": 42, "grader": "number"}) + "\n" for i in range(20))
    )
    write_job(tmp_path / "run", "a", 20, 3, answer=None, grader=None, source=str(prompts))
    labels, _ = evaluate.evaluate(tmp_path / "run", resamples=20)
    assert 0 < labels.correct.sum() < 20


def _fails(path, capsys, message):
    assert evaluate.main([str(path), "--resamples", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("corevital: error: ") and message in err and err.count("\n") == 1, err
    assert not (path / "evaluation").exists() if path.exists() else True


def test_error_no_answer(tmp_path, capsys):
    write_job(tmp_path / "run", "a", 5, 4, answer=None, grader=None, source=str(tmp_path / "gone.jsonl"))
    _fails(
        tmp_path / "run",
        capsys,
        f"the traces' prompt file {tmp_path / 'gone.jsonl'} (recorded by their job) no longer exists",
    )
    (tmp_path / "gone.jsonl").write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(5)))
    _fails(tmp_path / "run", capsys, "5 of 5 traces have no answer to grade against (the first: prompt 0 of")


@pytest.mark.parametrize("answer", [("",), ("  ",), ("42", " \n")])
def test_error_empty_answer_recorded_in_the_traces(tmp_path, capsys, answer):
    write_job(tmp_path / "run", "a", 5, 4, answer=answer, grader="contains")
    _fails(tmp_path / "run", capsys, "has an empty answer, which would grade every output correct")


def test_grading_refuses_an_empty_answer():
    for answer in ("", "   ", [], ["x", ""]):
        with pytest.raises(grading.GradeError, match="is empty"):
            grade("any output at all", answer, "contains")


def test_error_unknown_grader(tmp_path, capsys):
    write_job(tmp_path / "run", "a", 5, 5, grader="fuzzy")
    _fails(tmp_path / "run", capsys, "unknown grader 'fuzzy'")


def test_error_every_trace_correct(tmp_path, capsys):
    write_job(tmp_path / "run", "a", 5, 6, answer=("4",), grader="regex")  # "41" and "42" both contain a 4
    _fails(tmp_path / "run", capsys, "every one of the 5 traces is correct, so AUROC is undefined")


def test_error_no_run(tmp_path, capsys):
    _fails(tmp_path, capsys, "no traces.parquet under")


def test_rerun_replaces_the_evaluation_whole(sweep):
    assert evaluate.main([str(sweep), "--resamples", "20"]) == 0
    (sweep / "evaluation" / "stale.txt").write_text("x")
    assert evaluate.main([str(sweep), "--resamples", "20"]) == 0
    assert sorted(p.name for p in (sweep / "evaluation").iterdir()) == [
        "detectors.parquet",
        "early.parquet",
        "labels.parquet",
        "layers.parquet",
        "predictions.parquet",
        "report.html",
        "signals.parquet",
    ]
    assert not list(sweep.glob(".evaluation*"))


# --- end to end: a tiny model's run, evaluated -----------------------------------------------


def _contains(output: str, answer: str) -> bool:
    """The contains grader written out: lower-cased, whitespace collapsed, substring."""
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    return norm(answer) in norm(output)


def test_evaluate_reads_the_jobs_own_prompt_file_never_a_decoy_in_the_current_directory(
    tiny_gpt2, tmp_path, monkeypatch, capsys
):
    """A run without answers, graded later against answers added to its prompt file: evaluated
    from a directory that holds an unrelated q.jsonl it gives the same labels as from anywhere
    else, or the same one-sentence error when the job's file no longer matches its traces."""
    from conftest import run_cli

    launch, decoy, job = tmp_path / "launch", tmp_path / "decoy", tmp_path / "job"
    launch.mkdir(), decoy.mkdir()
    questions = ["The quick brown fox", "A language model", "Attention weights"]
    (launch / "q.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    proc = run_cli(
        [
            f"model.name_or_path={tiny_gpt2}",
            "prompts=q.jsonl",
            "sampling=greedy",
            "sampling.max_new_tokens=6",
            f"hydra.run.dir={job}",
        ],
        cwd=launch,
    )
    assert proc.returncode == 0, proc.stderr
    traces = pd.read_parquet(job / "traces.parquet").sort_values("prompt_index")
    outputs = [grading.strip_end(t) for t in traces.output_text]
    right = [o.split()[0] if o.split() else "x" for o in outputs[:2]] + ["qqqzzz-never-generated"]
    wrong = ["qqqzzz-never-generated"] * 2 + [outputs[2].split()[0] if outputs[2].split() else "x"]
    (launch / "q.jsonl").write_text(
        "".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in zip(questions, right))
    )
    (decoy / "q.jsonl").write_text(
        "".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in zip(questions, wrong))
    )
    expected = [_contains(o, a) for o, a in zip(outputs, right)]
    assert expected == [True, True, False]
    seen = []
    for where in (decoy, tmp_path, job):
        monkeypatch.chdir(where)
        assert evaluate.main([str(job), "--resamples", "20"]) == 0, capsys.readouterr().err
        labels = pd.read_parquet(job / "evaluation" / "labels.parquet").set_index("trace_id").loc[traces.trace_id]
        seen.append(list(labels.correct))
    assert seen == [expected] * 3
    capsys.readouterr()
    edited = [questions[0], "A different question now", questions[2]]
    (launch / "q.jsonl").write_text(
        "".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in zip(edited, right))
    )
    errors = []
    for where in (decoy, tmp_path):
        monkeypatch.chdir(where)
        assert evaluate.main([str(job), "--resamples", "20"]) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and errors[0].count("\n") == 1, errors
    assert f"prompt 1 of {launch / 'q.jsonl'} is not the prompt its trace was generated from" in errors[0]


def test_a_job_that_records_no_launch_directory_never_reads_the_current_one(tmp_path, monkeypatch, capsys):
    write_job(tmp_path / "run", "a", 5, 4, answer=None, grader=None, source="q.jsonl")  # relative, no .hydra/
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"prompt": f"question {i}", "answer": "42"}) + "\n" for i in range(5))
    )
    monkeypatch.chdir(tmp_path)
    _fails(tmp_path / "run", capsys, "the job records no launch directory to find its prompt file 'q.jsonl' from")


def test_evaluate_a_tiny_models_run(tiny_gpt2, tmp_path, capsys):
    """Generate with answers in the prompt file, evaluate; every AUROC in signals.parquet equals
    a pair count over labels.parquet and traces.parquet; the traces validate."""
    from corevital import cli
    from corevital.runner.app import run_job

    from conftest import compose

    prompts = tmp_path / "q.jsonl"
    lines = [
        {"prompt": "The quick brown fox", "answer": "."},  # contains "." or not: random text decides
        {"prompt": "A language model", "answer": ["the", "a"], "grader": "contains"},
        {"prompt": "Attention weights", "answer": "^\\s*[A-Z]", "grader": "regex"},
        {"prompt": "Hidden states grow", "answer": 3, "grader": "number"},
    ]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    for seed in (1, 2):
        cfg = compose(
            [
                f"model.name_or_path={tiny_gpt2}",
                f"prompts={prompts}",
                "device=cpu",
                f"seed={seed}",
                "sampling.max_new_tokens=8",
                "num_samples=4",
                "batch_size=2",
            ]
        )
        run_job(cfg, tmp_path / "sweep" / f"seed={seed}", "tiny-gpt2")
    assert cli.main(["validate", str(tmp_path / "sweep")]) == 0
    capsys.readouterr()
    labels = evaluate.label_traces(evaluate.attach_answers(evaluate.load_traces(tmp_path / "sweep")))
    if labels.correct.all() or not labels.correct.any():
        pytest.skip("this tiny model's outputs were all graded alike")
    assert cli.main(["evaluate", str(tmp_path / "sweep"), "--resamples", "100"]) == 0
    labels = pd.read_parquet(tmp_path / "sweep" / "evaluation" / "labels.parquet")
    ranking = pd.read_parquet(tmp_path / "sweep" / "evaluation" / "signals.parquet")
    traces = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "sweep").glob("*/traces.parquet"))])
    assert len(labels) == len(traces) == 32 and set(traces.grader) == {"contains", "regex", "number"}
    merged = traces.merge(labels, on=["trace_id", "model"]).reset_index(drop=True)
    agreement = []
    for _, r in merged.iterrows():  # the consistency baseline, written out: the question's other traces
        same = merged[merged.prompt_source == r.prompt_source]
        same = same[same.prompt_index == r.prompt_index].reset_index(drop=True)
        agreement.append(brute_agreement(list(same.graded), list(same.trace_id).index(r.trace_id)))
    merged["answer_agreement"] = agreement
    for r in ranking[ranking.model == "all"].itertuples():
        values = merged[r.signal].astype(float).to_numpy()
        wrong = ~merged.correct.to_numpy()
        keep = ~np.isnan(values)
        if wrong[keep].all() or not wrong[keep].any():
            assert math.isnan(r.auroc)
        else:
            direction = {**RISK, "answer_agreement": -1}.get(r.signal, +1)  # a flag: +1
            assert r.direction == direction, r.signal
            assert r.auroc == pytest.approx(brute_auroc(wrong, direction * values), abs=1e-12), r.signal
    check_fitted(tmp_path / "sweep", labels, traces, ranking)


def check_fitted(root: Path, labels: pd.DataFrame, traces: pd.DataFrame, ranking: pd.DataFrame) -> None:
    """detectors.parquet's AUROCs are pair counts over predictions.parquet and labels.parquet; every
    question sits in one fold; layers.parquet has a row per layer; early.parquet's k = 1 mean log-prob
    is the first token's log-prob, and its per-layer features are means over the rows written."""
    from corevital.analysis import detectors, features

    out = root / "evaluation"
    det, preds = pd.read_parquet(out / "detectors.parquet"), pd.read_parquet(out / "predictions.parquet")
    layers, early = pd.read_parquet(out / "layers.parquet"), pd.read_parquet(out / "early.parquet")
    names = [d.name for d in detectors.DETECTORS]
    assert set(det.detector) == set(names) and len(preds) == len(names) * len(labels)
    assert (preds.groupby(["detector", "question"]).fold.nunique() == 1).all()  # no question on both sides
    questions = traces.prompt_source + "#" + traces.prompt_index.astype(str)
    n_wrong = int((~labels.correct).sum())
    expected_folds = min(5, questions.nunique(), n_wrong, len(labels) - n_wrong)
    assert set(preds.question) == set(questions) and preds.fold.nunique() == expected_folds
    merged = preds.merge(labels, on="trace_id")
    for r in det.itertuples():
        g = merged[(merged.detector == r.detector) & ((merged.model == r.model) | (r.model == "all"))]
        assert r.n == len(g) and r.auroc == pytest.approx(brute_auroc(~g.correct.to_numpy(), g.score.to_numpy()))
        assert r.auroc_low <= r.auroc + 1e-9 <= r.auroc_high + 2e-9
    assert sorted(layers.layer_index) == list(range(int(traces.num_layers.iloc[0])))
    assert set(early.k) == set(features.HORIZONS)
    assert set(early.signal) == {s.name for s in signals.SIGNALS} | set(names)
    one = early[(early.model == "all") & (early.k == 1)].set_index("signal").auroc
    first = ranking[ranking.model == "all"].set_index("signal").auroc
    assert one["mean_token_logprob"] == pytest.approx(first["first_token_logprob"], abs=1e-12)
    rows = pd.concat([pd.read_parquet(p) for p in sorted(root.glob("*/summaries.parquet"))])
    feats = features.read([str(p) for p in sorted(root.glob("*/summaries.parquet"))], workers=1)
    check_parallel(root, feats, traces, labels, (det, preds, layers, early))
    for tid in list(traces.trace_id[:3]):
        t = rows[(rows.trace_id == tid) & ~rows.is_prompt_token]
        got = feats.layers[0].set_index("trace_id").loc[tid]
        for layer, x in t.groupby("layer_index"):
            assert got[f"hidden_l2_norm@{layer}"] == pytest.approx(x.hidden_l2_norm.astype(float).mean(), rel=1e-6)
        first2 = t[t.step_index < t.step_index.min() + 2]
        got2 = feats.layers[2].set_index("trace_id").loc[tid]
        assert got2["attn_entropy_mean@0"] == pytest.approx(
            first2[first2.layer_index == 0].attn_entropy_mean.astype(float).mean(), rel=1e-6
        )


def check_parallel(root: Path, feats, traces: pd.DataFrame, labels: pd.DataFrame, written: tuple) -> None:
    """Read in worker processes, in chunks that cut traces across row groups of 7 rows, the
    features are those read in one pass; fitted in worker processes, the tables are those
    evaluate wrote (100 resamples, in this process)."""
    from corevital.analysis import evaluation, features, fitted

    small = []
    for i, p in enumerate(sorted(root.glob("*/summaries.parquet"))):
        small.append(str(root.parent / f"small{i}.parquet"))
        pq.write_table(pq.read_table(p), small[-1], row_group_size=7)
    for chunk_rows in (1, 40):
        chunked = features.read(small, workers=2, chunk_rows=chunk_rows)
        for k in features.HORIZONS:
            pd.testing.assert_frame_equal(chunked.signals[k], feats.signals[k])
            pd.testing.assert_frame_equal(chunked.layers[k], feats.layers[k], check_exact=False, rtol=1e-12)
    merged = evaluation.with_baselines(traces.reset_index(drop=True), labels.drop(columns="model"))
    merged = merged.merge(labels[["trace_id", "correct"]], on="trace_id")
    fits = fitted.fit(merged, [c for c, _ in evaluation.ranked()], feats, 100, workers=2)
    for got, want in zip((fits.detectors, fits.predictions, fits.layers, fits.early), written):
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False)


def test_folds_never_split_a_question():
    from corevital.analysis import detectors

    rng = np.random.default_rng(0)
    questions = rng.integers(0, 37, 400)
    wrong = rng.random(400) < 0.3
    fold = detectors.folds(wrong, questions)
    assert set(fold) == set(range(5))
    for f in range(5):
        assert not set(questions[fold == f]) & set(questions[fold != f])


# --- the labelled sets under data/ -----------------------------------------------------------


def test_shipped_data_is_current_and_its_answers_are_right():
    import re
    import subprocess
    import sys

    from corevital.core.grading import grade as grade_text

    repo = Path(__file__).resolve().parent.parent
    check = subprocess.run(
        [sys.executable, str(repo / "scripts" / "make_data.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    arithmetic = load_prompts(str(repo / "data" / "arithmetic.jsonl"), None, "")
    facts = load_prompts(str(repo / "data" / "facts.jsonl"), None, "")
    assert len(arithmetic) == 200 and len(facts) >= 300
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
    for p in arithmetic:
        a, op, b = re.match(r"Calculate: (\d+) ([+x-]) (\d+) = \?", p.text).groups()
        value = ops[op](int(a), int(b))
        assert grade_text(f"{a} {op} {b} = {value}", p.answer, p.grader)[0], (
            p.text
        )  # the echoed question, then the result
        assert grade_text(f"The answer is {value}.", p.answer, p.grader)[0]
        assert not grade_text(f"{a} {op} {b} = {value + 1}", p.answer, p.grader)[0]
        assert not grade_text(f"{value}0", p.answer, p.grader)[0]
    samples = {
        "capital of Tunisia": ("The capital of Tunisia is Tunis.", "The capital of Tunisia is Sfax."),
        "symbol of gold": ("The chemical symbol of gold is Au.", "It is Ag."),
        "wrote Hamlet": ("William Shakespeare wrote it.", "Charles Dickens."),
        "legs does a spider": ("A spider has 8 legs.", "Spiders have 6 legs and 8 eyes."),
    }
    for key, (right, wrong) in samples.items():
        p = next(p for p in facts if key in p.text)
        assert grade_text(right, p.answer, p.grader)[0] and not grade_text(wrong, p.answer, p.grader)[0], key


def test_list_columns_read_back_as_rows_of_heads():
    """features reads a per-head list column as (rows, heads): a null list, or one of another
    width, is a row of NaN; chunk boundaries do not matter."""
    import pyarrow as pa

    from corevital.analysis.features import _lists

    rng = np.random.default_rng(3)
    for _ in range(100):
        n, width = int(rng.integers(1, 20)), int(rng.integers(1, 5))
        kinds = rng.choice(["full", "null", "short"], size=n, p=[0.75, 0.2, 0.05])
        rows = [list(rng.random(width)) if k == "full" else None if k == "null" else [0.5] * (width - 1) for k in kinds]
        column = pa.chunked_array(
            [pa.array(rows[: n // 2], pa.list_(pa.float32())), pa.array(rows[n // 2 :], pa.list_(pa.float32()))]
        )
        widest = max((len(r) for r in rows if r is not None), default=0)
        expected = np.full((n, max(widest, 1)), np.nan, np.float32)
        for i, r in enumerate(rows):
            if r is not None and len(r) == widest and widest:
                expected[i] = r
        assert np.array_equal(_lists(column), expected, equal_nan=True)


def test_detectors_skip_columns_that_cannot_split():
    from corevital.analysis import detectors

    nan = np.nan
    X = np.array(
        [[1.0, nan, 2.0, 0.0, 5.0], [1.0, nan, nan, 1.0, 5.0], [1.0, nan, 2.0, 2.0, 5.0]]
    )  # one value; none; one value and missing; three values; one value
    assert list(detectors.varying(X)) == [False, False, True, True, False]
