"""Bulk pipeline inference over Parquet as a Prefect flow: plan → one task per shard → check → manifest."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from hfbatch.flows.params import InferParams, parameters, recipe_options, validated
from hfbatch.flows.status import SUMMARY_KEY
from hfbatch.tasks.core.errors import ConfigError, is_transient
from hfbatch.tasks.batch.output import check_output_location, finalize, prepare_output, quarantine_files
from hfbatch.tasks.batch.prefect_tasks import infer_shard_task
from hfbatch.tasks.batch.shards import describe_input, plan_shards
from hfbatch.tasks.batch.spec import build_spec, output_for
from hfbatch.tasks.core.models import resolve_model
from hfbatch.tasks.prefect_tasks import monitor_task
from hfbatch.tasks.recipes import get_recipe
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store

_listeners: list[Callable[[dict], None]] = []


@contextmanager
def progress_listener(callback: Callable[[dict], None]) -> Iterator[None]:
    """Call `callback` in this process as shards finish (the CLI's progress bar): first with
    `done=0`, then once per shard, with `done`, `shards`, `rows_done`, `rows` and `skipped`."""
    _listeners.append(callback)
    try:
        yield
    finally:
        _listeners.remove(callback)


def _notify(event: dict) -> None:
    for callback in _listeners:
        callback(event)


def _run_day() -> str:
    """The day this run was scheduled for (UTC), e.g. 2026-11-26."""
    from prefect.runtime import flow_run

    start = flow_run.scheduled_start_time
    return start.date().isoformat() if start else time.strftime("%Y-%m-%d", time.gmtime())


TASK_RUNNERS = ("threads", "dask")  # InferParams.task_runner
DASK_LOCAL_WORKERS = 2
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def check_task_runner(task_runner: str, dask_address: str | None = None) -> None:
    if task_runner not in TASK_RUNNERS:
        raise ConfigError(f"task_runner must be one of {TASK_RUNNERS}, got {task_runner!r}")
    if dask_address and task_runner != "dask":
        raise ConfigError(f"dask_address ({dask_address!r}) needs task_runner='dask'")


def dask_task_runner(address: str | None = None, n_workers: int = DASK_LOCAL_WORKERS) -> TaskRunner:
    """A prefect-dask runner: connected to the scheduler at `address`, or else on a temporary
    `LocalCluster` of `n_workers` processes with one task thread each, whose torch threads share this
    machine's cores between them (Dask's default would leave each worker one thread)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // n_workers))
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": None,
                                          "env": dict.fromkeys(_THREAD_VARIABLES, threads)})


@contextmanager
def shard_runner(task_runner: str = "threads", dask_address: str | None = None) -> Iterator[TaskRunner]:
    """The task runner the shards are submitted to: the flow's own thread pool, or a Dask cluster
    (started here and closed on exit when it is a `LocalCluster`)."""
    check_task_runner(task_runner, dask_address)
    if task_runner == "threads":
        yield FlowRunContext.get().task_runner
        return
    with _api_for_workers(), dask_task_runner(dask_address) as runner:
        yield runner


@contextmanager
def _api_for_workers() -> Iterator[None]:
    """Dask workers report their task runs to this flow's Prefect API, whose URL travels with each task
    run's settings. Without `PREFECT_API_URL` this process runs a temporary server: give the workers its
    URL, or each of them would start a temporary server of its own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not PREFECT_API_URL.value():
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the one this process's client started
        if server.running:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                yield
            return
    yield


# Two workers: while one shard computes (the model holds a lock, torch uses every core), the other
# reads or writes Parquet.
@flow(name="batch_inference", task_runner=ThreadPoolTaskRunner(max_workers=2))
@parameters(InferParams, *recipe_options("infer"))
def batch_inference(**values) -> dict:
    """Run `model` (`NAME[@VERSION]` from the registry in `store`, a local directory or a hub id) over
    the Parquet rows of `input` and write predictions as Parquet parts plus `_manifest.json` to `output`.

    `columns` maps a task's inputs to input columns (`text_column` is the shortcut for `text`);
    `keep_columns` are copied to the output (default: an `id` or `idx` column if there is one; a stable
    `row_id` is always added). Bad rows fail the run or, with `on_bad_row="quarantine"`, go to
    `_quarantine/`, with the rows of a row group whose data cannot be decoded (and unreadable input
    files to `_quarantine/_files.parquet`, listed in the manifest).
    A rerun into the same `output` computes only the shards not committed yet (`mode="resume"`, which
    refuses an output written from other input content, model or configuration); `mode="overwrite"`
    replaces what is there, `mode="error"` writes only into an empty output. An output inside the input
    is refused.

    `output` may hold `{date}` (the day the run was scheduled for) and `{model_version}`, e.g.
    `s3://bucket/predictions/{date}/v{model_version}`: a scheduled run that resolves `NAME` to a new
    champion then writes to a new place.

    `precision="int8"` quantizes the model's linear layers to int8 on CPU: faster, with scores that
    differ slightly from `pipeline`'s. Text classification quantizes every encoder layer and scores the
    rows whose two best scores are within 0.2 again in fp32, so a label differs only now and then; the
    other tasks keep the first encoder layer in fp32.

    `task_runner="dask"` runs the shards on a Dask cluster (prefect-dask): the scheduler at
    `dask_address`, or else a temporary `LocalCluster` of 2 worker processes, each loading the model
    once. The output is the same as with the default thread pool. The workers of a remote cluster
    need this package, access to the model, `input` and `output` (e.g. `s3://`), and a Prefect API they
    can reach (`PREFECT_API_URL`; without it, this process's temporary server on 127.0.0.1).
    """
    p = validated(InferParams, values)
    check_task_runner(p.task_runner, p.dask_address)
    logger = get_run_logger()
    started = time.perf_counter()
    settings = Settings().with_overrides(device=p.device)
    corrupt = [] if p.on_bad_row == "quarantine" else None  # unreadable files: set aside, or fail the run
    files = describe_input(p.input, settings.storage_options(p.input), corrupt)
    ref = resolve_model(p.model, settings, Store.open(settings, p.store))
    recipe = get_recipe(task_of(p.task, ref))
    output = output_for(p.output, ref, _run_day())
    check_output_location(p.input, output)
    spec = build_spec(recipe.task, ref, output, files, settings, validated(recipe.infer_options, values),
                      p.text_column, p.columns, p.keep_columns, p.batch_tokens, p.on_bad_row,
                      p.precision)  # schema errors surface here, before any model is loaded
    shards = plan_shards(files, p.shard_rows)
    prepare_output(spec, files, p.mode)
    quarantine_files(spec, corrupt)
    logger.info("%s: %d rows in %d files, %d shards; model %s %s", spec.task, sum(s.num_rows for s in shards),
                len(files), len(shards), spec.model_name, spec.model_version)
    progress = create_progress_artifact(0.0, key="batch-inference-progress", description=f"Shards of {output}")
    total = sum(s.num_rows for s in shards)
    _notify({"done": 0, "shards": len(shards), "rows_done": 0, "rows": total, "skipped": False})
    entries, rows_done = [], 0
    with shard_runner(p.task_runner, p.dask_address) as runner:
        # what `infer_shard_task.submit(shard, spec)` does, on the chosen runner
        futures = [runner.submit(infer_shard_task, {"shard": shard, "spec": spec}) for shard in shards]
        for shard, future in zip(shards, futures):
            entries.append(shard_result(runner, future, shard, spec))
            rows_done += shard.num_rows
            update_progress_artifact(progress, 100.0 * len(entries) / len(futures))
            _notify({"done": len(entries), "shards": len(shards), "rows_done": rows_done, "rows": total,
                     "skipped": bool(entries[-1].get("skipped"))})
    manifest = finalize(spec, files, shards, entries, time.perf_counter() - started, corrupt)
    computed = sum(e["rows"] + e["quarantined"] for e in entries if not e.get("skipped"))
    rows_per_s = computed / manifest["seconds"] if manifest["seconds"] else 0.0
    summary = {"output": spec.output, "task": spec.task, "model": spec.model_name,
               "model_version": spec.model_version, "rows": manifest["rows_in"], "rows_out": manifest["rows_out"],
               "quarantined": manifest["quarantined"], "corrupt_files": len(manifest["corrupt_files"]),
               "shards": manifest["shards"],
               "shards_skipped": manifest["shards_skipped"], "rows_per_s": round(rows_per_s, 1),
               "seconds": manifest["seconds"], "input_fingerprint": manifest["input_fingerprint"]}
    if ref.name and ref.version:  # a registered model: record the run, compare with its reference
        run = monitor_task(summary, manifest, ref, Store.open(settings, p.store), p.drift_threshold)
        summary["drifted"] = run["drifted"]
        summary["max_psi"] = max(run["drift"].values(), default=None)
        if run["drifted"]:
            logger.warning("predictions drifted from %s v%s's evaluation: %s", ref.name, ref.version,
                           ", ".join(f"{k} PSI {run['drift'][k]:.3f}" for k in run["drifted"]))
    create_table_artifact(key=SUMMARY_KEY, table=[summary],
                          description=f"{spec.task} with {spec.model_name} {spec.model_version}")
    logger.info("%d rows → %s (%d quarantined, %d/%d shards skipped, %.1f rows/s)", summary["rows"], output,
                summary["quarantined"], summary["shards_skipped"], summary["shards"], rows_per_s)
    return summary


LOST_SHARD_RESUBMITS = 3


def shard_result(runner: TaskRunner, future, shard, spec) -> dict:
    """The shard's manifest entry. A shard lost with the Dask workers that ran it is submitted again, up
    to `LOST_SHARD_RESUBMITS` times: Dask reassigns a dead worker's tasks by itself until one has seen
    `distributed.scheduler.allowed-failures` workers die, then gives up with `KilledWorker`. The task's
    own failures come back as a failed state instead (the Dask future completed), already retried by
    Prefect: they are not submitted again."""
    for attempt in range(LOST_SHARD_RESUBMITS + 1):
        try:
            return future.result()
        except Exception as e:
            lost = getattr(future.wrapped_future, "status", None) in ("error", "lost")  # Dask futures only
            if not (lost and is_transient(e)) or attempt == LOST_SHARD_RESUBMITS:
                raise
            message = f"shard {shard.index} lost with its Dask worker ({type(e).__name__}: {e})"
            get_run_logger().warning("%s; submitting it again (%d/%d)", message, attempt + 1, LOST_SHARD_RESUBMITS)
            _mark_crashed(future.task_run_id, message)
            future = runner.submit(infer_shard_task, {"shard": shard, "spec": spec})


def _mark_crashed(task_run_id, message: str, wait_s: float = 5.0) -> None:
    """Mark a task run whose worker died as Crashed: its last state, Running, would stay for ever. Its
    states reach the API as events: wait a little for the run to be recorded (a worker killed as the
    task started may never have reported it; then there is nothing to mark)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_task_run(task_run_id)
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.5)
                continue
            # a state recorded later from an older event does not replace a newer one
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
            return


def task_of(task: str | None, model: ModelRef) -> str:
    """The task asked for, else the registered model's."""
    if task or model.task:
        return task or model.task
    raise ConfigError(f"model {model.source!r} is not a registered model, so its task is unknown: give --task")
