"""Bulk inference of the tasks beyond classification with input and output on S3 (a real S3 HTTP server,
moto, on 127.0.0.1): named entities on SST-2 sentences and extractive QA on SQuAD questions give the
same rows as a local run, the manifest accounts for every row, and a rerun redoes no shard."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from hfbatch.flows.inference import batch_inference
from tests.helpers import call_flow, tiny_qa


@pytest.fixture(scope="module")
def qa_model(minilm, tmp_path_factory) -> str:
    return tiny_qa(minilm, tmp_path_factory.mktemp("qa") / "qa")


@pytest.mark.parametrize("task", ["token-classification", "question-answering"])
def test_task_on_s3_equals_local_and_reruns_nothing(prefect_harness, s3, task, tiny_models, qa_model, data_dir,
                                                   tmp_path):
    if task == "question-answering":
        model, columns = qa_model, {"question": "question", "context": "context"}
        table = pq.read_table(data_dir / "squad" / "dev.parquet").slice(0, 60).select(["id", "question", "context"])
    else:
        model, columns = tiny_models[task], None
        table = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 60).select(["idx", "text"])
    (tmp_path / "input").mkdir()
    pq.write_table(table, tmp_path / "input" / "part-0.parquet", row_group_size=20)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    fs.put(str(tmp_path / "input" / "part-0.parquet"), f"hfbatch/{task}/input/part-0.parquet")
    params = dict(model=model, task=task, columns=columns, shard_rows=20)
    store = f"s3://hfbatch/{task}/store"  # results kept for reuse on S3 too

    remote = call_flow(batch_inference, input=f"s3://hfbatch/{task}/input/", output=f"s3://hfbatch/{task}/out",
                       store=store, **params)
    call_flow(batch_inference, input=str(tmp_path / "input"), output=str(tmp_path / "out"), reuse_results=False,
              **params)
    assert (remote["rows"], remote["rows_out"], remote["shards"], remote["shards_skipped"]) == (60, 60, 3, 0)

    a = pq.read_table(f"hfbatch/{task}/out", filesystem=fs).drop_columns(["model"])
    b = pq.read_table(tmp_path / "out").drop_columns(["model"])
    assert a.num_rows == 60 and a.column_names == b.column_names
    for column in a.column_names:
        if column not in ("score", "entities"):  # floats: the same computation, compared below
            assert a.column(column).to_pylist() == b.column(column).to_pylist(), column
    if "entities" in a.column_names:
        words = lambda t: [[(e["entity_group"], e["word"]) for e in row] for row in t.column("entities").to_pylist()]
        assert words(a) == words(b)
        assert sum(map(len, words(a))) > 0  # a random tagger still tags something: the comparison means something
    manifest = fs.cat_file(f"hfbatch/{task}/out/_manifest.json")
    assert b'"rows_out": 60' in manifest and b'"figures"' in manifest

    rerun = call_flow(batch_inference, input=f"s3://hfbatch/{task}/input/", output=f"s3://hfbatch/{task}/out",
                      store=store, **params)
    assert (rerun["rows_out"], rerun["shards_skipped"]) == (60, 3)
    # a run into a new output copies every row's result from the S3 store: the same table. The SQuAD rows
    # hold repeated questions (rows 11 and 24: same question, same context): one key, one kept result,
    # whose score the model computed in two batches that differ in the last bits
    reused = call_flow(batch_inference, input=f"s3://hfbatch/{task}/input/", output=f"s3://hfbatch/{task}/new",
                       store=store, **params)
    assert (reused["rows_reused"], reused["rows_computed"]) == (60, 0)
    new = pq.read_table(f"hfbatch/{task}/new", filesystem=fs).drop_columns(["model"])
    assert new.schema == a.schema
    for column in a.column_names:
        if column == "score":
            np.testing.assert_allclose(new.column(column).to_numpy(), a.column(column).to_numpy(), rtol=1e-5)
        elif column != "entities":
            assert new.column(column).to_pylist() == a.column(column).to_pylist(), column
    if "entities" in a.column_names:
        assert words(new) == words(a)
    assert fs.find(f"hfbatch/{task}/store/results")  # its partition files
