"""A new user's mistakes and ordinary faults through the CLI: each gives one clear message (naming the
file, column, row, option or setting), exit status 2 and no traceback; what can be checked before a flow
starts is answered then; nothing is written, or what was committed is left as it was."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.flows import commands
from hfbatch.flows.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir, classifier):
    """Inputs, models and a store that the cases below spoil in their own ways."""
    root = tmp_path_factory.mktemp("bad-input")
    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 40)
    pq.write_table(sst2.select(["idx", "text"]), root / "rows.parquet", row_group_size=10)
    pq.write_table(sst2.select(["idx", "text", "label"]), root / "labelled.parquet")
    texts = sst2.column("text").to_pylist()
    texts[23] = None
    pq.write_table(pa.table({"idx": list(range(40)), "text": texts}), root / "null-row.parquet", row_group_size=10)
    pq.write_table(pa.table({"text": ["a", "b", "c", "d"] * 10, "label": [1] * 40}), root / "one-class.parquet")
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0.5, 1.5]}), root / "float-labels.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}),
                   root / "empty.parquet")
    pq.write_table(pa.table({"text": ["ok", "x"], "label": ["positive", "neutral"]}), root / "unknown-label.parquet")
    (root / "corrupt.parquet").write_bytes(b"PAR1 not really parquet")
    (root / "no-parquet").mkdir()
    (root / "no-parquet" / "notes.txt").write_text("hello")
    (root / "foreign").mkdir()
    (root / "foreign" / "report.csv").write_text("a,b\n")
    (root / "nested").mkdir()
    shutil.copy(root / "rows.parquet", root / "nested" / "rows.parquet")
    (root / "metric.py").write_text("def compute(predictions, references):\n    return {'always': 1.0}\n")

    no_weights = root / "no-weights"
    shutil.copytree(classifier, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    pickled = root / "pickled"
    shutil.copytree(no_weights, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle")
    remote = root / "remote-code"
    shutil.copytree(classifier, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}}))

    truncated = root / "truncated"  # weights cut short, as an interrupted copy leaves them
    shutil.copytree(classifier, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    torn = root / "torn-header"
    shutil.copytree(classifier, torn)
    (torn / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for name, text in (("torn", '{"name": "torn", "versions": [{"vers'), ("notjson", "\x00\x01 binary"),
                       ("shapeless", '{"name": "shapeless", "versions": {"1": {}}}')):
        (root / "badstore" / "models" / name).mkdir(parents=True)
        (root / "badstore" / "models" / name / "registry.json").write_text(text)
    gone = root / "badstore" / "models" / "gone"  # version 1 registered, its directory since removed
    gone.mkdir(parents=True)
    (gone / "registry.json").write_text(json.dumps({"name": "gone", "champion": "1", "history": [], "versions": [
        {"version": "1", "task": "text-classification", "metrics": {"accuracy": 0.9}, "run_key": "r",
         "created": "2026-12-01T00:00:00"}]}))

    user = {"role": "user", "content": "Is it good?"}
    chats = {"no-answer": [user], "unknown-role": [user, {"role": "oracle", "content": "yes"}],
             "empty-answer": [user, {"role": "assistant", "content": ""}]}
    for name, chat in chats.items():
        pq.write_table(pa.table({"messages": [[user, {"role": "assistant", "content": "yes"}], chat]}),
                       root / f"chat-{name}.parquet")
    pq.write_table(pa.table({"prompt": ["Is it good?", "And this?"], "completion": ["yes", " "]}),
                   root / "empty-completion.parquet")

    store = root / "store"  # a registry with one name in it
    registry = store / "models" / "sst2"
    registry.mkdir(parents=True)
    (registry / "registry.json").write_text(json.dumps({"name": "sst2", "champion": None, "versions": [],
                                                         "history": []}))
    return {"root": root, "model": classifier}


M, I, O = "{model}", "{root}/rows.parquet", "{root}/out"


def infer(*extra: str, model: str = M, task: str = "text-classification", input: str = I, output: str = O) -> list:
    return ["infer", "--model", model, "--task", task, "--input", input, "--output", output, *extra]


def train(*extra: str, dataset: str = "{root}/labelled.parquet", name: str = "bad", model: str = M,
          store: str = "{root}/trainstore") -> list:
    return ["train", "--dataset", dataset, "--model", model, "--name", name, "--store", store, *extra]


def gen(task: str, *extra: str) -> list:
    return infer(*extra, task=task)
CASES = [  # (id, argv, message, stage: "cli" = refused before any flow starts, "flow" = in the flow)
    ("missing input", infer(input="{root}/nothere.parquet"), r"input '.*nothere\.parquet' does not exist", "cli"),
    ("no parquet in input", infer(input="{root}/no-parquet"), "holds no Parquet files", "cli"),
    ("corrupt input", infer(input="{root}/corrupt.parquet"), r"corrupt or unreadable Parquet file .*corrupt\.parquet", "cli"),
    ("missing text column", infer("--text-column", "sentence"), r"has no column 'sentence' \(input 'text'", "cli"),
    ("non-string text column", infer("--text-column", "idx"), r"column 'idx' of .* is int64, not a string", "cli"),
    ("missing kept column", infer("--keep-columns", "nope"), r"no column\(s\) \['nope'\] to keep", "cli"),
    ("malformed --columns", infer("--columns", "text"), "expected INPUT=COLUMN", "cli"),
    ("unknown task input", infer("--columns", "question=text"), r"has inputs \['text'\]", "cli"),
    ("unknown task", infer(task="image-segmentation"), "invalid choice: 'image-segmentation'", "cli"),
    ("bad precision", infer("--precision", "int4"), "invalid choice: 'int4'", "cli"),
    ("zero batch tokens", infer("--batch-tokens", "0"), r"--batch-tokens: Input should be greater than or equal to 1 \(got 0\)", "cli"),
    ("zero shard rows", infer("--shard-rows", "0"), "--shard-rows: Input should be greater than or equal to 1", "cli"),
    ("non-numeric shard rows", infer("--shard-rows", "many"), "invalid int value: 'many'", "cli"),
    ("zero-shot without labels", infer(task="zero-shot-classification"), "--candidate-labels is required", "cli"),
    ("output placeholder", infer(output="{root}/out-{{day}}"), r"only \{date\} and \{model_version\}", "cli"),
    ("dask address without dask", infer("--dask-address", "tcp://127.0.0.1:8786"), "needs --task-runner dask", "cli"),
    ("missing model directory", infer(model="{root}/no-such-model"), "does not exist", "cli"),
    ("model without weights", infer(model="{root}/no-weights"), "has no weights", "cli"),
    ("pickle weights", infer(model="{root}/pickled"), "HFBATCH_ALLOW_PICKLE_WEIGHTS=1", "cli"),
    ("remote code", infer(model="{root}/remote-code"), r"own Python code .*HFBATCH_TRUST_REMOTE_CODE=1", "cli"),
    ("unregistered name", infer("--store", "{root}/store", model="sst3"),
     r"'sst3' is not registered in .*store \(registered: \['sst2'\]\)", "cli"),
    ("no champion yet", infer("--store", "{root}/store", model="sst2"), "has no champion yet", "cli"),
    ("output inside input", infer(input="{root}/nested", output="{root}/nested/out"), "is inside the input", "cli"),
    ("output not ours", infer(output="{root}/foreign"), "holds files hfbatch did not write", "cli"),
    ("null row", infer(input="{root}/null-row.parquet"), r"null-row\.parquet.*row group 2, row 3 .*null 'text'", "flow"),
    ("missing label column", train("--label-column", "stars"), r"has no column 'stars' \(--label-column\)", "cli"),
    ("learning rate", train("--learning-rate", "5"), "--learning-rate: Input should be less than 1", "cli"),
    ("eval fraction", train("--eval-fraction", "1.5"), "--eval-fraction: Input should be less than 1", "cli"),
    ("invalid name", train(name="../etc"), "invalid model name", "cli"),
    ("unknown metric", train("--metric", "bleu"), r"unknown metric\(s\) \['bleu'\]", "cli"),
    ("missing metric module", train("--metric-module", "{root}/nothere.py"), "metric module .* does not exist", "cli"),
    ("unknown train task", train("--task", "fill-mask"), "invalid choice: 'fill-mask'", "cli"),
    ("missing training data", train(dataset="{root}/none.parquet"), "does not exist", "cli"),
    ("empty training data", train(dataset="{root}/empty.parquet"), "is empty", "flow"),
    ("float labels", train(dataset="{root}/float-labels.parquet"), "labels must be names or ids", "flow"),
    ("single class", train(dataset="{root}/one-class.parquet"), "has a single class", "flow"),
    ("unknown eval label", train("--eval-dataset", "{root}/unknown-label.parquet"),
     r"row 1: unknown label 'neutral'", "flow"),
    ("evaluate unregistered", ["evaluate", "--model", "nosuchname", "--dataset", "{root}/labelled.parquet",
                               "--store", "{root}/store"], r"'nosuchname' is not registered in .*\['sst2'\]", "cli"),
    ("evaluate missing data", ["evaluate", "--model", M, "--dataset", "{root}/gone.parquet"], "does not exist", "cli"),
    ("torn registry (infer)", infer("--store", "{root}/badstore", model="torn"),
     r"registry file .*models/torn/registry\.json is damaged \(not JSON", "cli"),
    ("binary registry (evaluate)", ["evaluate", "--model", "notjson", "--dataset", "{root}/labelled.parquet", "--store",
                                    "{root}/badstore"], r"registry file .*notjson/registry\.json is damaged", "cli"),
    ("registry without versions", infer("--store", "{root}/badstore", model="shapeless"),
     r"shapeless/registry\.json is damaged \(no list of versions\)", "cli"),
    ("torn registry (train)", train(name="torn", store="{root}/badstore"), r"torn/registry\.json is damaged", "cli"),
    ("version directory gone", infer("--store", "{root}/badstore", model="gone@1"),
     r"model gone v1: its files .*models/gone/1\) are missing or incomplete", "cli"),
    ("champion directory gone", infer("--store", "{root}/badstore", model="gone"), r"model gone v1: its files", "cli"),
    ("truncated weights (infer)", infer(model="{root}/truncated"), r"truncated/model\.safetensors is truncated or damaged", "cli"),
    ("torn weights header", infer(model="{root}/torn-header"), r"torn-header/model\.safetensors is truncated", "cli"),
    ("truncated weights (train)", train(model="{root}/truncated"), r"model\.safetensors is truncated or damaged", "cli"),
    ("truncated weights (evaluate)", ["evaluate", "--model", "{root}/truncated", "--dataset", "{root}/labelled.parquet"],
     "is truncated or damaged", "cli"),
    ("negative max new tokens", gen("text-generation", "--max-new-tokens", "-1"),
     r"--max-new-tokens: Input should be greater than or equal to 1 \(got -1\)", "cli"),
    ("zero beams", gen("summarization", "--num-beams", "0"), r"--num-beams: Input should be greater than or equal to 1", "cli"),
    ("top-p above 1", gen("text-generation", "--top-p", "1.5"), r"--top-p: Input should be less than or equal to 1", "cli"),
    ("template of a missing column", gen("text-generation", "--prompt-template", "Title: {{{{ title }}}}"),  # {{ }}: the case's format
     r"has no column 'title' \(input 'title' of text-generation\)", "cli"),
    ("template that does not parse", gen("text-generation", "--prompt-template", "{{{{ title "),
     "--prompt-template: the template does not parse: unexpected end of template", "cli"),
    ("template file missing", gen("text-generation", "--prompt-template", "@{root}/none.j2"),
     r"cannot read --prompt-template file '.*none\.j2'", "cli"),
    ("invalid JSON Schema", gen("text-generation", "--json-schema", '{{"type": "strin"}}'),
     "--json-schema: not a valid JSON Schema: 'strin' is not valid", "cli"),
    ("schema keyword llguidance cannot enforce", gen("text-generation", "--json-schema",
                                                     '{{"type": "array", "uniqueItems": true}}'),
     r'--json-schema: the schema uses JSON Schema keyword\(s\) "uniqueItems"', "cli"),
    ("regex that does not compile", gen("text-generation", "--regex", "(abc"),
     "--regex: invalid pattern: unclosed group", "cli"),
    ("empty choice", gen("text-generation", "--choices", "yes,,no"), "--choices: a choice is empty", "cli"),
    ("duplicate choice", gen("text-generation", "--choices", "yes,no,yes"),
     r"--choices: duplicate choice\(s\) \['yes'\]", "cli"),
    ("constraint with another task", infer("--choices", "yes,no"),
     "--choices is an option of text-generation, not of text-classification", "cli"),
    ("negative temperature", gen("translation", "--temperature", "-1"), r"--temperature: Input should be greater than 0", "cli"),
    ("zero max new tokens (seq2seq)", gen("translation", "--max-new-tokens", "0"), r"--max-new-tokens: .*\(got 0\)", "cli"),
    ("zero epochs", train("--epochs", "0"), r"--epochs: Input should be greater than 0", "cli"),
    ("zero batch size", train("--batch-size", "0"), r"--batch-size: Input should be greater than or equal to 1", "cli"),
    ("missing eval data", train("--eval-dataset", "{root}/noeval.parquet"), "does not exist", "cli"),
    ("bad mode", infer("--mode", "append"), "invalid choice: 'append'", "cli"),
    ("bad bad-row policy", infer("--on-bad-row", "skip"), "invalid choice: 'skip'", "cli"),
    ("zero drift threshold", infer("--drift-threshold", "0"), r"--drift-threshold: Input should be greater than 0", "cli"),
    ("unknown evaluate metric", ["evaluate", "--model", M, "--dataset", "{root}/labelled.parquet", "--metrics", "bleu"],
     r"unknown metric\(s\) \['bleu'\]", "cli"),
    ("glob matching nothing", infer(input="{root}/nothing-*.parquet"), "holds no Parquet files", "cli"),
    ("qa columns missing", infer("--columns", "question=q,context=c", task="question-answering"),
     r"has no column 'q' \(input 'question' of question-answering\)", "cli"),
    ("chat without final answer", train("--task", "text-generation", "--messages-column", "messages",
                                        dataset="{root}/chat-no-answer.parquet"),
     r"chat-no-answer\.parquet' row 1: the chat does not end with an assistant message", "flow"),
    ("chat with unknown role", train("--task", "text-generation", "--messages-column", "messages",
                                     dataset="{root}/chat-unknown-role.parquet"),
     r"row 1: message 1 has an unknown role 'oracle'", "flow"),
    ("chat with empty answer", train("--task", "text-generation", "--messages-column", "messages",
                                     dataset="{root}/chat-empty-answer.parquet"), r"row 1: the final assistant message", "flow"),
    ("empty completion", train("--task", "text-generation", "--prompt-column", "prompt", "--completion-column",
                               "completion", dataset="{root}/empty-completion.parquet"),
     r"row 1: column 'completion' is empty", "flow"),
    ("both data formats", train("--task", "text-generation", "--messages-column", "m", "--prompt-column", "p",
                                "--completion-column", "c"), "not both", "cli"),
    ("prompt without completion", train("--task", "text-generation", "--prompt-column", "prompt"),
     r"give --messages-column, or --prompt-column \(or --prompt-template\) and --completion-column", "cli"),
    ("training template of a missing column", train("--task", "text-generation", "--prompt-template", "{{{{ title }}}}",
                                                    "--completion-column", "label"),
     r"has no column 'title' \(read by --prompt-template\)", "flow"),
    ("missing messages column", train("--task", "text-generation", "--messages-column", "chat"),
     r"has no column 'chat' \(--messages-column\)", "cli"),
    ("unknown peft method", train("--peft", "prefix"), "invalid choice: 'prefix'", "cli"),
    ("patience without evaluation", train("--early-stopping-patience", "2"),
     "early_stopping_patience needs eval_strategy epoch or steps", "cli"),
    ("missing gguf file", infer(model="{root}/nothere.gguf"), r"GGUF file '.*nothere\.gguf' does not exist", "cli"),
    ("hub gguf unreachable", infer("--gguf-file", "model.Q4.gguf", model="someorg/some-model"),
     r"GGUF file 'model\.Q4\.gguf' of 'someorg/some-model' cannot be fetched", "cli"),
    ("serve without server", ["serve", "--name", "n", "--model", M, "--watch", "{root}", "--input", I, "--output", O],
     "serving needs a Prefect server", "cli"),
    ("serve bad train param", ["serve", "--name", "n", "--model", M, "--watch", "{root}", "--input", I, "--output", O,
                               "--train-param", "epochs"], "takes KEY=VALUE", "cli"),
    ("serve unknown train param", ["serve", "--name", "n", "--model", M, "--watch", "{root}", "--input", I,
                                   "--output", O, "--train-param", "epoch=2"], "no such option: --epoch", "cli"),
]


@pytest.mark.parametrize("argv, message, stage", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message(prefect_harness, world, capfd, monkeypatch, argv, message, stage):
    import re

    root = world["root"]
    argv = [a.format(model=world["model"], root=root) for a in argv]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    if stage == "cli":  # answered before any flow run (and so before a temporary Prefect server) starts
        monkeypatch.setattr(commands, "flows", lambda real=commands.flows: {k: _no_run(f) for k, f in real().items()})
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # serve needs a Prefect server: none for the case that says so, else one never reached (refused before)
    api = {PREFECT_API_URL: None if "Prefect server" in message else "http://127.0.0.1:9/api"}
    with temporary_settings(api) if argv[0] == "serve" else contextlib.nullcontext():
        assert main(argv) == 2
    out, err = capfd.readouterr()
    assert re.search(message, err), err[-3000:]
    assert err.count("error:") == 1, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p in before} == before  # nothing there was touched
    written = [p for p in after if p not in before and "trainstore" not in p.parts and "prefect" not in str(p)]
    assert not [p for p in written if p.suffix == ".parquet" and p.name.startswith("part-")], written
    assert not (root / "trainstore" / "models").exists()


def _no_run(flow):
    class Refuse:
        fn = staticmethod(flow.fn)
        name = flow.name

        def __call__(self, *args, **kwargs):
            raise AssertionError("the flow ran: this mistake should have been caught before it")

        def validate_parameters(self, values):
            return flow.validate_parameters(values)

    return Refuse()


def test_debug_prints_the_traceback(prefect_harness, world, capfd):
    assert main(["infer", "--model", world["model"], "--task", "text-classification", "--input",
                 str(world["root"] / "nothere.parquet"), "--output", str(world["root"] / "o"), "--debug"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and err.count("hfbatch: error:") == 1


def test_a_missing_file_is_reported_in_seconds_without_a_prefect_server(world, tmp_path):
    """A fresh process with no Prefect server anywhere: the error comes in seconds, without waiting for the
    temporary server the CLI starts beside its checks (`flows/server.py`), and no server is left behind."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "hfbatch"), "infer", "--model", world["model"],
                           "--task", "text-classification", "--input", str(tmp_path / "missing.parquet"),
                           "--output", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 10, seconds  # importing the libraries is most of it; a temporary server adds 10-20 s
    home = str(tmp_path / "prefect")
    for _ in range(50):  # the server gets SIGTERM as the command exits (a parent-death signal)
        left = [p for p in psutil.process_iter() if _environ(p).get("PREFECT_HOME") == home]
        if not left:
            break
        time.sleep(0.1)
    assert not left, [p.cmdline() for p in left]


def _environ(process) -> dict:
    try:
        return process.environ()
    except (psutil.Error, OSError):
        return {}


def test_a_checkpoint_without_the_tasks_head_is_refused(prefect_harness, world, minilm, capfd):
    """MiniLM as it ships is a bare encoder (BertModel): as a classifier its head would be random."""
    code = main(["infer", "--model", minilm, "--task", "text-classification", "--input",
                 str(world["root"] / "rows.parquet"), "--output", str(world["root"] / "headless")])
    err = capfd.readouterr().err
    assert code == 2 and "(BertModel) has no text-classification head: it would predict at random" in err
    assert not (world["root"] / "headless").exists()
    assert main(["infer", "--model", minilm, "--task", "feature-extraction", "--input",
                 str(world["root"] / "rows.parquet"), "--output", str(world["root"] / "embeddings")]) == 0
