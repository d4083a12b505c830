"""Training on several processes of one machine (DDP): the `train` task launches `torchrun` over this
module, and every process runs the same function (`train.fit`, pickled by reference) on the same job,
each on its share of every batch (one per
GPU; on CPU, gloo and a share of the cores). The Prefect flow and its other tasks stay in the launching
process: only the fine-tuning is distributed. The first process saves the model and commits the
checkpoints; it reports the run's figures, or the user error that stopped it, back in a file.

    python -m torch.distributed.run --standalone --nproc-per-node N -m hfbatch.tasks.distributed JOB_DIR
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from hfbatch.tasks.core import errors


def run_distributed(nproc: int, fit: Callable[..., dict], job: dict) -> dict:
    """`fit(**job)` in `nproc` processes under torchrun; returns the first process's figures. `fit` is a
    module-level function (pickle names it, the processes import it)."""
    with tempfile.TemporaryDirectory(prefix="hfbatch-ddp-") as tmp:
        # the job is this process's own objects (references, settings, paths), read back by its children
        (Path(tmp) / "job.pkl").write_bytes(pickle.dumps((fit, job)))
        env = dict(os.environ)
        if job["settings"].device == "cpu" or not _cuda():
            # torchrun gives every process 1 thread by default: share the cores instead
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
        # the processes' output goes to stderr: stdout may be `hfbatch --json`'s document
        rc = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={nproc}", "-m", __name__, tmp], env=env, stdout=2)
        report = Path(tmp) / "report.json"
        outcome = json.loads(report.read_text()) if report.exists() else {}
    if "error" in outcome:  # an HfbatchError in the first process: the same error here
        raise getattr(errors, outcome["error"], errors.HfbatchError)(outcome["message"])
    if rc or "fitted" not in outcome:
        raise RuntimeError(f"training in {nproc} processes (torchrun) failed with exit status {rc}: see its "
                           "output above")
    return outcome["fitted"] | {"warnings": tuple(outcome["fitted"]["warnings"])}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(job_dir: str) -> None:
    fit, job = pickle.loads((Path(job_dir) / "job.pkl").read_bytes())
    first = int(os.environ.get("RANK", "0")) == 0
    try:
        fitted = fit(**job)
    except errors.HfbatchError as e:
        if first:
            (Path(job_dir) / "report.json").write_text(json.dumps({"error": type(e).__name__, "message": str(e)}))
        raise
    if first:
        (Path(job_dir) / "report.json").write_text(json.dumps({"fitted": fitted}))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
