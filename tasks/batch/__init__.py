"""Bulk inference over Parquet: plan shards, run each exactly once, check and describe the result.

- `shards`: list the input files and cut them into deterministic shards; stream a shard's rows.
- `spec`: the run's task, model, inputs and options, checked against the input schemas.
- `predictor`: what the task predictors share (batching, streams, device, int8); each task's own
  predictor is in its recipe (`tasks/recipes/`).
- `runner`: run one shard and commit it (part, then marker); `output`: the output directory, its
  claim, and the final check and manifest.
- `prefect_tasks`: the Prefect task around `runner.run_shard`, retried on transient errors only.
"""
