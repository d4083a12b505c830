"""CPU fp32 inference on oneDNN's packed weights: same results up to rounding, on by default, off by setting."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.engine import onednn
from hfbatch.tasks.engine.onednn import MIN_ROWS, PackedForward, pack_linear_layers
from tests.helpers import SETTINGS, predictor, predictor_spec, resolve_model

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch has no oneDNN")


def test_packed_linear_matches_torch_up_to_rounding_and_runs_on_onednn(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64, bias=False))
    x = torch.randn(4, 9, 64)  # 36 rows: packed
    with torch.inference_mode():
        expected = model(x)
        assert pack_linear_layers(model) == 2 and pack_linear_layers(model) == 0  # once
        calls = []
        real = torch.ops.mkldnn._linear_pointwise
        monkeypatch.setattr(onednn.torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
        got = model(x)
        assert len(calls) == 2 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        calls.clear()
        small = x[:1, : MIN_ROWS - 1]  # fewer rows than MIN_ROWS: torch's own kernel, bit for bit
        assert torch.equal(model(small), torch.nn.functional.linear(
            torch.nn.functional.gelu(torch.nn.functional.linear(small, model[0].weight, model[0].bias)), model[2].weight))
        assert not calls
    # training (gradients wanted): torch's kernel, so that backward works
    y = model(torch.randn(32, 64, requires_grad=True)).sum()
    y.backward()
    assert model[0].weight.grad is not None


def test_predictors_pack_on_cpu_unless_settings_say_aten(classifier, mixed):
    """A classifier's linear layers are packed by default (the generation tests run packed models against
    `generate`); `cpu_kernels="aten"` leaves them on torch's kernels; both give the same labels and scores
    up to rounding on real rows."""
    ref = resolve_model(classifier)
    packed = predictor("text-classification", ref)
    linears = [m for m in packed.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(isinstance(m.__dict__.get("forward"), PackedForward) for m in linears)
    plain = predictor_spec("text-classification", ref, settings=Settings(cpu_kernels="aten")).load()
    assert not any(isinstance(m.__dict__.get("forward"), PackedForward) for m in plain.model.modules())
    texts = pq.read_table(mixed).column("text").to_pylist()[:64]
    a, _ = packed.predict({"text": texts}, 4096)
    b, _ = plain.predict({"text": texts}, 4096)
    assert a.column("label").to_pylist() == b.column("label").to_pylist()
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), rtol=1e-4)
    assert SETTINGS.cpu_kernels == "onednn"
