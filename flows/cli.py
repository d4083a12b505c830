"""`hfbatch` command line: each command runs the Prefect flow of the same name with the same parameters."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
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
    i = sub.add_parser("infer", help="run a model over Parquet rows (sharded, exactly once)")
    i.add_argument("--model", required=True, help="NAME[@VERSION], a local directory or a hub id")
    i.add_argument("--task", required=True, help="text-classification, feature-extraction, question-answering, "
                   "fill-mask, token-classification, zero-shot-classification")
    i.add_argument("--input", required=True, help="Parquet file, directory, glob or s3:// prefix")
    i.add_argument("--output", required=True, help="output directory or s3:// prefix")
    i.add_argument("--store", help="artifact store URL holding the model registry")
    i.add_argument("--json", action="store_true", help="print the result as JSON only")
    i.add_argument("--text-column", default="text")
    i.add_argument("--columns", help="task inputs to columns, e.g. text=sentence or question=q,context=c")
    i.add_argument("--keep-columns", help="input columns copied to the output (default: id or idx)")
    i.add_argument("--batch-tokens", type=int,
                   help="token budget of one model batch (default: 4096 on CPU, 65536 on CUDA)")
    i.add_argument("--shard-rows", type=int, default=10_000, help="target rows per shard")
    i.add_argument("--on-bad-row", choices=("fail", "quarantine"), default="fail")
    i.add_argument("--labels", help="zero-shot-classification: comma-separated candidate labels")
    i.add_argument("--top-k", type=int, default=5, help="fill-mask: tokens per row")
    i.add_argument("--max-answer-len", type=int, default=15, help="question-answering: longest answer, in tokens")
    i.add_argument("--handle-impossible-answer", action="store_true", help="question-answering: allow no answer")
    i.add_argument("--precision", default="auto", metavar="auto|int8",
                   help="auto: exact, fp32 on CPU and bf16/fp16 on CUDA; int8: quantized linear layers on CPU "
                   "(faster, approximate scores; text classification scores its close calls again in fp32)")
    i.add_argument("--task-runner", default="threads", metavar="threads|dask",
                   help="run the shards on this process's threads, or on a Dask cluster (prefect-dask)")
    i.add_argument("--dask-address", help="with --task-runner dask: an existing scheduler, e.g. tcp://host:8786 "
                   "(default: a temporary LocalCluster of 2 worker processes)")

    s = sub.add_parser("status", help="champions, metric trends and the last flow runs (Prefect API)")
    s.add_argument("--store", help="artifact store URL holding the model registry")
    s.add_argument("--json", action="store_true", help="print the result as JSON only")
    s.add_argument("--limit", type=int, default=5, help="last N runs of each deployment / flow")

    v = sub.add_parser("serve", help="serve watch-data, retrain, train and batch-inference here (needs a "
                       "Prefect server: PREFECT_API_URL)")
    v.add_argument("--name", required=True, help="model name: retrain registers versions of it, "
                   "batch-inference uses its champion")
    v.add_argument("--model", required=True, help="base model to fine-tune: local directory or hub id[@revision]")
    v.add_argument("--watch", required=True, help="labelled data prefix to watch (directory or s3://)")
    v.add_argument("--input", required=True, help="batch-inference input (Parquet file, directory, s3://)")
    v.add_argument("--output", required=True, help="batch-inference output; may hold {date} and {model_version}")
    v.add_argument("--task", default="text-classification")
    v.add_argument("--cron", default="0 2 * * *", help="batch-inference schedule")
    v.add_argument("--watch-interval", type=float, default=300, help="seconds between looks at --watch")
    v.add_argument("--train-param", action="append", default=[], metavar="KEY=VALUE",
                   help="train flow parameter (value parsed as JSON when it is), e.g. max_train_samples=3000")
    v.add_argument("--store", help="artifact store URL")
    v.set_defaults(json=False)

    d = sub.add_parser("deploy", help="prefect deploy --all of deployments/prefect.yaml (PREFECT_API_URL)")
    d.set_defaults(json=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Without PREFECT_API_URL, Prefect starts a temporary local server (SQLite); its 20 s default
    # start-up limit is too short on a busy small machine, where migrating a fresh database takes longer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        # libraries print progress to stdout (the Trainer prints its logs when tqdm is off): with
        # --json, stdout must hold the JSON document only
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
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
    if args.command == "infer":
        return _infer(args)
    if args.command in ("serve", "deploy"):
        return _operate(args)
    if args.command == "status":
        from flows.status import collect_status

        return collect_status(args.store, args.limit)
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


def _infer(args) -> dict:
    from flows.inference import batch_inference, check_task_runner, progress_listener
    from tasks.errors import ConfigError

    def split(text):
        return [x.strip() for x in text.split(",") if x.strip()] if text else None

    pairs = split(args.columns) or []
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError(f"--columns takes INPUT=COLUMN pairs, e.g. question=q,context=c; got {bad}")
    columns = dict(pair.split("=", 1) for pair in pairs) or None
    check_task_runner(args.task_runner, args.dask_address)  # before a flow run is even created
    with _InferProgress(enabled=not args.json) as bar, progress_listener(bar.update):
        return batch_inference(model=args.model, task=args.task, input=args.input, output=args.output,
                               text_column=args.text_column, columns=columns,
                               keep_columns=split(args.keep_columns), batch_tokens=args.batch_tokens,
                               shard_rows=args.shard_rows, on_bad_row=args.on_bad_row,
                               candidate_labels=split(args.labels), top_k=args.top_k,
                               max_answer_len=args.max_answer_len,
                               handle_impossible_answer=args.handle_impossible_answer, store=args.store,
                               task_runner=args.task_runner, dask_address=args.dask_address,
                               precision=args.precision)


def _operate(args) -> dict:
    from flows.deploy import build_deployments, deploy_all, serve_deployments
    from tasks.errors import ConfigError

    if args.command == "deploy":
        rc = deploy_all()
        if rc:
            raise ConfigError(f"prefect deploy failed (exit status {rc})")
        return {"deployed": True}
    params = {}
    for item in args.train_param:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--train-param takes KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    serve_deployments(build_deployments(args.name, args.model, args.watch, args.input, args.output, args.task,
                                        args.cron, args.watch_interval, args.store, params))
    return {"served": True}


class _InferProgress:
    """A progress bar on stderr over the run's rows, advanced as shards finish (not in --json mode,
    nor when stderr is not a terminal, unless HFBATCH_PROGRESS=1)."""

    def __init__(self, enabled: bool):
        force = os.environ.get("HFBATCH_PROGRESS")
        self.enabled = enabled and (force != "0") and (force == "1" or sys.stderr.isatty())
        self.bar = None

    def __enter__(self) -> "_InferProgress":
        return self

    def update(self, event: dict) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event["rows"], unit="row", unit_scale=True, desc="hfbatch infer",
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.2)
            self.skipped = 0
        self.skipped += event["skipped"]
        self.bar.set_postfix_str(f"shards {event['done']}/{event['shards']}"
                                 + (f" ({self.skipped} already done)" if self.skipped else ""), refresh=False)
        self.bar.update(event["rows_done"] - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_human(command: str, result: dict) -> None:
    if command in ("serve", "deploy"):
        return
    if command == "status":
        from flows.status import format_status

        print(format_status(result))
        return
    if command == "infer":
        print(f"{result['rows']} rows → {result['output']}: {result['rows_out']} predicted, "
              f"{result['quarantined']} quarantined, {result['shards_skipped']}/{result['shards']} shards "
              f"already done; {result['rows_per_s']} rows/s ({result['model']} {result['model_version']})")
        if result.get("corrupt_files"):
            print(f"  {result['corrupt_files']} unreadable input file(s) set aside: see _quarantine/_files.parquet")
        return
    if command == "train":
        status = "champion" if result["promoted"] else f"not promoted (champion: v{result['champion']})"
        print(f"{result['name']} v{result['version']}: {status}; {result['reason']}")
    for name, value in result["metrics"].items():
        print(f"  {name:>10}: {value:.4f}")


if __name__ == "__main__":
    sys.exit(main())
