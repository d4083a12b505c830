"""Registry logic on small hand-made model directories (the files are copied, never loaded)."""
import pytest

from hfbatch.tasks.core.errors import ModelError
from hfbatch.tasks.core.refs import EvalResult, TrainedModel
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.store import Store


def _trained(store: Store, run_key: str) -> TrainedModel:
    key = f"runs/{run_key}/model"
    with store.staging(key) as tmp:
        (tmp / "model.safetensors").write_bytes(run_key.encode())
    return TrainedModel(store=store.url, key=key, run_key=run_key, task="text-classification", base_model="base",
                        base_revision=None,
                        base_fingerprint="b" * 8, dataset_fingerprint="d" * 8, label_names=("neg", "pos"),
                        config={"epochs": 1}, device="cpu", precision="fp32", global_step=10,
                        resumed_from_step=0, train_samples=100, train_samples_per_second=1.0, train_loss=0.5)


def _eval(accuracy: float, eval_set: str = "E1") -> EvalResult:
    return EvalResult(store="", key="evals/x", model="m", model_fingerprint="f", dataset_fingerprint=eval_set,
                      num_rows=10, label_names=("neg", "pos"), metrics={"accuracy": accuracy, "f1": accuracy})


def test_champion_gate_margin_history_and_resolution(tmp_path):
    store = Store(str(tmp_path))
    reg = Registry(store, "sst2")
    with pytest.raises(ModelError, match="has no champion"):
        reg.resolve()

    first = reg.register(_trained(store, "r1"), _eval(0.80))
    assert (first.version, first.promoted, first.champion) == ("1", True, "1")
    worse = reg.register(_trained(store, "r2"), _eval(0.805), margin=0.01)
    assert (worse.version, worse.promoted, worse.champion) == ("2", False, "1")
    assert "does not beat" in worse.reason
    better = reg.register(_trained(store, "r3"), _eval(0.85), margin=0.01)
    assert (better.version, better.promoted, better.champion) == ("3", True, "3")

    assert reg.resolve() == "3" and reg.resolve("2") == "2"
    with pytest.raises(ModelError, match="no version '9'"):
        reg.resolve("9")
    index = reg.load()
    assert [v["version"] for v in index["versions"]] == ["1", "2", "3"]
    assert [(h["previous"], h["champion"]) for h in index["history"]] == [(None, "1"), ("1", "3")]
    # every version keeps its own files and a model card with its metrics
    assert (tmp_path / "models/sst2/2/model.safetensors").read_bytes() == b"r2"
    card = (tmp_path / "models/sst2/3/README.md").read_text()
    assert "sst2 v3" in card and "| accuracy | 0.8500 |" in card
    assert store.is_complete("models/sst2/3")


def test_registering_the_same_run_twice_returns_its_version(tmp_path):
    store = Store(str(tmp_path))
    reg = Registry(store, "m")
    trained = _trained(store, "r1")
    assert reg.register(trained, _eval(0.7)).version == "1"
    again = reg.register(trained, _eval(0.7))
    assert (again.version, again.reason) == ("1", "already registered")
    assert len(reg.load()["versions"]) == 1


def test_invalid_name_is_rejected(tmp_path):
    from hfbatch.tasks.core.errors import ConfigError

    with pytest.raises(ConfigError, match="invalid model name"):
        Registry(Store(str(tmp_path)), "../etc")


def _register_runs(store_url: str, runs: list[str]) -> list[str]:
    store = Store(store_url)
    return [Registry(store, "race").register(_trained(store, run), _eval(0.5 + int(run[1:]) / 100)).version
            for run in runs]


def test_concurrent_registrations_lose_no_version_local(tmp_path):
    """Four processes register two runs each under one name at the same time (no Prefect server): eight
    versions, each once, each with its own files, and the index lists them all."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(4) as pool:
        versions = pool.starmap(_register_runs, [(str(tmp_path), [f"r{2 * i}", f"r{2 * i + 1}"]) for i in range(4)])
    assert sorted(int(v) for vs in versions for v in vs) == list(range(1, 9))
    index = Registry(Store(str(tmp_path)), "race").load()
    assert sorted(int(v["version"]) for v in index["versions"]) == list(range(1, 9))
    for v in index["versions"]:  # every version directory holds the run it was registered for
        assert (tmp_path / "models/race" / v["version"] / "model.safetensors").read_bytes() == v["run_key"].encode()


def test_concurrent_registrations_lose_no_version_on_s3(s3):
    """The same on S3 (moto's server): the index is updated by conditional PUTs, retried on conflict."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda i: _register_runs("s3://hfbatch/store", [f"r{i}"]), range(4)))
    assert sorted(int(v) for vs in versions for v in vs) == [1, 2, 3, 4]
    assert len(Registry(Store("s3://hfbatch/store"), "race").load()["versions"]) == 4


def test_a_corrupted_registered_file_is_refused_when_loaded(tmp_path):
    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.settings import Settings

    store = Store(str(tmp_path))
    Registry(store, "m").register(_trained(store, "r1"), _eval(0.7))
    (tmp_path / "models/m/1/config.json").write_text("{}")
    (tmp_path / "models/m/1/vocab.txt").write_text("[PAD]\n")
    entry = Registry(store, "m").load()["versions"][0]
    assert len(entry["files"]["model.safetensors"]) == 64  # sha256 of every file, kept in the registry
    (tmp_path / "models/m/1/model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ModelError, match=r"model\.safetensors .* do not match the sha256 recorded at registration"):
        resolve_model("m", Settings(), store)


def test_a_degenerate_model_is_never_promoted(tmp_path):
    store = Store(str(tmp_path))
    reg = Registry(store, "m").register(_trained(store, "r1"), _eval(1.0), problem="it predicts 'pos' for every row")
    assert (reg.promoted, reg.champion) == (False, None) and "predicts 'pos'" in reg.reason
    assert Registry(store, "m").register(_trained(store, "r2"), _eval(0.6)).promoted  # then a sound one is
