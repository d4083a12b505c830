"""`hfbatch` command line: each command runs the Prefect flow of the same name with the same parameters."""
from __future__ import annotations

import argparse
import json
import sys

from tasks.errors import HfbatchError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfbatch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="artifact store URL (default: $HFBATCH_STORE or ./hfbatch-store)")
    common.add_argument("--json", action="store_true", help="print the result as JSON only")
    common.add_argument("--text-column", default="text")
    common.add_argument("--label-column", default="label")
    common.add_argument("--max-length", type=int, default=128, help="truncate inputs to N tokens")

    t = sub.add_parser("train", parents=[common], help="fine-tune, evaluate and register a classifier")
    t.add_argument("--dataset", required=True, help="training data: file, directory, s3:// URI or hub id")
    t.add_argument("--model", required=True, help="base model: local directory or hub id[@revision]")
    t.add_argument("--name", required=True, help="registry name to add the new version to")
    t.add_argument("--eval-dataset", help="evaluation data (default: hold out --eval-fraction of --dataset)")
    t.add_argument("--eval-fraction", type=float, default=0.1)
    t.add_argument("--max-train-samples", type=int)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--learning-rate", type=float, default=5e-5)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    t.add_argument("--metric", default="accuracy", help="metric of the champion gate")
    t.add_argument("--promotion-margin", type=float, default=0.0)

    e = sub.add_parser("evaluate", parents=[common], help="evaluate a model on a labelled dataset")
    e.add_argument("--model", required=True, help="NAME[@VERSION], a local directory or a hub id")
    e.add_argument("--dataset", required=True)
    e.add_argument("--metrics", default="accuracy,precision,recall,f1")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except HfbatchError as e:
        print(f"hfbatch: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_human(args.command, result)
    return 0


def _run(args) -> dict:
    from flows.training import evaluate_flow, train_flow

    common = dict(text_column=args.text_column, label_column=args.label_column, max_length=args.max_length,
                  store=args.store)
    if args.command == "train":
        return train_flow(dataset=args.dataset, model=args.model, name=args.name,
                          eval_dataset=args.eval_dataset, eval_fraction=args.eval_fraction,
                          max_train_samples=args.max_train_samples, epochs=args.epochs,
                          batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                          save_steps=args.save_steps, metric=args.metric,
                          promotion_margin=args.promotion_margin, **common)
    if args.command == "evaluate":
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        return evaluate_flow(model=args.model, dataset=args.dataset, metrics=metrics, **common)
    raise AssertionError(args.command)


def _print_human(command: str, result: dict) -> None:
    if command == "train":
        status = "champion" if result["promoted"] else f"not promoted (champion: v{result['champion']})"
        print(f"{result['name']} v{result['version']}: {status}; {result['reason']}")
    for name, value in result["metrics"].items():
        print(f"  {name:>10}: {value:.4f}")


if __name__ == "__main__":
    sys.exit(main())
