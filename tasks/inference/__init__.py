"""Bulk inference over Parquet: plan shards, run each exactly once, check and describe the result.

- `shards`: list the input files and cut them into deterministic shards; stream a shard's rows.
- `predictors`: the task heads (text classification, feature extraction, question answering,
  fill-mask, token classification, zero-shot classification), each loaded once per process.
- `runner`: validate schemas, run one shard and commit it (part, then marker), check the whole run.
- `prefect_tasks`: the Prefect task around `runner.run_shard`, retried on transient I/O errors only.
"""
