"""`hfbatch push`: the upload plan checked against the registered digests with huggingface_hub's own
operations, and the push's record. No Hub can be reached here: the commit goes to a recorder standing in for
`HfApi` (not a real Hub), and the real `HfApi` is run only to see its offline refusal said clearly."""
import pytest
from huggingface_hub import CommitInfo

from hfbatch.tasks.core.errors import ConfigError, ModelError, ServiceError
from hfbatch.tasks.core.hub import push, upload_plan
from hfbatch.tasks.core.refs import EvalResult, TrainedModel
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.store import Store


def _registered(store: Store) -> Registry:
    key = "runs/r1/model"
    with store.staging(key) as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights" * 1000)
        (tmp / "config.json").write_text("{}")
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_config.json").write_text("{}")
    trained = TrainedModel(store=store.url, key=key, run_key="r1", task="text-classification", base_model="base",
                           base_revision=None, base_fingerprint="b", dataset_fingerprint="d", label_names=("n", "p"),
                           config={}, device="cpu", precision="fp32", global_step=1, resumed_from_step=0,
                           train_samples=1, train_samples_per_second=1.0, train_loss=0.1)
    registry = Registry(store, "sst2")
    registry.register(trained, EvalResult(store=store.url, key="evals/e", model="m", model_fingerprint="f",
                                          dataset_fingerprint="E", num_rows=1, label_names=("n", "p"),
                                          metrics={"accuracy": 0.9}))
    return registry


class Recorder:
    """Stands in for `huggingface_hub.HfApi` (no Hub here): records the calls, answers as the Hub does."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.repos.append((repo_id, private, exist_ok, repo_type))

    def create_commit(self, repo_id, operations, commit_message, repo_type=None, **kwargs):
        self.commits.append((repo_id, list(operations), commit_message))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123", commit_message=commit_message,
                          commit_description="", oid="abc123")


def test_push_uploads_the_registered_files_and_records_the_commit(tmp_path):
    store = Store(str(tmp_path))
    registry = _registered(store)
    files = registry.load()["versions"][0]["files"]
    plan = upload_plan(store.local_dir(registry.version_key("1")), files)
    assert {op.path_in_repo: op.upload_info.sha256.hex() for op in plan} == files
    assert {"README.md", "hfbatch.json", "model.safetensors", "adapter/adapter_config.json"} <= set(files)

    api = Recorder()
    pushed = push(registry, "champion", "org/sst2", private=True, api=api)
    assert api.repos == [("org/sst2", True, True, "model")]
    (repo, operations, message), = api.commits
    assert (repo, message) == ("org/sst2", "hfbatch: sst2 v1") and len(operations) == len(files)
    assert pushed["commit"] == "abc123" and pushed["version"] == "1"
    hub = registry.load()["versions"][0]["hub"]
    assert [(h["repo_id"], h["commit"], h["private"]) for h in hub] == [("org/sst2", "abc123", True)]


def test_push_refuses_a_changed_file_a_missing_token_and_says_when_offline(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    registry = _registered(store)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        push(registry, "1", "org/sst2")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ServiceError, match="cannot push to https://huggingface.co/org/sst2: HF_HUB_OFFLINE is set"):
        push(registry, "1", "org/sst2")  # the real HfApi, refused before any connection
    store.fs.pipe_file(store.path(f"{registry.version_key('1')}/model.safetensors"), b"replaced")
    api = Recorder()
    with pytest.raises(ModelError, match="model.safetensors"):
        push(registry, "1", "org/sst2", api=api)
    assert not api.commits and "hub" not in registry.load()["versions"][0]
