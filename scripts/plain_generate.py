"""The plain script a CoreVital job is compared with (scripts/bench_job.py): load the model,
generate for every prompt of a file in batches (left padding, stopping at EOS as a job
does), write the generated texts as JSON Lines. No capture, no traces, no tables. On CUDA
when there is one (as a job with device=auto).

    python scripts/plain_generate.py MODEL_DIR PROMPTS.txt OUT.jsonl --batch-size 8 --max-new-tokens 20 [--greedy]
"""

import argparse
import json
import time

start = time.perf_counter()
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = [line for line in open(a.prompts, encoding="utf-8").read().splitlines() if line.strip()]
    loaded = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval().to(a.device)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    sampling = dict(do_sample=False) if a.greedy else dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95)
    gen_start = time.perf_counter()
    with open(a.out, "w", encoding="utf-8") as out, torch.inference_mode():
        for s in range(0, len(prompts), a.batch_size):
            batch = prompts[s : s + a.batch_size]
            enc = tok(batch, return_tensors="pt", padding=True).to(a.device)
            set_seed(a.seed)
            ids = model.generate(**enc, max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
            for i, text in enumerate(tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)):
                out.write(json.dumps({"prompt_index": s + i, "output_text": text}) + "\n")
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    end = time.perf_counter()
    print(json.dumps({"imports_s": loaded - start, "load_s": gen_start - loaded, "generate_s": end - gen_start}))


if __name__ == "__main__":
    main()
