import shutil

import pytest

from hfbatch.tasks.core.errors import ModelError
from hfbatch.tasks.core.models import resolve_model
from hfbatch.tasks.core.settings import Settings

SETTINGS = Settings()


def test_local_model_resolves_with_stable_fingerprints(minilm, tmp_path):
    a = resolve_model(minilm, SETTINGS)
    assert a.path == minilm and a.fingerprint == resolve_model(minilm, SETTINGS).fingerprint
    copy = tmp_path / "m"
    shutil.copytree(minilm, copy)
    (copy / "vocab.txt").write_text((copy / "vocab.txt").read_text() + "newtoken\n")
    b = resolve_model(str(copy), SETTINGS)
    assert b.fingerprint == a.fingerprint  # same weights
    assert b.tokenizer_fingerprint != a.tokenizer_fingerprint  # changed tokenizer


def test_model_without_weights_or_with_only_pickle_weights_is_refused(minilm, tmp_path):
    empty = tmp_path / "empty"
    shutil.copytree(minilm, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelError, match="has no weights"):
        resolve_model(str(empty), SETTINGS)
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="only pickle weights"):
        resolve_model(str(empty), SETTINGS)
    assert resolve_model(str(empty), Settings(allow_pickle_weights=True)).path == str(empty)


def test_missing_directory_and_unreachable_hub_are_named(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), SETTINGS)
    with pytest.raises(ModelError, match="model .someone/some-model@main. cannot be fetched from the Hugging Face Hub"):
        resolve_model("someone/some-model@main", SETTINGS)


def test_device_setting(monkeypatch):
    """Device `cpu` always gives the CPU in fp32; `cuda` without a GPU fails loudly instead of quietly
    running on the CPU; anything else is refused, in HFBATCH_DEVICE as in the parameter."""
    import pydantic
    import torch

    from hfbatch.tasks.core.errors import ConfigError
    from hfbatch.tasks.core.models import pick_device

    monkeypatch.setenv("HFBATCH_DEVICE", "cpu")
    assert Settings().device == "cpu" and pick_device(Settings().device) == ("cpu", "fp32")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda")
    with pytest.raises(ConfigError, match="device must be"):
        pick_device("tpu")
    monkeypatch.setenv("HFBATCH_DEVICE", "tpu")
    with pytest.raises(pydantic.ValidationError):
        Settings()
