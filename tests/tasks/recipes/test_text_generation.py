"""text-generation in bulk on real WMT22 and IMDb text with tiny decoders built here (GPT-2, Llama-style):
the recipe and its options, the flow end to end with sampling (a rerun skips every committed shard, other
shard sizes and budgets give the same samples, so does a run killed and rerun), chats from a column of
messages with bad ones quarantined."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.flows import cli
from hfbatch.flows.commands import flows as cli_flows
from hfbatch.flows.params import InferOptions, flow_values
from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.options import validated
from hfbatch.tasks.predictors import get_predictor_class
from hfbatch.tasks.predictors import task_names as predictor_task_names
from hfbatch.tasks.recipes import get_recipe, task_names
from tests.generation_models import decoder_models
from tests.helpers import call_flow, predictor, resolve_model, run_local

SAMPLING = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 3}


@pytest.fixture(scope="module")
def decoders(data_dir, tmp_path_factory) -> dict[str, str]:
    wmt = pq.read_table(data_dir / "wmt22_de_en" / "test.parquet").column("source").to_pylist()
    imdb = pq.read_table(data_dir / "imdb" / "test_sample.parquet").column("text").to_pylist()
    return decoder_models(tmp_path_factory.mktemp("decoders"), wmt[:1500] + imdb[:300])


@pytest.fixture(scope="module")
def prompts(data_dir, tmp_path_factory):
    """60 rows with an `id`: WMT22 sentences and IMDb review openings, in row groups of 20."""
    wmt = pq.read_table(data_dir / "wmt22_de_en" / "test.parquet").slice(100, 48)
    imdb = pq.read_table(data_dir / "imdb" / "test_sample.parquet").column("text").to_pylist()[:12]
    texts = wmt.column("source").to_pylist()
    for i, review in enumerate(imdb):
        texts.insert(4 * i + 1, review[:400])
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"p{i:03d}" for i in range(60)], "text": texts}), path, row_group_size=20)
    return path


def test_options_and_cli():
    """Text generation trains (its recipe: `test_text_generation_training.py`) and predicts; its inference
    options are their own namespace of the infer flow's `options`, `--top-k` means what each task says
    (fill-mask: how many tokens; sampling: which ones), and one line names a bad option."""
    assert "text-generation" in predictor_task_names() and "text-generation" in task_names()
    assert get_recipe("text-generation").options_class.model_fields["messages_column"].default is None
    with pytest.raises(ConfigError, match="predicts with fill-mask models but does not train them"):
        get_recipe("fill-mask")
    options = get_predictor_class("text-generation").options_class
    assert {"messages_column", "do_sample", "temperature", "top_p", "top_k", "seed", "max_new_tokens"} <= \
        set(options.model_fields)
    assert InferOptions.model_fields["text_generation"].annotation == options | None
    fill_mask = get_predictor_class("fill-mask").options_class.model_fields["top_k"]
    assert options.model_fields["top_k"].description != fill_mask.description and fill_mask.default == 5
    args = cli.build_parser().parse_args(["infer", "--model", "m", "--input", "i", "--output", "o", "--do-sample",
                                          "--temperature", "0.7", "--top-k", "20", "--messages-column", "chat"])
    assert (args.do_sample, args.temperature, args.top_k, args.messages_column) == (True, 0.7, 20, "chat")
    given = cli.flow_arguments(args)
    values = flow_values(cli_flows()["infer"], given, "text-generation")
    assert values["options"] == {"text_generation": {"do_sample": True, "temperature": 0.7, "top_k": 20,
                                                     "messages_column": "chat"}}
    with pytest.raises(ConfigError, match="--top-k: Input should be greater than or equal to 1 \\(got 0\\)"):
        validated(get_predictor_class("fill-mask").options_class, {"top_k": 0})
    with pytest.raises(ConfigError, match="--do-sample is an option of summarization, text-generation, text2text-generation, translation, not of fill-mask"):
        flow_values(cli_flows()["infer"], given, "fill-mask")


def test_flow_end_to_end_with_sampling_and_rerun(prefect_harness, decoders, prompts, tmp_path):
    """batch_inference samples each row from its own seed: a rerun skips every committed shard, and other
    shard sizes and batch budgets give the same text for every row."""
    from hfbatch.flows.inference import batch_inference

    out = tmp_path / "out"
    args = {"model": decoders["llama"], "task": "text-generation", "input": str(prompts), "output": str(out),
            "shard_rows": 20, "options": {"text_generation": SAMPLING}}
    summary = batch_inference(**args)  # the flow's own typed parameters: the task's options in `options`
    assert (summary["rows"], summary["rows_out"], summary["shards"], summary["shards_skipped"]) == (60, 60, 3, 0)
    table = pq.read_table(out)
    assert table.column_names == ["id", "row_id", "generated_text", "input_tokens", "output_tokens", "finish_reason",
                                  "model", "model_version"]
    assert table.column("id").to_pylist() == [f"p{i:03d}" for i in range(60)]
    assert set(table.column("finish_reason").to_pylist()) == {"eos", "length"}
    assert all(0 < n <= 10 for n in table.column("output_tokens").to_pylist())
    again = call_flow(batch_inference, **{k: v for k, v in args.items() if k != "options"}, **SAMPLING)  # as the command line gives them
    assert (again["shards"], again["shards_skipped"]) == (3, 3)

    model = resolve_model(decoders["llama"])
    other = run_local("text-generation", model, str(prompts), str(tmp_path / "other"), shard_rows=40,
                      batch_tokens=300, options=get_predictor_class("text-generation").options_class(**SAMPLING))
    assert other["rows_out"] == 60
    assert pq.read_table(tmp_path / "other").column("generated_text").to_pylist() == \
        table.column("generated_text").to_pylist()
    texts = table.column("generated_text").to_pylist()
    assert len(set(texts)) > 40


def test_a_killed_run_rerun_gives_the_same_samples(decoders, prompts, tmp_path):
    """`hfbatch infer` killed once some shards are committed; the rerun computes the rest, and every row
    has the text of an uninterrupted run."""
    out = tmp_path / "out"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1"}
    args = ["infer", "--model", decoders["gpt2"], "--task", "text-generation", "--input", str(prompts),
            "--output", str(out), "--shard-rows", "5", "--max-new-tokens", "10", "--do-sample", "--seed", "5",
            "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "hfbatch.flows.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(list(out.glob("_markers/*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    committed = len(list(out.glob("_markers/*.json")))
    assert 2 <= committed < 12, f"kill came too late or too early: {committed} of 12 shards done"

    proc = subprocess.Popen([sys.executable, "-m", "hfbatch.flows.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["shards"] == 12 and summary["shards_skipped"] >= committed
    options = get_predictor_class("text-generation").options_class(max_new_tokens=10, do_sample=True, seed=5)
    run_local("text-generation", resolve_model(decoders["gpt2"]), str(prompts), str(tmp_path / "clean"),
              shard_rows=60, options=options)
    assert pq.read_table(out).sort_by("id").column("generated_text").to_pylist() == \
        pq.read_table(tmp_path / "clean").column("generated_text").to_pylist()


def test_chats_from_a_messages_column(decoders, prompts, tmp_path):
    """`--messages-column`: each row's chat through the chat template; an empty chat, or one whose message
    has no content, is quarantined with its reason; a text column there is refused."""
    texts = pq.read_table(prompts).column("text").to_pylist()[:20]
    chats = [[{"role": "user", "content": t}] for t in texts]
    chats[4] = []
    chats[9] = [{"role": "user", "content": None}]
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"id": list(range(20)), "messages": chats}), path)
    model = resolve_model(decoders["llama"])
    options = get_predictor_class("text-generation").options_class(max_new_tokens=8, messages_column="messages")
    manifest = run_local("text-generation", model, str(path), str(tmp_path / "out"), options=options,
                         on_bad_row="quarantine")
    assert (manifest["rows_out"], manifest["quarantined"]) == (18, 2)
    quarantine = pq.read_table(tmp_path / "out" / "_quarantine")
    assert quarantine.column("id").to_pylist() == [4, 9]
    assert quarantine.column("reason").to_pylist()[0] == "empty 'messages'"
    assert "role, content" in quarantine.column("reason").to_pylist()[1]
    good = [c for i, c in enumerate(chats) if i not in (4, 9)]
    expected, _ = predictor("text-generation", model, max_new_tokens=8, messages_column="messages").predict(
        {"text": good}, 4000)
    assert pq.read_table(tmp_path / "out").column("generated_text").to_pylist() == \
        expected.column("generated_text").to_pylist()
    from hfbatch.tasks.core.errors import DataError

    with pytest.raises(DataError, match="not a chat"):
        run_local("text-generation", model, str(prompts), str(tmp_path / "bad"),
                  options=get_predictor_class("text-generation").options_class(max_new_tokens=8, messages_column="text"))
