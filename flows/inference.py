"""Bulk pipeline inference over Parquet as a Prefect flow: plan → one task per shard → check → manifest."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import Field

from hfbatch.flows.params import PLAN, InferOptions, InferTask, Planned, parameter_model, task_options
from hfbatch.flows.status import SUMMARY_KEY
from hfbatch.tasks.batch.output import check_output_location, finalize, prepare_output, quarantine_files
from hfbatch.tasks.batch.prefect_tasks import infer_shard_task
from hfbatch.tasks.batch.runner import open_results, run_all
from hfbatch.tasks.batch.shards import InputFile, Shard, describe_input, plan_shards
from hfbatch.tasks.batch.spec import InferSpec, build_spec, output_for
from hfbatch.tasks.core.errors import ConfigError, is_transient
from hfbatch.tasks.core.models import resolve_model
from hfbatch.tasks.core.progress import ProgressLog, quiet_libraries
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.core.settings import Device, Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.engine.predictor import PredictorSpec
from hfbatch.tasks.predictors import canonical_task, get_predictor_class, predictor_classes
from hfbatch.tasks.prefect_tasks import monitor_task

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
    """The day this run was scheduled for (UTC), e.g. 2026-11-26; today outside a flow run."""
    from prefect.runtime import flow_run

    start = flow_run.scheduled_start_time if FlowRunContext.get() else None
    return start.date().isoformat() if start else time.strftime("%Y-%m-%d", time.gmtime())


DASK_LOCAL_WORKERS = 2
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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
    if task_runner == "threads":
        context = FlowRunContext.get()
        assert context is not None, "shard_runner runs in a flow run"
        yield context.task_runner
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


@dataclass(frozen=True)
class InferencePlan:
    """What a run works out before its first shard: the model, the input's files and shards, the spec."""

    settings: Settings
    model: ModelRef
    files: tuple[InputFile, ...]
    corrupt: tuple[dict, ...] | None
    """Input files that could not be read at all (quarantine mode), else None."""
    spec: InferSpec
    shards: tuple[Shard, ...]
    in_process: bool
    """The shards run on this process's threads (not on a Dask cluster)."""
    notes: tuple[str, ...] = ()
    """What the run's summary says of its configuration (a prompt template other than the trained one)."""


def plan_inference(p: Any) -> InferencePlan:
    """The checks before any work, and the run's first steps (`p`: the flow's parameters): the input's
    files listed and fingerprinted (footers only), the model resolved, the predictor's inputs matched to
    the input's schema, the shards cut, the output checked. Raises the `HfbatchError` that says what is
    wrong; loads no model."""
    if p.dask_address and p.task_runner != "dask":
        raise ConfigError(f"--dask-address ({p.dask_address!r}) needs --task-runner dask")
    settings = Settings().with_overrides(device=p.device)
    corrupt: list[dict] | None = [] if p.on_bad_row == "quarantine" else None
    files = describe_input(p.input, settings.storage_options(p.input), corrupt)
    store = Store.open(settings, p.store)
    ref = resolve_model(p.model, settings, store, p.gguf_file)
    task = canonical_task(task_of(p.task, ref))
    options = task_options(p.options, task, {t: c.options_class for t, c in predictor_classes().items()})
    options, notes = get_predictor_class(task).for_model(ref, options)
    predictor = PredictorSpec(get_predictor_class(task), ref, options, settings, p.precision)
    output = output_for(p.output, ref, _run_day())
    check_output_location(p.input, output)
    spec = build_spec(predictor, output, files, p.text_column, p.columns, p.keep_columns, p.batch_tokens,
                      p.on_bad_row, store.url if p.reuse_results else None)  # schema errors surface here
    shards = plan_shards(files, p.shard_rows)
    prepare_output(spec, files, p.mode, claim=False)
    return InferencePlan(settings, ref, tuple(files), None if corrupt is None else tuple(corrupt), spec, tuple(shards),
                         p.task_runner == "threads", tuple(notes))


# Two workers: while one shard computes (the model holds a lock, torch uses every core), the other
# reads or writes Parquet.
@flow(name="batch_inference", task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def batch_inference(
    model: str,
    input: str,
    output: str,
    task: InferTask | None = None,
    gguf_file: str | None = None,
    text_column: str = "text",
    columns: Annotated[dict[str, str] | None, Field(json_schema_extra={"metavar": "INPUT=COLUMN,..."})] = None,
    keep_columns: tuple[str, ...] | None = None,
    batch_tokens: Annotated[int, Field(ge=1)] | None = None,
    shard_rows: Annotated[int, Field(ge=1)] = 10_000,
    mode: Literal["resume", "overwrite", "error"] = "resume",
    on_bad_row: Literal["fail", "quarantine"] = "fail",
    precision: Literal["auto", "int8", "bf16"] = "auto",
    task_runner: Literal["threads", "dask"] = "threads",
    dask_address: str | None = None,
    store: str | None = None,
    drift_threshold: Annotated[float, Field(gt=0)] = 0.2,
    reuse_results: bool = True,
    device: Device | None = None,
    options: InferOptions | None = None,
    plan: Planned = None,
) -> dict:
    """Run `model` over the Parquet rows of `input` and write predictions as Parquet parts plus
    `_manifest.json` to `output`.

    A rerun into the same `output` computes only the shards not committed yet (`mode="resume"`, which
    refuses an output written from other input content, model or configuration). Bad rows fail the run
    or, with `on_bad_row="quarantine"`, go to `_quarantine/` with the reason (with the rows of a row group
    whose data cannot be decoded, and unreadable input files in `_quarantine/_files.parquet`). An output
    inside the input is refused. `output` may hold `{date}` (the day the run was scheduled for) and
    `{model_version}`, e.g. `s3://bucket/predictions/{date}/v{model_version}`: a scheduled run that
    resolves `NAME` to a new champion then writes to a new place. With `task_runner="dask"` the workers of
    a remote cluster need this package, access to the model, `input` and `output` (e.g. `s3://`), and a
    Prefect API they can reach (`PREFECT_API_URL`; without it, this process's temporary server).

    Args:
        model: NAME[@VERSION] from the registry, a local directory or a hub id
        input: Parquet file, directory, glob or s3:// prefix
        output: output directory or s3:// prefix; may hold {date} and {model_version}
        task: the ML task (default: the registered model's)
        gguf_file: with a hub id: the repository's GGUF file to convert and run
        text_column: column of the input text
        columns: task inputs to columns, e.g. question=q,context=c
        keep_columns: input columns copied to the output (default: id or idx; a stable row_id is always added)
        batch_tokens: token budget of one model batch (default: 4096 on CPU, 65536 on CUDA)
        shard_rows: target rows per shard
        mode: resume: continue the same input, model and configuration, refuse anything else; overwrite:
            replace what the output holds; error: refuse a non-empty output
        on_bad_row: stop at a bad row, or set bad rows aside in _quarantine/
        precision: auto: exact (fp32 on CPU, bf16/fp16 on CUDA); int8: quantized linear layers on CPU,
            faster, approximate scores (text classification scores close calls again in fp32); bf16: the model
            in bf16 on a CPU with bf16 units (AVX512-BF16, AMX), faster, approximate scores
        task_runner: run the shards on this process's threads, or on a Dask cluster (prefect-dask)
        dask_address: with task_runner dask: a scheduler, e.g. tcp://host:8786 (default: a temporary
            LocalCluster of 2 worker processes)
        store: artifact store URL holding the model registry (default: $HFBATCH_STORE or ./hfbatch-store)
        drift_threshold: a registered model's run has drifted where the PSI of a prediction figure against
            the version's evaluation reference is above this
        reuse_results: copy the result of every row an earlier run computed with the same model, options
            and input values (kept in the store's results/), computing only the others; each row computed
            here is kept for later runs. Every configuration is deterministic (sampling is seeded, each row
            by its id), so this is on unless turned off
        device: auto: CUDA when torch sees a GPU, else CPU; cpu; cuda: fail without a GPU (default:
            $HFBATCH_DEVICE or auto)
        options: each task's inference options, under its name (e.g. question_answering)
        plan: the run's plan (`plan_inference`), when the caller has worked it out
    """
    started = time.perf_counter()
    if plan is None:
        given = {k: v for k, v in locals().items() if k not in (PLAN, "started")}
        plan = plan_inference(InferParams.model_construct(**given))
    quiet_libraries(Settings().verbose)
    logger = get_run_logger()
    spec, shards, files, ref = plan.spec, list(plan.shards), list(plan.files), plan.model
    corrupt = None if plan.corrupt is None else list(plan.corrupt)
    prepare_output(spec, files, mode)
    quarantine_files(spec, corrupt)
    spec = open_results(spec)
    logger.info("%s: %d rows in %d files, %d shards; model %s %s", spec.task, sum(s.num_rows for s in shards),
                len(files), len(shards), spec.model_name, spec.model_version)
    progress: Any = create_progress_artifact(0.0, key="batch-inference-progress",
                                             description=f"Shards of {spec.output}")  # its id (sync here)
    total = sum(s.num_rows for s in shards)
    _notify({"done": 0, "shards": len(shards), "rows_done": 0, "rows": total, "skipped": False})
    finished = {"shards": 0, "rows": 0}
    lines = ProgressLog("batch inference", total, "rows", Settings().progress_interval)  # without a terminal

    def report(shard: Shard, entry: dict) -> None:
        finished["shards"] += 1
        finished["rows"] += shard.num_rows
        lines.update(finished["rows"], extra=f"{finished['shards']}/{len(shards)} shards"
                     + (f", {entry.get('rows_reused', 0)} rows reused" if entry.get("rows_reused") else ""))
        update_progress_artifact(progress, 100.0 * finished["shards"] / len(shards))
        _notify({"done": finished["shards"], "shards": len(shards), "rows_done": finished["rows"], "rows": total,
                 "skipped": bool(entry.get("skipped"))})

    with shard_runner(task_runner, dask_address) as runner:
        # the batch job's loop (`runner.run_all`), each shard a task on the chosen runner (what
        # `infer_shard_task.submit(shard, spec, wait)` does)
        entries = run_all(shards, lambda s, wait: runner.submit(infer_shard_task, {"shard": s, "spec": spec,
                                                                                  "wait": wait}),
                          lambda s, future, wait: shard_result(runner, future, s, spec, wait), report)
    manifest = finalize(spec, files, shards, entries, time.perf_counter() - started, corrupt)
    computed = [e for e in entries if not e.get("skipped")]
    seconds = manifest["seconds"] or float("inf")
    rows_per_s = sum(e["rows"] + e["quarantined"] for e in computed) / seconds
    tokens_per_s = sum(e["tokens"] + e.get("output_tokens", 0) for e in computed) / seconds
    summary = {"output": spec.output, "task": spec.task, "model": spec.model_name,
               "model_version": spec.model_version, "rows": manifest["rows_in"], "rows_out": manifest["rows_out"],
               "quarantined": manifest["quarantined"], "corrupt_files": len(manifest["corrupt_files"]),
               "shards": manifest["shards"],
               "shards_skipped": manifest["shards_skipped"], "rows_per_s": round(rows_per_s, 1),
               "seconds": manifest["seconds"], "input_tokens": manifest["input_tokens"],
               "output_tokens": manifest["output_tokens"], "tokens_per_s": round(tokens_per_s, 1),
               "output_tokens_per_s": round(sum(e.get("output_tokens", 0) for e in computed) / seconds, 1),
               "cut_at_limit": manifest["cut_at_limit"], "rows_reused": manifest["rows_reused"],
               "rows_computed": manifest["rows_computed"], "seconds_saved": manifest["seconds_saved"],
               "input_fingerprint": manifest["input_fingerprint"]}
    if plan.notes:
        summary["notes"] = "; ".join(plan.notes)
        logger.info("%s", summary["notes"])
    if ref.name and ref.version:  # a registered model: record the run, compare with its reference
        run = monitor_task(summary, manifest, ref, Store.open(plan.settings, store), drift_threshold)
        summary["drifted"] = run["drifted"]
        summary["max_psi"] = max(run["drift"].values(), default=None)
        if run["drifted"]:
            logger.warning("predictions drifted from %s v%s's evaluation: %s", ref.name, ref.version,
                           ", ".join(f"{k} PSI {run['drift'][k]:.3f}" for k in run["drifted"]))
    create_table_artifact(key=SUMMARY_KEY, table=[summary],
                          description=f"{spec.task} with {spec.model_name} {spec.model_version}")
    logger.info("%d rows → %s (%d quarantined, %d/%d shards skipped, %.1f rows/s; tokens in %d, out %d, %.1f/s)",
                summary["rows"], spec.output, summary["quarantined"], summary["shards_skipped"], summary["shards"],
                rows_per_s, summary["input_tokens"], summary["output_tokens"], tokens_per_s)
    if summary["cut_at_limit"]:
        logger.warning("%d answers stopped at the new-token limit (finish_reason 'length'): incomplete%s",
                       summary["cut_at_limit"], ", their generated_json null" if "generated_json" in
                       spec.predictor.output_schema().names else "")
    return summary


InferParams = parameter_model(batch_inference)
"""The parameters of `batch_inference` as one model (what `plan_inference` takes)."""


LOST_SHARD_RESUBMITS = 3


def shard_result(runner: TaskRunner, future, shard, spec, wait: bool = True) -> dict | None:
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
            future = runner.submit(infer_shard_task, {"shard": shard, "spec": spec, "wait": wait})
    raise AssertionError("unreachable: the last attempt returns or raises")


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
        return task or model.task  # type: ignore[return-value]
    raise ConfigError(f"model {model.source!r} is not a registered model, so its task is unknown: give --task")
