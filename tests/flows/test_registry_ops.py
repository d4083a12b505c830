"""`hfbatch promote` / `hfbatch rollback` on real registries (a local store and one on moto's S3 server),
run as Prefect flows against the test Prefect API: the history, the aliases, the `hfbatch.model.promoted`
events, the refusal of a version whose files changed, the next batch-inference run's champion, and
promotions racing registrations without losing either."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pyarrow.parquet as pq
import pytest

from hfbatch.flows.cli import main
from hfbatch.flows.registry import promote_flow
from hfbatch.flows.status import collect_status, format_status
from hfbatch.tasks.core.errors import ModelError
from hfbatch.tasks.core.models import resolve_model
from hfbatch.tasks.core.refs import EvalResult, TrainedModel
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.events import PROMOTED, operator
from tests.helpers import call_flow, tiny


@pytest.fixture(scope="module")
def tiny_classifier(minilm, tmp_path_factory) -> str:
    return tiny(minilm, tmp_path_factory.mktemp("tiny") / "classifier", "BertForSequenceClassification",
                id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})


def _register(store: Store, name: str, run_key: str, accuracy: float,
              model_dir: str | None = None):
    """Register a trained run (the tiny classifier's files, or a small stand-in file) with the given eval
    accuracy, as the train flow's register step does."""
    key = f"runs/{run_key}/model"
    with store.staging(key) as tmp:
        if model_dir:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        else:
            (tmp / "model.safetensors").write_bytes(run_key.encode() * 64)
    trained = TrainedModel(store=store.url, key=key, run_key=run_key, task="text-classification", base_model="tiny",
                           base_revision=None, base_fingerprint="b" * 8, dataset_fingerprint="d" * 8,
                           label_names=("neg", "pos"), config={"epochs": 1}, device="cpu", precision="fp32",
                           global_step=10, resumed_from_step=0, train_samples=100, train_samples_per_second=1.0,
                           train_loss=0.5)
    evaluation = EvalResult(store=store.url, key=f"evals/{run_key}", model=key, model_fingerprint="f",
                            dataset_fingerprint="E1", num_rows=800, label_names=("neg", "pos"),
                            metrics={"accuracy": accuracy})
    return Registry(store, name).register(trained, evaluation)


def _cli(capsys, *args: str) -> tuple[int, dict | None, str]:
    """Run `hfbatch ARGS --json`: exit status, the JSON printed (None on an error) and stderr."""
    capsys.readouterr()
    rc = main([*args, "--json"])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if rc == 0 else None, err


def _promoted_events(name: str, count: int, timeout: float = 60) -> list:
    """The `hfbatch.model.promoted` events of model `name` in the Prefect API, oldest first, once there
    are `count` (events reach the API asynchronously)."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=EventFilter(
                event=EventNameFilter(name=[PROMOTED]), resource=EventResourceFilter(id=[f"hfbatch.model.{name}"])),
                limit=50).events
        if len(events) >= count or time.time() > deadline:
            return sorted(events, key=lambda e: e.occurred)
        time.sleep(1)


def test_promote_rollback_aliases_history_and_next_inference(prefect_harness, tiny_classifier, data_dir, tmp_path,
                                                             capsys):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import ArtifactSort

    from hfbatch.flows.inference import batch_inference

    name, store = "ops-local", Store(str(tmp_path / "store"))
    gate = [_register(store, name, f"r{i}", acc, tiny_classifier).promoted
            for i, acc in enumerate([0.80, 0.78, 0.85, 0.70], 1)]
    assert gate == [True, False, True, False]
    registry = Registry(store, name)
    settings = Settings()
    assert {alias: resolve_model(f"{name}@{alias}", settings, store).version
            for alias in ("champion", "challenger", "previous")} == {"champion": "3", "challenger": "4", "previous": "1"}

    rc, promoted, err = _cli(capsys, "promote", f"{name}@2", "--reason", "better on this week's data",
                             "--store", store.url)
    assert rc == 0, err
    assert (promoted["champion"], promoted["previous"], promoted["action"]) == ("2", "3", "promote")
    assert promoted["by"] == operator() and promoted["aliases"] == {"champion": "2", "challenger": "4", "previous": "3"}
    last = registry.load()["history"][-1]
    assert {k: last[k] for k in ("champion", "previous", "action", "reason", "by")} == {
        "champion": "2", "previous": "3", "action": "promote", "reason": "better on this week's data",
        "by": operator()}

    # the next batch-inference run takes the new champion by the name alone
    data = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 16), data)
    result = call_flow(batch_inference, model=name, task="text-classification", input=str(data),
                             output=str(tmp_path / "out-{model_version}"), store=store.url)
    assert (result["model_version"], result["rows_out"]) == ("2", 16)

    # rollback without --to goes back along the champions: v3 (which v2 replaced), then v1, then nowhere
    rc, back, err = _cli(capsys, "rollback", name, "--reason", "v2 mislabels negations", "--store", store.url)
    assert rc == 0, err
    assert (back["champion"], back["previous"], back["action"]) == ("3", "2", "rollback")
    assert back["aliases"]["previous"] == "1"
    rc, back, err = _cli(capsys, "rollback", name, "--reason", "v3 too", "--store", store.url)
    assert rc == 0 and back["champion"] == "1", err
    rc, _, err = _cli(capsys, "rollback", name, "--reason", "again", "--store", store.url)
    assert rc == 2 and "no earlier champion to roll back to" in err and "Traceback" not in err
    rc, back, err = _cli(capsys, "rollback", name, "--to", "3", "--reason", "v3 was fine after all",
                         "--store", store.url)
    assert rc == 0 and (back["champion"], back["previous"]) == ("3", "1"), err
    rc, _, err = _cli(capsys, "promote", f"{name}@3", "--store", store.url)
    assert rc == 2 and "v3 is the champion already" in err
    rc, _, err = _cli(capsys, "promote", f"{name}@9", "--store", store.url)
    assert rc == 2 and "has no version '9'" in err
    rc, _, err = _cli(capsys, "promote", "no-such-model@1", "--store", store.url)
    assert rc == 2 and "'no-such-model' is not registered" in err

    history = registry.load()["history"]
    assert [(h.get("action", "gate"), h["champion"], h["previous"]) for h in history] == [
        ("gate", "1", None), ("gate", "3", "1"), ("promote", "2", "3"), ("rollback", "3", "2"),
        ("rollback", "1", "3"), ("rollback", "3", "1")]
    # every change by hand emitted an event, with the run that made it as a related resource
    events = _promoted_events(name, 4)
    assert [(e.payload["version"], e.payload["previous"], e.payload["action"]) for e in events] == [
        ("2", "3", "promote"), ("3", "2", "rollback"), ("1", "3", "rollback"), ("3", "1", "rollback")]
    assert events[0].payload["reason"] == "better on this week's data" and events[0].payload["by"] == operator()
    assert all(e.resource.id == f"hfbatch.model.{name}" for e in events)
    assert all(any(r.id.startswith("prefect.flow-run.") for r in e.related) for e in events)

    # the flow runs show in the API with their parameters; status and the artifact show the history
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["promote"])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[f"{name}-champion"])), sort=ArtifactSort.CREATED_DESC)
    run = next(r for r in runs if r.parameters.get("name") == name and r.state.is_completed())
    assert run.parameters["version"] == "2" and run.parameters["reason"] == "better on this week's data"
    assert run.name == f"promote {name}@2"
    assert len(artifacts) == 4  # one version of the artifact per change
    assert "champion v3" in artifacts[0].data and "| rollback | v3 | v1 | " + operator() in artifacts[0].data
    [model] = collect_status(settings, store.url)["models"]
    assert model["aliases"] == {"champion": "3", "challenger": "4", "previous": "1"}
    assert [h["action"] for h in model["history"]] == ["gate", "gate", "promote", "rollback", "rollback", "rollback"]
    text = format_status({"store": store.url, "models": [model], "flows": []})
    assert "aliases: challenger v4, previous v1" in text
    assert "rollback → v3 (was v1) by " + operator() + ": v3 was fine after all" in text


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_version_whose_files_changed_is_refused(prefect_harness, where, request, tmp_path, capsys):
    if where == "s3":
        request.getfixturevalue("s3")
    store = Store(str(tmp_path / "store") if where == "local" else "s3://hfbatch/store")
    name = f"ops-corrupt-{where}"
    for i, acc in enumerate([0.80, 0.70, 0.75], 1):
        _register(store, name, f"r{i}", acc)
    registry = Registry(store, name)
    store.fs.pipe_file(store.path(f"{registry.version_key('2')}/model.safetensors"), b"replaced")

    rc, _, err = _cli(capsys, "promote", f"{name}@2", "--reason", "try", "--store", store.url)
    assert rc == 2 and "Traceback" not in err
    assert "refusing to promote v2" in err and "model.safetensors" in err and "sha256" in err
    with pytest.raises(ModelError, match="refusing to promote v2"):  # the flow refuses it by itself too
        promote_flow(name=name, version="2", store=store.url)
    # a rollback to it likewise; an intact version is promoted (by its alias), and rolled back from
    rc, _, err = _cli(capsys, "rollback", name, "--to", "2", "--reason", "try", "--store", store.url)
    assert rc == 2 and "refusing to roll back to v2" in err
    rc, out, err = _cli(capsys, "promote", f"{name}@challenger", "--store", store.url)
    assert rc == 0 and (out["champion"], out["previous"], out["reason"]) == ("3", "1", "promoted by hand"), err
    rc, out, err = _cli(capsys, "rollback", name, "--reason", "v3 is slower", "--store", store.url)
    assert rc == 0 and out["champion"] == "1", err
    assert [h["champion"] for h in registry.load()["history"]] == ["1", "3", "1"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_promotions_and_registrations_lose_nothing(where, request, tmp_path):
    """Promotions by hand (`Registry.set_champion`, what the flows call) race registrations of new
    versions: every version and every champion change ends up in the registry."""
    if where == "s3":
        request.getfixturevalue("s3")
    url = str(tmp_path / "store") if where == "local" else "s3://hfbatch/store"
    name = "ops-race"
    _register(Store(url), name, "r1", 0.80)
    _register(Store(url), name, "r2", 0.70)
    start, errors = threading.Barrier(4), []

    def promote() -> None:
        start.wait()
        for i in range(8):  # v2, v1, v2, ...: each a change
            Registry(Store(url), name).set_champion("2" if i % 2 == 0 else "1", "promote", f"flip {i}", "test")

    def register(worker: int) -> None:
        start.wait()
        for i in range(3):  # never promoted by the gate: the champion changes by hand only
            _register(Store(url), name, f"w{worker}-{i}", 0.50)

    def run(fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(promote,))]
    threads += [threading.Thread(target=run, args=(register, w)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    index = Registry(Store(url), name).load()
    assert sorted(int(v["version"]) for v in index["versions"]) == list(range(1, 12))
    assert sorted(v["run_key"] for v in index["versions"]) == sorted(
        ["r1", "r2"] + [f"w{w}-{i}" for w in range(3) for i in range(3)])
    assert [h["reason"] for h in index["history"]] == ["first version"] + [f"flip {i}" for i in range(8)]
    assert index["champion"] == "1" and not any(v["promoted"] for v in index["versions"][1:])
