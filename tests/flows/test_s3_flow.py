"""The train flow with the whole store on S3 (a real S3 HTTP server, moto, on 127.0.0.1)."""
import pytest
import s3fs

from hfbatch.flows.training import train_flow
from tests.helpers import call_flow, task_states

pytestmark = pytest.mark.slow


def test_train_flow_on_s3_store(prefect_harness, s3, sst2_split, minilm, tmp_path):
    train, evald = sst2_split
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    fs.put(str(train), "hfbatch/data/train.parquet")
    fs.put(str(evald), "hfbatch/data/eval.parquet")
    # 128 rows in batches of 16: 8 steps, checkpoints at 4 and 8 mirrored to S3 during training
    params = dict(dataset="s3://hfbatch/data/train.parquet", eval_dataset="s3://hfbatch/data/eval.parquet",
                  model=minilm, name="sst2-s3", max_train_samples=128, batch_size=16, max_length=32,
                  save_steps=4, store="s3://hfbatch/store")
    state = call_flow(train_flow, **params, return_state=True)
    result = state.result()
    assert (result["version"], result["promoted"], result["global_step"]) == ("1", True, 8)
    assert result["uri"].startswith("s3://hfbatch/store/models/sst2-s3/1")

    keys = fs.find("hfbatch/store")
    assert "hfbatch/store/models/sst2-s3/1/model.safetensors" in keys
    assert "hfbatch/store/models/sst2-s3/1/_SUCCESS" in keys
    assert "hfbatch/store/models/sst2-s3/registry.json" in keys
    assert any(k.endswith("/checkpoints/checkpoint-8/_SUCCESS") for k in keys)
    assert any(k.startswith("hfbatch/store/prefect-results/") for k in keys)
    assert any(k.endswith("/confusion_matrix.json") for k in keys)

    again = call_flow(train_flow, **params, return_state=True)
    states = task_states(again.state_details.flow_run_id)
    assert all(set(v) == {"Cached"} for v in states.values()), states
    assert again.result() == result
