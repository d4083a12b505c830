"""Prediction figures: merged across shards exactly, and a PSI that is 0 for the same distribution and
large for a shifted one (real SST-2 lengths)."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core import monitoring as m


def test_figures_merge_across_shards_like_one_run(data_dir):
    texts = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 3000).column("text").to_pylist()
    lengths = [len(t) for t in texts]
    labels = ["pos" if n % 3 else "neg" for n in lengths]
    whole = {"length": m.histogram(lengths, m.LENGTHS), "label": m.shares(labels)}
    parts = [{"length": m.histogram(lengths[i:i + 700], m.LENGTHS), "label": m.shares(labels[i:i + 700])}
             for i in range(0, 3000, 700)]
    merged = parts[0]
    for part in parts[1:]:
        merged = m.merge(merged, part)
    assert merged == whole and sum(merged["length"]["counts"]) == 3000
    median = m.quantiles(merged["length"])[1]
    assert median == pytest.approx(np.median(lengths), rel=0.5)  # within its doubling bin


def test_psi_tells_a_shifted_run_from_a_stable_one(data_dir):
    texts = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 8000).column("text").to_pylist()
    lengths = np.array([len(t) for t in texts])
    reference = m.histogram(lengths[:4000], m.LENGTHS)
    same = m.histogram(lengths[4000:], m.LENGTHS)  # other rows of the same data
    longer = m.histogram(lengths[4000:] * 4, m.LENGTHS)  # four times longer texts
    assert m.psi(reference, reference) == 0.0
    assert m.psi(reference, same) < 0.05 < m.DRIFT_PSI < m.psi(reference, longer)
    scores = m.histogram(np.linspace(0.5, 1, 500), m.UNIT)
    assert m.drift({"score": scores, "label": m.shares("ab" * 50)},
                   {"score": scores, "label": m.shares("a" * 95 + "b" * 5)})["label"] > m.DRIFT_PSI
    assert m.summary({"label": m.shares("aab")})["label"] == {"a": 0.6667, "b": 0.3333}
