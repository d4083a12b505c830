"""What a model predicted, summarised so that runs can be compared: the figures each batch-inference run
records (and each evaluation records as the version's reference), merged across shards, and the
population stability index (PSI) that tells a run whose predictions drifted from the reference.

A figure is a small JSON-able dict: `{"kind": "shares", "counts": {category: n}}` for categories (labels,
entity types, finish reasons) or `{"kind": "histogram", "edges": [...], "counts": [...]}` for numbers
(scores, lengths, norms), on fixed edges so that shards and runs add up and compare bin by bin.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

DRIFT_PSI = 0.2
"""PSI above which a figure has drifted (the usual reading: < 0.1 stable, 0.1-0.2 some shift, > 0.2 shifted)."""
UNIT = [i / 20 for i in range(21)]
"""Edges for scores and shares in [0, 1]."""
LENGTHS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30]
"""Edges for lengths (characters, tokens, counts): doubling bins."""
CATEGORICAL = b"hfbatch.categorical"
"""A field's metadata key saying its values are categories (answers constrained to choices): their shares
are a figure, as labels' are."""


def shares(values: Iterable) -> dict:
    return {"kind": "shares", "counts": dict(Counter(str(v) for v in values))}


def histogram(values: Iterable[float], edges: Sequence[float]) -> dict:
    array = np.asarray(list(values), dtype=np.float64)
    array = array[np.isfinite(array)]
    counts = (np.histogram(np.clip(array, edges[0], edges[-1]), bins=edges)[0] if array.size
              else np.zeros(len(edges) - 1))
    return {"kind": "histogram", "edges": list(edges), "counts": [int(c) for c in counts]}


def log_edges(low: float = 1e-3, high: float = 1e4, per_decade: int = 4) -> list[float]:
    """Edges for positive numbers of unknown scale (embedding norms): `per_decade` bins a decade."""
    decades = round(math.log10(high / low))
    return [0.0] + [low * 10 ** (i / per_decade) for i in range(decades * per_decade + 1)] + [float("inf")]


def merge(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """The figures of two sets of rows together (shards of one run)."""
    out = dict(a)
    for name, figure in b.items():
        if name not in out:
            out[name] = figure
        elif figure["kind"] == "shares":
            counts = Counter(out[name]["counts"])
            counts.update(figure["counts"])
            out[name] = {"kind": "shares", "counts": dict(counts)}
        else:
            out[name] = {**figure, "counts": [x + y for x, y in zip(out[name]["counts"], figure["counts"])]}
    return out


def psi(expected: dict, actual: dict, floor: float = 1e-4) -> float:
    """Population stability index of `actual` against `expected`: sum over bins (or categories) of
    (actual share - expected share) x ln(actual share / expected share); empty bins count as `floor`."""
    if expected["kind"] == "shares":
        keys = sorted(set(expected["counts"]) | set(actual["counts"]))
        e = np.array([expected["counts"].get(k, 0) for k in keys], dtype=np.float64)
        a = np.array([actual["counts"].get(k, 0) for k in keys], dtype=np.float64)
    else:
        e, a = np.asarray(expected["counts"], dtype=np.float64), np.asarray(actual["counts"], dtype=np.float64)
    if e.sum() == 0 or a.sum() == 0:
        return 0.0
    e, a = np.maximum(e / e.sum(), floor), np.maximum(a / a.sum(), floor)
    return float(np.sum((a - e) * np.log(a / e)))


def drift(reference: dict[str, dict], current: dict[str, dict]) -> dict[str, float]:
    """PSI of every figure the reference and the run both have."""
    return {name: round(psi(reference[name], current[name]), 4) for name in sorted(set(reference) & set(current))
            if reference[name]["kind"] == current[name]["kind"]}


def quantiles(figure: dict, qs: tuple[float, ...] = (0.05, 0.5, 0.95)) -> list[float] | None:
    """Approximate quantiles of a histogram (linear within a bin); None for shares or no rows."""
    if figure["kind"] != "histogram" or not sum(figure["counts"]):
        return None
    edges, counts = np.asarray(figure["edges"], dtype=np.float64), np.asarray(figure["counts"], dtype=np.float64)
    edges[-1] = edges[-2] * 2 if not math.isfinite(edges[-1]) else edges[-1]
    cumulative = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    return [float(np.interp(q, cumulative, edges)) for q in qs]


def summary(figures: dict[str, dict]) -> dict[str, object]:
    """A short reading of the figures: shares as fractions, histograms as 5/50/95 % quantiles."""
    out: dict[str, object] = {}
    for name, figure in figures.items():
        if figure["kind"] == "shares":
            total = sum(figure["counts"].values()) or 1
            out[name] = {k: round(v / total, 4) for k, v in sorted(figure["counts"].items(), key=lambda kv: -kv[1])}
        else:
            q = quantiles(figure)
            out[name] = None if q is None else [round(x, 4) for x in q]
    return out


def figures(table, inputs: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """The figures of a table of predictions, by the output columns it has (every task's predictor names
    its columns: `label`, `score`, `entities`, `answer`, `generated_text`, ...), and of the input texts."""
    import pyarrow.compute as pc

    names, out = set(table.column_names), {}
    if "label" in names:
        out["label"] = shares(table.column("label").to_pylist())
    if "score" in names:
        out["score"] = histogram(table.column("score").to_numpy(zero_copy_only=False), UNIT)
    if "entities" in names:
        entities = table.column("entities").to_pylist()
        out["entity_type"] = shares(e["entity_group"] for row in entities for e in row or [])
        out["entities_per_row"] = histogram([len(row or []) for row in entities], LENGTHS)
    if "answer" in names:
        out["answer_chars"] = histogram(pc.utf8_length(table.column("answer")).to_numpy(zero_copy_only=False), LENGTHS)
    if "generated_text" in names:
        out["output_chars"] = histogram(pc.utf8_length(table.column("generated_text")).to_numpy(zero_copy_only=False),
                                        LENGTHS)
        if (table.schema.field("generated_text").metadata or {}).get(CATEGORICAL) == b"true":
            out["answer"] = shares(table.column("generated_text").to_pylist())
    if "output_tokens" in names:
        out["output_tokens"] = histogram(table.column("output_tokens").to_numpy(zero_copy_only=False), LENGTHS)
    if "finish_reason" in names:
        out["finish_reason"] = shares(table.column("finish_reason").to_pylist())
    if "embedding" in names and table.num_rows:
        vectors = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False))
        norms = np.linalg.norm(vectors.reshape(table.num_rows, -1), axis=1)
        out["embedding_norm"] = histogram(norms, log_edges())
    if "predictions" in names:
        top = [row[0]["score"] for row in table.column("predictions").to_pylist() if row]
        out["top_score"] = histogram(top, UNIT)
    for name, texts in (inputs or {}).items():
        out[f"input_{name}_chars"] = histogram([len(t) for t in texts], LENGTHS)
    return out


def run_record(result: dict, manifest: dict, reference: dict | None, threshold: float = DRIFT_PSI,
               flow_run: dict | None = None) -> dict:
    """What the registry keeps of a batch-inference run (`result`: its summary): rows, speed, quarantine
    rate, the prediction figures read short, and their PSI against `reference` (the model version's
    figures at evaluation), with the figures whose PSI is above `threshold`."""
    from datetime import UTC, datetime

    scores = drift(reference, manifest["figures"]) if reference else {}
    return {"time": datetime.now(UTC).isoformat(), "id": (flow_run or {}).get("id") or result["output"],
            "flow_run": (flow_run or {}).get("name"), "output": result["output"], "version": result["model_version"],
            "rows": manifest["rows_in"], "rows_per_s": result["rows_per_s"],
            "input_tokens": manifest.get("input_tokens", manifest.get("tokens", 0)),
            "output_tokens": manifest.get("output_tokens", 0), "tokens_per_s": result.get("tokens_per_s", 0.0),
            "rows_reused": manifest.get("rows_reused", 0), "seconds_saved": manifest.get("seconds_saved", 0.0),
            "quarantine_rate": round(manifest["quarantined"] / max(manifest["rows_in"], 1), 6),
            "reference": bool(reference), "drift": scores,
            "drifted": sorted(name for name, value in scores.items() if value > threshold),
            "figures": summary(manifest["figures"])}
