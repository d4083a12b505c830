"""Helpers the tests share: plain-function entry points with the test settings, tiny local models, and
what a flow run did, read back from the Prefect API."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from hfbatch.tasks.batch import runner
from hfbatch.tasks.core.models import resolve_model as resolve
from hfbatch.tasks.core.options import validated
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine.predictor import PredictorSpec
from hfbatch.tasks.predictors import get_predictor_class

SETTINGS = Settings()  # conftest.py keeps hfbatch on the CPU (HFBATCH_DEVICE=cpu)
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def resolve_model(src: str):
    return resolve(src, SETTINGS)


def predictor_spec(task: str, model, precision: str = "auto", options=None, settings: Settings = SETTINGS,
                   **values) -> PredictorSpec:
    """What `batch_inference` hands the batch job for `task`: its predictor with these options (an options
    object, or its fields as keyword arguments)."""
    cls = get_predictor_class(task)
    return PredictorSpec(cls, model, options if options is not None else validated(cls.options_class, values),
                         settings, precision)


JOB_OPTIONS = ("shard_rows", "mode", "text_column", "columns", "keep_columns", "batch_tokens", "on_bad_row",
               "results")


def run_local(task: str, model, input: str, output: str, options=None, precision: str = "auto", **kwargs) -> dict:
    """The batch job without Prefect; `kwargs` are its own options and the task's (`top_k=3`)."""
    job = {k: v for k, v in kwargs.items() if k in JOB_OPTIONS}
    values = {k: v for k, v in kwargs.items() if k not in JOB_OPTIONS}
    return runner.run_local(predictor_spec(task, model, precision, options, **values), input, output, **job)


def predictor(task: str, model, precision: str = "auto", **options):
    """The predictor `batch_inference` uses for `task`, with these options."""
    return predictor_spec(task, model, precision, **options).load()


def texts_of(path) -> list[str]:
    return pq.read_table(path).column("text").to_pylist()


def tiny(minilm, path: Path, cls_name: str, **config) -> str:
    import torch
    import transformers
    from transformers import AutoTokenizer, BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, **config)
    getattr(transformers, cls_name)(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(path)
    return str(path)


def tiny_qa(minilm, path: Path) -> str:
    """A tiny random BertForQuestionAnswering whose weights come from numpy's seeded generator (not from
    torch's or transformers' initialisation), so they are the same bytes under any library version,
    with a large-variance span head: peaked start/end logits, answers far from ties."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64)
    model = BertForQuestionAnswering(cfg)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "LayerNorm" in name:
                values = (name.endswith("weight") + rng.normal(0, 0.05, param.shape))
            else:
                values = rng.normal(0, 1.0 if name.startswith("qa_outputs") else 0.1, param.shape)
            param.copy_(torch.from_numpy(values.astype(np.float32)))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(path)
    return str(path)



def task_states(flow_run_id) -> dict[str, list[str]]:
    """{task name: [state name of each of its runs]} for one flow run, e.g. {"ingest": ["Cached"]}."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def artifact_keys(prefix: str) -> set[str]:
    """The keys of the server's artifacts that start with `prefix` (filtered by the server: a session's
    tests make more artifacts than one unfiltered page holds)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=f"{prefix}%")))
        return {a.key for a in found if a.key}


def start_process(cmd: list, env: dict, log: Path) -> subprocess.Popen:
    """A server or worker process of a test, in a session of its own, its output in `log`."""
    return subprocess.Popen([str(c) for c in cmd], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop `start_process`'s process and its children with `signum`, SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signum)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def call_flow(flow, return_state: bool = False, **values):
    """`flow` called as the command line calls it, with flat option values (`epochs=3`,
    `question_column="q"`): the hyperparameters under `training`, the task's options under `options`."""
    from hfbatch.flows.commands import command_task
    from hfbatch.flows.params import flow_values

    command = {"train": "train", "evaluate": "evaluate", "batch_inference": "infer"}[flow.name]
    kwargs = flow_values(flow, values, command_task(command, values))
    return flow(**kwargs, return_state=return_state) if return_state else flow(**kwargs)
