#!/usr/bin/env bash
# GPU check, run through the device tool on a lent machine (no network there):
#   carry .device/ (wheels of hydra-core, omegaconf, antlr4, pydantic, orjson and, if missing
#   there, pyarrow for its Python, and the SmolLM2 config + tokenizer); run:  bash scripts/device_check.sh
# It runs the CUDA test tier and the reference tests, then scripts/bench.py on a
# random-weight model of SmolLM2-135M's exact architecture (the 100 MB GGUF does not travel).
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .device/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/pylib:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python3 - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
cfg = AutoConfig.from_pretrained(".device/smollm2-arch")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained("/tmp/smollm2-arch")
AutoTokenizer.from_pretrained(".device/smollm2-arch").save_pretrained("/tmp/smollm2-arch")
PY
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_summaries.py tests/test_reference.py tests/test_streaming.py 2>&1 | tail -15 | tee "$OUT/pytest_cuda.txt"
# bf16/fp16 on CUDA, a model split across the GPU and the CPU, bitsandbytes 8/4-bit (skipped if not installed)
python3 -m pytest -q -p no:cacheprovider -rs tests/test_dtypes.py tests/test_device_map.py -k "cuda or gpu or bitsandbytes" 2>&1 | tail -15 | tee "$OUT/pytest_placement.txt"
python3 scripts/bench.py --device cuda --model /tmp/smollm2-arch --reps 5 --mem-reps 1 >"$OUT/bench_cuda.md" 2>"$OUT/bench_cuda.err"
cat "$OUT/bench_cuda.md"; tail -5 "$OUT/bench_cuda.err"
# the whole job at batch 64 against a plain script (issue 12's GPU target: at most 1.15x)
python3 scripts/bench_job.py --skip a c d extra --batch 64 >"$OUT/bench_job_cuda.md" 2>"$OUT/bench_job_cuda.err"
cat "$OUT/bench_job_cuda.md"; tail -5 "$OUT/bench_job_cuda.err"
[[ -n "${SKIP_BF16:-}" ]] && exit 0
python3 scripts/bench.py --device cuda --model /tmp/smollm2-arch --dtype bfloat16 --reps 3 --mem-reps 1 --skip-sweep >"$OUT/bench_cuda_bf16.md" 2>"$OUT/bench_cuda_bf16.err"
cat "$OUT/bench_cuda_bf16.md"; tail -5 "$OUT/bench_cuda_bf16.err"
