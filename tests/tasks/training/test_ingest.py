import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.errors import DataError
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.sources import fingerprint, parse_source
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.recipes import get_recipe
from hfbatch.tasks.training import ingest as ingest_mod

TC = get_recipe("text-classification")


def ingest(src: str, store: Store, label_names=None, **columns):
    """Ingest for text classification with these columns."""
    return ingest_mod.ingest(src, store, TC, TC.options_class(**columns), Settings(), label_names)


def holdout(data, store, fraction, seed):
    return ingest_mod.holdout(data, store, TC, fraction, seed)


@pytest.fixture
def sst2_small(data_dir, tmp_path):
    path = tmp_path / "sst2.parquet"
    pq.write_table(pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 500), path)
    return path


def test_ingest_keeps_classlabel_names_and_is_keyed_by_content(sst2_small, tmp_path):
    store = Store(str(tmp_path / "store"))
    ref = ingest(str(sst2_small), store)
    assert ref.num_rows == 500 and ref.label_names == ("negative", "positive")
    ds = store.load_dataset(ref.key)
    assert ds.column_names == ["text", "label"]
    assert ds.features["label"].names == ["negative", "positive"]
    original = pq.read_table(sst2_small)
    assert ds["text"][:5] == original["text"].to_pylist()[:5]
    assert ds["label"][:50] == original["label"].to_pylist()[:50]

    again = ingest(str(sst2_small), store)
    assert again == ref  # same content → same committed artifact, source not re-read

    pq.write_table(original.slice(0, 499), sst2_small)  # the file changes → a new ingest
    changed = ingest(str(sst2_small), store)
    assert changed.fingerprint != ref.fingerprint and changed.num_rows == 499


def test_column_mapping_string_labels_csv_and_jsonl(tmp_path):
    rows = [{"review": f"text {i}", "sentiment": ["bad", "good", "meh"][i % 3]} for i in range(9)]
    csv = tmp_path / "d.csv"
    csv.write_text("review,sentiment\n" + "".join(f"{r['review']},{r['sentiment']}\n" for r in rows))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = Store(str(tmp_path / "store"))
    for src in (csv, jsonl):
        ref = ingest(str(src), store, text_column="review", label_column="sentiment")
        assert ref.label_names == ("bad", "good", "meh")
        ds = store.load_dataset(ref.key)
        assert ds["label"] == [0, 1, 2] * 3 and ds["text"][0] == "text 0"


def test_eval_set_uses_training_label_ids_and_rejects_unknown_labels(tmp_path):
    store = Store(str(tmp_path / "store"))
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]}), path)
    ref = ingest(str(path), store, label_names=("neg", "pos"))
    assert store.load_dataset(ref.key)["label"] == [1, 0, 1]
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": ["pos", "neutral", "pos"]}), path)
    with pytest.raises(DataError, match=r"row 1: unknown label 'neutral' in column 'label'"):
        ingest(str(path), store, label_names=("neg", "pos"))


@pytest.mark.parametrize("table, match", [
    (pa.table({"text": ["a"], "y": [1]}), r"has no column 'label' \(--label-column\)"),
    (pa.table({"sentence": ["a"], "label": [1]}), r"has no column 'text' \(--text-column\)"),
    (pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), "is empty"),
    (pa.table({"text": ["ok", None, "x"], "label": [0, 1, 0]}), r"row 1: column 'text' is null"),
    (pa.table({"text": ["ok", "fine", "  "], "label": [0, 1, 0]}), r"row 2: column 'text' is empty"),
    (pa.table({"text": ["ok", "fine"], "label": [0, None]}), r"row 1: column 'label' is null"),
])
def test_bad_input_errors_name_source_column_and_row(tmp_path, table, match):
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(DataError, match=match) as err:
        ingest(str(path), store)
    assert str(path) in str(err.value)
    assert store.list("datasets") == []  # nothing committed


def test_corrupt_missing_and_unreachable_sources(tmp_path):
    store = Store(str(tmp_path / "store"))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="corrupt or unreadable Parquet file .*corrupt.parquet"):
        ingest(str(corrupt), store)
    with pytest.raises(DataError, match="does not exist"):
        ingest(str(tmp_path / "missing.parquet"), store)
    with pytest.raises(DataError, match="cannot reach hub dataset 'someone/no-such-dataset'"):
        ingest("someone/no-such-dataset", store)  # HF_HUB_OFFLINE=1: the hub is unreachable


def test_directory_source_and_hub_source_parsing(tmp_path):
    for i in range(2):
        pq.write_table(pa.table({"text": [f"t{i}"], "label": [i]}), tmp_path / f"part-{i}.parquet")
    src = parse_source(str(tmp_path))
    assert src.kind == "file" and [p.rsplit("/", 1)[-1] for p in src.files] == ["part-0.parquet", "part-1.parquet"]
    fp = fingerprint(src)
    pq.write_table(pa.table({"text": ["t1 changed"], "label": [1]}), tmp_path / "part-1.parquet")
    assert fingerprint(parse_source(str(tmp_path))) != fp
    hub = parse_source("glue:sst2#validation[:100]")
    assert (hub.kind, hub.uri, hub.config, hub.split) == ("hub", "glue", "sst2", "validation[:100]")


def test_holdout_is_deterministic_and_disjoint(sst2_small, tmp_path):
    store = Store(str(tmp_path / "store"))
    ref = ingest(str(sst2_small), store)
    train, evald = holdout(ref, store, 0.2, seed=1)
    assert (train.num_rows, evald.num_rows) == (400, 100)
    assert holdout(ref, store, 0.2, seed=1) == (train, evald)
    # a partition of the rows: together exactly the original multiset of texts
    texts = {part: store.load_dataset(r.key)["text"] for part, r in (("train", train), ("eval", evald), ("all", ref))}
    assert Counter(texts["train"]) + Counter(texts["eval"]) == Counter(texts["all"])


def test_s3_source_is_fingerprinted_by_etag_and_ingested(s3, sst2_small, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    fs.put(str(sst2_small), "hfbatch/data/sst2.parquet")
    store = Store(str(tmp_path / "store"))
    ref = ingest("s3://hfbatch/data/sst2.parquet", store)
    assert ref.num_rows == 500
    assert store.load_dataset(ref.key)["text"][:3] == pq.read_table(sst2_small)["text"].to_pylist()[:3]
    with pytest.raises(DataError, match="does not exist"):
        ingest("s3://hfbatch/data/nothing.parquet", store)
