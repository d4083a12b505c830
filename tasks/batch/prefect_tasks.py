"""The Prefect task of one shard: retried with backoff on transient errors, never cached by Prefect
(the shard's completion marker in the output is what makes a rerun skip it)."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hfbatch.tasks.batch.runner import run_shard
from hfbatch.tasks.batch.shards import Shard
from hfbatch.tasks.batch.spec import InferSpec
from hfbatch.tasks.prefect_tasks import RETRIES


@task(name="infer-shard", task_run_name="shard-{shard.index}", cache_policy=NO_CACHE, persist_result=False,
      **RETRIES)
def infer_shard_task(shard: Shard, spec: InferSpec, wait: bool = True) -> dict | None:
    """Predict and commit one shard; returns its small manifest entry (None: another run is computing
    it and `wait` is off)."""
    return run_shard(shard, spec, wait)
