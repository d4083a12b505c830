"""Dashboard artifacts of a registered model: the loss-curve PNG and the model card, published through a
real Prefect API (no training: a real Trainer log history and a real model card stand in for one)."""
import base64
import io
import json
import re
import uuid

import pytest
from prefect import flow

from hfbatch.tasks.artifacts import card_markdown, publish_dashboard, publish_training_artifacts
from hfbatch.tasks.core.card import write_model_card
from hfbatch.tasks.core.plots import loss_curve_png, loss_points
from hfbatch.tasks.core.refs import EvalResult, TrainedModel
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.prefect_tasks import register_task

# `train_log.json` of the 5-step run in test_train.py (logging_steps=2): the Trainer's log_history
LOG_HISTORY = [
    {"loss": 0.6946556568145752, "grad_norm": 0.5447663068771362, "learning_rate": 4e-05, "epoch": 0.4, "step": 2},
    {"loss": 0.69144606590271, "grad_norm": 0.8709468245506287, "learning_rate": 2e-05, "epoch": 0.8, "step": 4},
    {"train_runtime": 23.8948, "train_samples_per_second": 3.348, "train_steps_per_second": 0.209,
     "total_flos": 157537595904.0, "train_loss": 0.6937498092651367, "epoch": 1.0, "step": 5},
]
# a run shorter than logging_steps (2 steps, logging every 50) logs only the final summary
SHORT_LOG_HISTORY = [{"train_runtime": 3.1, "train_samples_per_second": 20.6, "train_steps_per_second": 0.64,
                      "total_flos": 1.0e9, "train_loss": 0.7012, "epoch": 1.0, "step": 2}]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a PNG must start with."""
    assert png[:8] == PNG_MAGIC and png[12:16] == b"IHDR"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


@pytest.mark.parametrize("log_history", [LOG_HISTORY, SHORT_LOG_HISTORY, []], ids=["logged", "short", "empty"])
def test_loss_curve_png_is_a_small_decodable_png(log_history):
    import matplotlib.image

    png = loss_curve_png(log_history, title="sst2 v1: training loss")
    assert png_size(png) == (480, 240)  # 6x3 inches at 80 dpi
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert pixels.shape[:2] == (240, 480)
    assert pixels.min() < pixels.max()  # something was drawn
    assert len(png) < 60_000
    assert loss_curve_png(log_history, title="sst2 v1: training loss") == png  # deterministic


def test_loss_points_are_the_logged_steps_only():
    assert loss_points(LOG_HISTORY) == [(2, 0.6946556568145752), (4, 0.69144606590271)]
    assert loss_points(SHORT_LOG_HISTORY) == [] and loss_points([{"loss": float("nan"), "step": 1}]) == []


def test_card_front_matter_becomes_a_code_block():
    card = "---\nlibrary_name: transformers\ntags: [hfbatch]\n---\n\n# m v1\n\ntext\n"
    assert card_markdown(card) == "```yaml\nlibrary_name: transformers\ntags: [hfbatch]\n```\n\n# m v1\n\ntext\n"
    assert card_markdown("# no front matter\n") == "# no front matter\n"


def _trained(store: Store, run_key: str, log_history: list) -> TrainedModel:
    """A trained model committed to `store` as train() leaves it (weights aside): train_log.json + card."""
    trained = TrainedModel(
        store=store.url, key=f"runs/{run_key}/model", run_key=run_key, task="text-classification",
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        base_revision=None, base_fingerprint="f" * 16, dataset_fingerprint="d" * 16, label_names=("negative", "positive"),
        config={"batch_size": 16, "epochs": 1.0, "learning_rate": 5e-05}, device="cpu", precision="fp32", global_step=5,
        resumed_from_step=0, train_samples=80, train_samples_per_second=3.348, train_loss=LOG_HISTORY[-1]["train_loss"])
    with store.staging(trained.key) as tmp:
        (tmp / "train_log.json").write_text(json.dumps(log_history))
        write_model_card(tmp, trained)
    return trained


def _evaluated(store: Store) -> EvalResult:
    return EvalResult(store=store.url, key="evals/x", model="m", model_fingerprint="m" * 16,
                      dataset_fingerprint="e" * 16, num_rows=800, label_names=("negative", "positive"),
                      metrics={"accuracy": 0.5, "f1": 0.4})


def _latest_artifacts(*keys: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))))
    latest = {}
    for artifact in sorted(found, key=lambda a: a.created):
        latest[artifact.key] = artifact
    return latest


def test_publish_training_artifacts_creates_loss_curve_and_card(prefect_harness, tmp_path):
    store = Store(str(tmp_path / "store"))
    name = f"Plots_{uuid.uuid4().hex[:8]}"  # a key of its own in the session's Prefect API
    reg = Registry(store, name).register(_trained(store, "r1", LOG_HISTORY), _evaluated(store))

    @flow(name="publish-test")
    def publish():
        return publish_training_artifacts(store, name, reg.version)

    published = publish()

    slug = name.lower().replace("_", "-")
    keys = {f"{slug}-loss-curve", f"{slug}-model-card"}
    assert set(published) == keys
    artifacts = _latest_artifacts(*keys)
    assert set(artifacts) == keys and all(a.type == "markdown" and a.flow_run_id for a in artifacts.values())

    png_path = tmp_path / "store" / "models" / name / "1" / "loss_curve.png"
    png = png_path.read_bytes()
    assert png_size(png) == (480, 240)
    curve = artifacts[f"{slug}-loss-curve"]
    assert curve.description == f"Training loss of {name} v1"
    embedded = re.search(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", curve.data)
    assert embedded and base64.b64decode(embedded.group(1)) == png  # the UI shows it without the store
    assert f"`{store.uri(f'models/{name}/1/loss_curve.png')}`" in curve.data
    assert "0.6947 at step 2 → 0.6914 at step 4 (2 points)" in curve.data and "mean training loss: 0.6937" in curve.data
    assert not list(png_path.parent.glob("*.tmp-*"))  # written atomically

    card = artifacts[f"{slug}-model-card"]
    readme = (png_path.parent / "README.md").read_text()
    assert card.data == card_markdown(readme) and card.data.startswith("```yaml\n")
    assert "\nlibrary_name: transformers\n" in card.data.split("```", 2)[1]
    assert f"# {name} v1" in card.data and "| accuracy | 0.5000 |" in card.data
    assert card.description == f"Model card of {name} v1"


def test_register_task_publishes_dashboard_artifacts_for_a_short_run(prefect_harness, tmp_path):
    """The task the train flow calls publishes registration, loss curve and card, even for a run that
    logged no per-step loss (the flow tests' 2-step run)."""
    store = Store(str(tmp_path / "store"))
    name = f"short-{uuid.uuid4().hex[:8]}"
    trained, evaluated = _trained(store, "r2", SHORT_LOG_HISTORY), _evaluated(store)

    @flow(name="register-test")
    def register():
        return register_task(trained, evaluated, store, name, "accuracy", 0.0, None)

    reg = register()
    assert (reg.version, reg.promoted) == ("1", True)
    keys = {f"{name}-registration", f"{name}-loss-curve", f"{name}-model-card", f"{name}-dashboard"}
    artifacts = _latest_artifacts(*keys)
    assert set(artifacts) == keys
    assert "no per-step loss logged" in artifacts[f"{name}-loss-curve"].data
    assert "no batch-inference runs recorded yet" in artifacts[f"{name}-dashboard"].data
    assert all(a.task_run_id and a.flow_run_id for a in artifacts.values())  # created inside the task run
    png = (tmp_path / "store" / "models" / name / "1" / "loss_curve.png").read_bytes()
    assert png_size(png) == (480, 240)


def test_publish_training_artifacts_on_s3_store(prefect_harness, s3):
    """On an S3 store (a real S3 server, moto) the PNG is PUT next to the version's files and the card
    is read from S3."""
    import s3fs

    store = Store("s3://hfbatch/store")
    name = f"s3-{uuid.uuid4().hex[:8]}"
    reg = Registry(store, name).register(_trained(store, "r3", LOG_HISTORY), _evaluated(store))

    @flow(name="publish-s3-test")
    def publish():
        return publish_training_artifacts(store, name, reg.version)

    published = publish()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    png = fs.cat_file(f"hfbatch/store/models/{name}/1/loss_curve.png")
    assert png_size(png) == (480, 240)
    assert f"`s3://hfbatch/store/models/{name}/1/loss_curve.png`" in published[f"{name}-loss-curve"]
    assert f"# {name} v1" in published[f"{name}-model-card"]
    assert set(_latest_artifacts(*published)) == set(published)


def test_confusion_matrix_heatmap_and_learning_rate_are_drawn():
    import matplotlib.image
    import numpy as np

    from hfbatch.tasks.core.plots import confusion_png

    png = confusion_png(["negative", "positive"], [[300, 50], [40, 410]])
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert png_size(png)[0] > 200 and pixels[..., :3].std() > 0.1  # a drawn heatmap, not a blank canvas
    with_lr = loss_curve_png(LOG_HISTORY)
    without = loss_curve_png([{k: v for k, v in e.items() if k != "learning_rate"} for e in LOG_HISTORY])
    assert with_lr != without and png_size(with_lr) == png_size(without) == (480, 240)
    assert np.asarray(matplotlib.image.imread(io.BytesIO(with_lr), format="png")).shape == (240, 480, 4)


def test_dashboard_with_versions_whose_metrics_differ(prefect_harness):
    """A version registered before a metric was added (no `f1`), one with a NaN, and inference runs with
    and without a reference: the dashboard draws the trend and lists runs and drift (the case a
    registration once failed on)."""
    name = f"dash-{uuid.uuid4().hex[:8]}"
    index = {"name": name, "champion": "3", "history": [
        {"time": "2026-11-29T10:00:00", "champion": "1", "previous": None, "reason": "first version"},
        {"time": "2026-11-29T12:00:00", "champion": "3", "previous": "1", "reason": "better", "action": "promote",
         "by": "ops@host"}], "versions": [
        {"version": "1", "created": "2026-11-29T10:00:00", "metrics": {"accuracy": 0.8}, "promoted": True,
         "reason": "first version"},
        {"version": "2", "created": "2026-11-29T11:00:00", "metrics": {"accuracy": 0.5, "f1": 0.4},
         "promoted": False, "reason": "not better"},
        {"version": "3", "created": "2026-11-29T12:00:00", "metrics": {"accuracy": 0.9, "f1": float("nan")},
         "promoted": True, "reason": "better"}]}
    runs = [{"time": "2026-11-29T13:00:00", "flow_run": "calm-fox", "version": "3", "rows": 800, "rows_per_s": 61.2,
             "rows_reused": 750, "seconds_saved": 42.3,
             "quarantine_rate": 0.0025, "drift": {"label": 3.1, "score": 0.05}, "drifted": ["label"], "reference": True},
            {"time": "2026-11-29T14:00:00", "flow_run": None, "version": "3", "rows": 10, "rows_per_s": 5.0,
             "quarantine_rate": 0.0, "drift": {}, "drifted": [], "reference": False}]

    @flow(name="dashboard-test")
    def publish():
        return publish_dashboard(name, index, runs)

    markdown = publish()
    assert markdown == _latest_artifacts(f"{name}-dashboard")[f"{name}-dashboard"].data
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown).group(1))
    assert png_size(png) == (480, 208)
    assert "| v3 (champion) |" in markdown and "accuracy 0.8000" in markdown
    assert "| 2026-11-29T13:00:00 | calm-fox | v3 | 800 | 750 | 42.3 s | 61.2 | 0 | 0 | 0.0 | 0.25 % | 3.100 | label |" in markdown
    assert "| 2026-11-29T14:00:00 | - | v3 | 10 | 0 | 0.0 s | 5.0 | 0 | 0 | 0.0 | 0.00 % | 0.000 | no reference |" in markdown
    assert "| 2026-11-29T12:00:00 | promote | v3 | v1 | ops@host | better |" in markdown
    drift = re.search(r"## Drift\n\n!\[[^]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert png_size(base64.b64decode(drift.group(1))) == (720, 224)


def test_drift_chart_shows_psi_over_runs_and_the_shares_that_moved(prefect_harness, tmp_path):
    """The dashboard's drift chart, read back from a real Prefect server: PSI per figure over the runs and
    the label shares of the version's reference beside the latest run's (a chart with shares differs from
    one without: the bars are drawn)."""
    from hfbatch.tasks.core import monitoring

    name, store = f"drift-{uuid.uuid4().hex[:8]}", Store(str(tmp_path / "store"))
    reference = {"label": monitoring.shares(["POSITIVE"] * 60 + ["NEGATIVE"] * 40)}
    index = {"name": name, "champion": "1", "history": [], "versions": [
        {"version": "1", "created": "2026-11-29T10:00:00", "metrics": {"accuracy": 0.8}, "promoted": True,
         "reason": "first version", "reference": reference}]}
    runs = [{"time": f"2026-11-29T1{i}:00:00", "flow_run": f"run-{i}", "version": "1", "rows": 100,
             "rows_per_s": 50.0, "quarantine_rate": 0.0, "drift": {"label": psi}, "drifted": ["label"] if psi > 0.2
             else [], "reference": True, "figures": {"label": {"POSITIVE": share, "NEGATIVE": round(1 - share, 4)}}}
            for i, (psi, share) in enumerate([(0.01, 0.58), (0.08, 0.45), (0.35, 0.2)])]

    @flow(name="dashboard-test")
    def publish(index: dict, runs: list):
        return publish_dashboard(name, index, runs, store)

    markdown = publish(index, runs)
    assert markdown == _latest_artifacts(f"{name}-dashboard")[f"{name}-dashboard"].data
    section = markdown.split("## Drift", 1)[1].split("##", 1)[0]
    with_shares = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", section).group(1))
    assert png_size(with_shares) == (720, 224)
    without = plots_drift(runs, None)
    assert with_shares != without and png_size(without) == (720, 224)
    assert len(store.list(f"models/{name}/_charts")) == 2  # the metric trend and the drift chart, kept
    assert "no drift recorded yet" in publish(index, [])


def plots_drift(runs, reference):
    from hfbatch.tasks.core import plots

    return plots.drift_png(runs, reference, 0.2, "x")


def test_dashboard_chart_is_drawn_once_per_set_of_versions(prefect_harness, tmp_path, monkeypatch):
    """With the registry's store, a republished dashboard whose versions did not change (an inference run
    adds a run, not a version) reuses the chart it drew; a new version or metric draws a new one."""
    from hfbatch.tasks.core import plots

    name, store = f"dash-{uuid.uuid4().hex[:8]}", Store(str(tmp_path / "store"))
    index = {"name": name, "champion": "1", "history": [], "versions": [
        {"version": "1", "created": "2026-11-29T10:00:00", "metrics": {"accuracy": 0.8}, "promoted": True,
         "reason": "first version"}]}
    drawn = []
    draw = plots.metric_trend_png
    monkeypatch.setattr(plots, "metric_trend_png", lambda *a, **k: drawn.append(a) or draw(*a, **k))

    @flow(name="dashboard-test")
    def publish(index: dict, runs: list):
        return publish_dashboard(name, index, runs, store)

    first = publish(index, [])
    run = {"time": "2026-11-29T13:00:00", "flow_run": "calm-fox", "version": "1", "rows": 800, "rows_per_s": 61.2,
           "quarantine_rate": 0.0, "drift": {}, "drifted": [], "reference": True}
    second = publish(index, [run])
    chart = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
    assert len(drawn) == 1 and chart.search(first).group() == chart.search(second).group()

    def trends() -> list[str]:
        return [c for c in store.list(f"models/{name}/_charts") if c.startswith("metric-trend")]

    assert "calm-fox" in second and len(trends()) == 1
    index["versions"].append({"version": "2", "created": "2026-11-29T11:00:00", "metrics": {"accuracy": 0.9},
                              "promoted": False, "reason": "not better"})
    third = publish(index, [run])
    assert len(drawn) == 2 and chart.search(third).group() != chart.search(second).group()
    assert len(trends()) == 2
