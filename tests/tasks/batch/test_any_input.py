"""The batch job runs any predictor it is handed: here one of this test's own, whose rows are numeric
feature vectors (not text) and whose model is a small torch network, with no tokenizer anywhere. The
job's sharding, bad-row handling, manifest and exactly-once rerun work unchanged."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hfbatch.tasks.batch.runner import run_local
from hfbatch.tasks.core.errors import DataError
from hfbatch.tasks.core.fingerprint import hash_files
from hfbatch.tasks.core.inputs import InputKind
from hfbatch.tasks.core.refs import ModelRef
from hfbatch.tasks.engine.predictor import Predictor, PredictorSpec
from tests.helpers import SETTINGS

WIDTH = 4


class Features(InputKind):
    """A list of `WIDTH` finite numbers."""

    description = f"a list of {WIDTH} numbers"

    def accepts(self, kind: pa.DataType) -> bool:
        return (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)) and pa.types.is_floating(kind.value_type)

    def problem(self, value: Any, column: str) -> str | None:
        if len(value) != WIDTH or any(v is None or not np.isfinite(v) for v in value):
            return f"{column!r} is not {WIDTH} finite numbers"
        return None


class Scorer(Predictor):
    """A linear layer and a sigmoid over each row's features: `label` (`high` above 0.5) and `score`."""

    task = "feature-scoring"

    @classmethod
    def inputs(cls, options):
        return {"features": Features()}

    @classmethod
    def output_schema(cls, options) -> pa.Schema:
        return pa.schema([("label", pa.string()), ("score", pa.float32())])

    def __init__(self, model, options, settings, precision="auto"):
        super().__init__(model, options, settings, precision)
        from safetensors.torch import load_file

        self.net = torch.nn.Linear(WIDTH, 1)
        self.net.load_state_dict(load_file(Path(model.path) / "model.safetensors"))
        self.loads = getattr(Scorer, "loads", 0)
        Scorer.loads = self.loads + 1

    def preprocess(self, inputs, row_ids=None) -> torch.Tensor:
        return torch.tensor(inputs["features"], dtype=torch.float32)

    def _forward(self, features: torch.Tensor, batch_tokens: int) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(self.net(features))[:, 0].numpy()

    def postprocess(self, outputs: np.ndarray, features) -> pa.Table:
        return pa.table({"label": ["high" if s > 0.5 else "low" for s in outputs],
                         "score": pa.array(outputs, pa.float32())}, schema=self.schema)


@pytest.fixture
def scorer(tmp_path) -> tuple[PredictorSpec, torch.nn.Linear]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torch.nn.Linear(WIDTH, 1)
    path = tmp_path / "scorer"
    path.mkdir()
    save_file(net.state_dict(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"width": WIDTH}))
    ref = ModelRef(str(path), str(path), hash_files([path / "model.safetensors"]), "none")
    return PredictorSpec(Scorer, ref, Scorer.options_class(), SETTINGS), net


def test_numeric_rows_run_through_the_batch_job_unchanged(scorer, tmp_path):
    spec, net = scorer
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(100, WIDTH)).tolist()
    rows[17] = [1.0, 2.0]  # too short: set aside
    rows[60] = None
    path = tmp_path / "features.parquet"
    pq.write_table(pa.table({"id": list(range(100)), "features": pa.array(rows, pa.list_(pa.float64()))}), path,
                   row_group_size=25)
    manifest = run_local(spec, str(path), str(tmp_path / "out"), shard_rows=25, on_bad_row="quarantine")
    assert (manifest["rows_in"], manifest["rows_out"], manifest["quarantined"], manifest["shards"]) == (100, 98, 2, 4)
    out = pq.read_table(tmp_path / "out")
    good = [i for i in range(100) if i not in (17, 60)]
    assert out.column("id").to_pylist() == good
    with torch.inference_mode():
        expected = torch.sigmoid(net(torch.tensor([rows[i] for i in good], dtype=torch.float32)))[:, 0].numpy()
    np.testing.assert_allclose(out.column("score").to_numpy(), expected, rtol=1e-6)
    reasons = pq.read_table(tmp_path / "out" / "_quarantine").sort_by("id").column("reason").to_pylist()
    assert reasons == [f"'features' is not {WIDTH} finite numbers", "null 'features'"]
    assert "input_features_chars" not in manifest["figures"] and "score" in manifest["figures"]

    loads = Scorer.loads
    again = run_local(spec, str(path), str(tmp_path / "out"), shard_rows=25, on_bad_row="quarantine")
    assert again["shards_skipped"] == 4 and Scorer.loads == loads  # committed shards: nothing predicted again


def test_a_column_of_the_wrong_kind_is_refused_before_the_model_loads(scorer, tmp_path):
    spec, _ = scorer
    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"features": ["one", "two"]}), path)
    loads = getattr(Scorer, "loads", 0)
    with pytest.raises(DataError, match=f"column 'features' of .* is string, not a list of {WIDTH} numbers"):
        run_local(spec, str(path), str(tmp_path / "out"))
    assert getattr(Scorer, "loads", 0) == loads
