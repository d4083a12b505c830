"""Extractive question answering: SQuAD rows prepared and cut into windows as run_qa.py does it, the best
span over an example's windows as utils_qa.py finds it, a real (short) fine-tuning scored with the squad
metric, the train flow registering a version that bulk inference then runs, and bulk inference giving
the removed pipeline's answers."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.metrics import compute
from hfbatch.tasks.recipes import get_recipe
from tests.helpers import SETTINGS, call_flow, tiny_qa

QA = get_recipe("question-answering")
LONG_CONTEXTS = [4142, 4180, 4203, 4260, 4265, 4279, 4297, 4301, 4850, 6373]
"""SQuAD dev rows whose contexts are over 500 tokens: several windows each."""


def squad(data_dir: Path) -> pa.Table:
    return pq.read_table(data_dir / "squad" / "dev.parquet")


def squad_rows(data_dir: Path) -> pa.Table:
    """SQuAD dev questions: the first 36, plus the first question on each of the 10 contexts of over 500
    tokens (cut into several overlapping windows); columns `id`, `q`, `c`."""
    table = squad(data_dir).take(list(range(36)) + LONG_CONTEXTS)
    return pa.table({"id": table.column("id"), "q": table.column("question"), "c": table.column("context")})


def prepared(table: pa.Table, **options):
    return QA.prepare(datasets.Dataset(table), "squad.parquet", QA.options_class(**options), None)[0]


def tokenizer(minilm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm)


# --- prepare ----------------------------------------------------------------------------------------------
def test_prepare_keeps_squad_columns_and_names_the_bad_row(data_dir):
    table = squad(data_dir).slice(0, 50)
    ds = prepared(table)
    assert ds.column_names == ["id", "question", "context", "answers"]
    assert ds[0]["id"] == "56be4db0acb8001400a502ec"
    assert ds[0]["answers"] == {"text": ["Denver Broncos"] * 3, "answer_start": [177] * 3}
    # other column names, and no id column: the row numbers become the ids
    renamed = table.drop_columns(["id"]).rename_columns(["title", "c", "q", "a"])
    other = prepared(renamed, question_column="q", context_column="c", answers_column="a")
    assert other["id"][:3] == ["0", "1", "2"] and other["question"] == ds["question"]

    def bad(table: pa.Table, match: str, **options):
        with pytest.raises(DataError, match=match):
            prepared(table, **options)

    bad(table, r"'squad.parquet' has no column 'query' \(--question-column\)", question_column="query")
    questions = table.column("question").to_pylist()
    bad(table.set_column(3, "question", pa.array(questions[:7] + ["  "] + questions[8:])),
        r"'squad.parquet' row 7: column 'question' is empty")
    bad(table.set_column(4, "answers", pa.array([a["text"][0] for a in table.column("answers").to_pylist()])),
        r"column 'answers' of 'squad.parquet' is string; answers must be in SQuAD layout")
    answers = table.column("answers").to_pylist()
    answers[12] = {"text": answers[12]["text"], "answer_start": [s + 1 for s in answers[12]["answer_start"]]}
    bad(table.set_column(4, "answers", pa.array(answers)),
        r"'squad.parquet' row 12: column 'answers': answer_start \d+ does not point at its text .* in column "
        r"'context'")
    answers[12] = {"text": [], "answer_start": []}
    bad(table.set_column(4, "answers", pa.array(answers)), r"row 12: column 'answers' needs as many answer texts")
    ids = table.column("id").to_pylist()
    bad(table.set_column(0, "id", pa.array(ids[:20] + [ids[3]] + ids[21:])), r"row 20: column 'id' repeats the id")


# --- tokenize ---------------------------------------------------------------------------------------------
def _squeezed(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_train_windows_of_long_contexts_hold_the_answer_or_point_at_cls(data_dir, minilm, padding_side):
    """Every window's start/end positions are the smallest token span of the answer when the answer lies
    wholly inside the window's part of the context, and the CLS token otherwise. A tokenizer that pads
    on the left gets the context first (and cut), as run_qa.py does it."""
    tok = tokenizer(minilm)
    tok.padding_side = padding_side
    examples = prepared(squad(data_dir).take(LONG_CONTEXTS + list(range(40))))
    options = QA.options_class(doc_stride=32)
    features = QA.tokenize(examples, tok, options, 96, "train")
    assert features.column_names == ["input_ids", "token_type_ids", "attention_mask", "start_positions",
                                     "end_positions"]
    windows = QA.tokenize(examples, tok, options, 96, "eval")  # the same windows, with their example ids
    assert len(windows) == len(features) > 3 * len(examples)
    normalize = tok.backend_tokenizer.normalizer.normalize_str
    context = {e["id"]: e for e in examples}
    inside = outside = 0
    for feature, window in zip(features, windows):
        example = context[window["example_id"]]
        ids, s, e = feature["input_ids"], feature["start_positions"], feature["end_positions"]
        assert len(ids) <= 96
        spans = [o for o in window["offset_mapping"] if o is not None]
        context_first = window["offset_mapping"][1] is not None
        assert context_first == (padding_side == "left")
        start = example["answers"]["answer_start"][0]
        end = start + len(example["answers"]["text"][0])
        if spans[0][0] <= start and end <= spans[-1][1]:
            inside += 1
            answer = _squeezed(normalize(example["answers"]["text"][0]))
            assert answer in _squeezed(tok.decode(ids[s:e + 1])), (window["example_id"], s, e)
            assert answer not in _squeezed(tok.decode(ids[s + 1:e + 1]))  # the smallest such span
            assert answer not in _squeezed(tok.decode(ids[s:e]))
        else:
            outside += 1
            assert s == e == ids.index(tok.cls_token_id) == 0
    assert inside > 50 and outside > 50


def test_eval_windows_overlap_by_doc_stride_and_map_back_to_the_context(data_dir, minilm):
    tok = tokenizer(minilm)
    examples = prepared(squad(data_dir).take([LONG_CONTEXTS[0]]))
    windows = QA.tokenize(examples, tok, QA.options_class(), 384, "eval")
    assert windows.column_names == ["input_ids", "token_type_ids", "attention_mask", "example_id", "offset_mapping"]
    assert len(windows) >= 3 and set(windows["example_id"]) == {examples[0]["id"]}
    question_tokens = len(tok(examples[0]["question"])["input_ids"])  # [CLS] question [SEP]
    previous = None
    for window in windows:
        offsets, ids = window["offset_mapping"], window["input_ids"]
        assert len(ids) <= 384 and all(o is None for o in offsets[:question_tokens]) and offsets[-1] is None
        spans = offsets[question_tokens:-1]
        assert all(o is not None for o in spans)
        context = examples[0]["context"]
        assert _squeezed(tok.decode(ids[question_tokens:-1])) == _squeezed(
            tok.backend_tokenizer.normalizer.normalize_str(context[spans[0][0]:spans[-1][1]]))
        if previous is not None:  # the next window starts doc_stride tokens before the previous one ended
            assert previous[-128:] == spans[:128]
        previous = spans
    assert previous[-1][1] == len(context.rstrip())


def test_a_question_too_long_for_the_stride_is_named(data_dir, minilm):
    examples = prepared(squad(data_dir).slice(0, 5))
    with pytest.raises(DataError, match=r"row 0 \(id '56be4db0acb8001400a502ec'\): the question is 11 tokens long"):
        QA.tokenize(examples, tokenizer(minilm), QA.options_class(doc_stride=50), 64, "train")
    with pytest.raises(ConfigError, match="doc_stride 60 leaves no room"):
        QA.tokenize(examples, tokenizer(minilm), QA.options_class(doc_stride=60), 64, "eval")


# --- postprocess and metrics ------------------------------------------------------------------------------
def test_postprocess_takes_the_best_valid_span_over_all_windows():
    """Hand-made logits: spans in the question, reversed or longer than 30 tokens score higher than the
    answer and are skipped; a later window's span wins over an earlier one's with a higher score; an
    example whose 20 best start tokens all lie outside the context gets utils_qa's "empty"."""
    context = "The quick brown fox jumps over the lazy dog near the river bank"
    words = [(i, i + len(w)) for i, w in _word_starts(context)]
    q = [None] * 3  # [CLS] question [SEP]: outside the context
    windows = [q + words[0:6],  # example a, window 1: The .. over
               q + words[3:13],  # example a, window 2: fox .. bank
               q + (words * 3)[:37],  # example b: the words three times over
               [None] * 30 + words[:4]]  # example c: a long question
    width = 40
    start, end = np.full((4, width), -100.0, np.float32), np.full((4, width), -100.0, np.float32)  # -100: padding
    for row, offsets in enumerate(windows):
        start[row, :len(offsets)] = end[row, :len(offsets)] = -10.0
    start[0, 1] = end[0, 2] = 9.0  # in the question
    start[0, 5] = end[0, 3] = 5.0  # reversed
    start[0, 4] = end[0, 4] = 1.0  # "quick": 2.0
    start[1, 3], end[1, 5] = 3.0, 2.5  # "fox jumps over": 5.5, the best of example a
    start[2, 9] = end[2, 39] = 8.0  # 31 tokens
    start[2, 6], end[2, 8] = 1.0, 1.5  # "fox jumps over": 2.5
    start[3, :30] = np.linspace(20, 10, 30)
    end[3, 31] = 4.0
    features = datasets.Dataset.from_dict({"example_id": ["a", "a", "b", "c"], "offset_mapping": windows})
    answers = [{"text": ["fox jumps over"], "answer_start": [16]}, {"text": ["brown fox"], "answer_start": [10]},
               {"text": ["quick"], "answer_start": [4]}]
    examples = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "context": [context] * 3, "answers": answers})
    predictions, references = QA.postprocess((start, end), features, examples, None, None, (), QA.options_class())
    assert predictions == [{"id": "a", "prediction_text": "fox jumps over"},
                           {"id": "b", "prediction_text": "fox jumps over"},
                           {"id": "c", "prediction_text": "empty"}]
    assert references == [{"id": i, "answers": a} for i, a in zip("abc", answers)]
    metrics, details = QA.compute_metrics(predictions, references, (), QA.metrics)
    # a: exact; b: 1 of 3 predicted words in the 2 answer words, F1 = 2 * 1/3 * 1/2 / (1/3 + 1/2) = 0.4; c: 0
    assert list(metrics) == ["f1", "exact_match"] == list(QA.metrics)
    assert metrics["f1"] == pytest.approx(100 * 1.4 / 3) and metrics["exact_match"] == pytest.approx(100 / 3)
    assert details["examples"][1] == {"id": "b", "prediction": "fox jumps over", "answers": ["brown fox"]}


def _word_starts(text: str):
    position = 0
    for word in text.split():
        position = text.index(word, position)
        yield position, word
        position += len(word)


# --- training ---------------------------------------------------------------------------------------------
def _split(data_dir: Path, tmp_path: Path, train_rows: range, eval_rows: range) -> tuple[str, str]:
    table = squad(data_dir)
    paths = str(tmp_path / "train.parquet"), str(tmp_path / "eval.parquet")
    pq.write_table(table.take(list(train_rows)), paths[0])
    pq.write_table(table.take(list(eval_rows)), paths[1])
    return paths


@pytest.mark.slow
def test_short_training_fits_and_its_metrics_are_the_squad_modules(data_dir, minilm, tmp_path):
    """Three epochs over the windows of 64 Normans questions, evaluated on those questions: the
    evaluation's figures are the squad module's on answers found from logits computed here, and far
    above the untrained head's (the training fits its data)."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    from hfbatch.tasks.core.models import load_tokenizer, resolve_model, trained_model
    from hfbatch.tasks.core.store import Store
    from hfbatch.tasks.training.evaluation import evaluate_model
    from hfbatch.tasks.training.ingest import ingest
    from hfbatch.tasks.training.tokenization import tokenize
    from hfbatch.tasks.training.train import TrainConfig, train

    path = tmp_path / "normans.parquet"
    pq.write_table(squad(data_dir).slice(1057, 64), path)
    store, options = Store(str(tmp_path / "store")), QA.options_class(doc_stride=64)
    base = resolve_model(minilm, SETTINGS)
    examples = ingest(str(path), store, QA, options, SETTINGS)
    features = tokenize(examples, base, store, QA, options, SETTINGS, 192, "eval")
    data = tokenize(examples, base, store, QA, options, SETTINGS, 192)
    assert data.num_rows == features.num_rows > 64  # some contexts take two windows
    config = TrainConfig(epochs=3, batch_size=8, learning_rate=3e-4, save_steps=1000)
    trained = train(data, base, store, QA, options, config, SETTINGS)
    assert (trained.global_step, trained.train_samples, trained.task) == \
           (3 * -(-data.num_rows // 8), data.num_rows, "question-answering")
    model = trained_model(trained, store, SETTINGS)
    result = evaluate_model(model, examples, features, store, QA, options, SETTINGS)
    assert list(result.metrics) == ["f1", "exact_match"] and result.num_rows == 64

    # the same figures from logits computed here, window by window
    net = AutoModelForQuestionAnswering.from_pretrained(model.path).eval()
    windows = store.load_dataset(features.key)
    start, end = np.full((len(windows), 192), -100.0, np.float32), np.full((len(windows), 192), -100.0, np.float32)
    with torch.no_grad():
        for w, window in enumerate(windows):
            inputs = {k: torch.tensor([window[k]]) for k in ("input_ids", "token_type_ids", "attention_mask")}
            out = net(**inputs)
            start[w, :len(window["input_ids"])], end[w, :len(window["input_ids"])] = out.start_logits[0], out.end_logits[0]
    predictions, references = QA.postprocess((start, end), windows, store.load_dataset(examples.key),
                                             load_tokenizer(model, SETTINGS), net.config, (), options)
    expected = compute(("squad",), predictions, references)
    assert result.metrics == pytest.approx({k: expected[k] for k in QA.metrics})
    saved = store.local_dir(result.key)
    assert json.loads((saved / "metrics.json").read_text()) == result.metrics
    assert len(json.loads((saved / "examples.json").read_text())) == 20

    torch.manual_seed(0)  # the untrained head's weights
    untrained = evaluate_model(base, examples, features, store, QA, options, SETTINGS)
    assert result.metrics["f1"] > untrained.metrics["f1"] + 15, (result.metrics, untrained.metrics)


@pytest.mark.slow
def test_train_flow_registers_a_version_that_batch_inference_runs(prefect_harness, data_dir, minilm, tmp_path):
    from hfbatch.flows.inference import batch_inference
    from hfbatch.flows.training import train_flow
    from hfbatch.tasks.core.registry import Registry
    from hfbatch.tasks.core.store import Store

    train_file, eval_file = _split(data_dir, tmp_path, range(1057, 1169), range(1169, 1199))
    store = str(tmp_path / "store")
    result = call_flow(train_flow, task="question-answering", dataset=train_file, eval_dataset=eval_file, model=minilm,
                        name="squad-qa", max_train_samples=32, batch_size=16, max_length=128, doc_stride=48,
                        store=store)
    assert (result["task"], result["version"], result["promoted"], result["champion"]) == \
           ("question-answering", "1", True, "1")
    assert set(result["metrics"]) == {"f1", "exact_match"} and result["global_step"] == 2
    assert Registry(Store(store), "squad-qa").task("1") == "question-answering"
    card = (Path(store) / "models" / "squad-qa" / "1" / "README.md").read_text()
    assert "pipeline_tag: question-answering" in card and "| f1 |" in card and "extractive" in card

    rows = squad(data_dir).slice(1169, 30)
    questions = tmp_path / "questions.parquet"
    pq.write_table(rows.select(["id", "question", "context"]), questions)
    out = tmp_path / "answers"
    summary = call_flow(batch_inference, model="squad-qa", input=str(questions), output=str(out), store=store)
    assert (summary["rows"], summary["rows_out"], summary["model_version"]) == (30, 30, "1")
    got = pq.read_table(out)
    assert got.column_names == ["id", "row_id", "answer", "score", "start", "end", "model", "model_version"]
    assert got.column("id").to_pylist() == rows.column("id").to_pylist()
    contexts = rows.column("context").to_pylist()
    assert all(r["answer"] and contexts[i][r["start"]:r["end"]] == r["answer"] for i, r in enumerate(got.to_pylist()))


# --- bulk inference ---------------------------------------------------------------------------------------
def pipeline_answers(model_dir: str, questions: list[str], contexts: list[str], max_answer_len: int = 15) -> list:
    """What `pipeline("question-answering")` (transformers 4.x, default arguments) answers, computed here
    without hfbatch's predictor: each window through the model alone, every (start, end) span of context
    tokens up to `max_answer_len` scored as the pipeline scores it (softmax over the context and CLS of
    the start and of the end logits, multiplied), the 12 best of each window widened to whole words, the
    scores of equal answers (ignoring case) added over windows, the best kept."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    max_len = min(384, tok.model_max_length)
    results = []
    for question, context in zip(questions, contexts):
        enc = tok(question, context, truncation="only_second", max_length=max_len, stride=min(max_len // 2, 128),
                  return_overflowing_tokens=True, return_offsets_mapping=True)
        found: dict[str, dict] = {}
        for w, ids in enumerate(enc["input_ids"]):
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([enc["token_type_ids"][w]]))
            in_context = np.array([s == 1 for s in enc.sequence_ids(w)])
            kept = in_context.copy()
            kept[0] = True  # the pipeline keeps CLS in the softmax

            def softmax(logits, kept=kept):
                x = np.where(kept, logits[0].double().numpy(), -10000.0)
                p = np.exp(x - x.max())
                return p / p.sum()

            p_start, p_end = softmax(out.start_logits), softmax(out.end_logits)
            tokens = np.flatnonzero(in_context)
            spans = [(p_start[s] * p_end[e], s, e) for s in tokens for e in tokens if s <= e < s + max_answer_len]
            spans.sort(key=lambda x: -x[0])
            words, offsets = enc.word_ids(w), enc["offset_mapping"][w]
            for score, s, e in spans[:12]:
                a = min(offsets[t][0] for t in tokens if words[t] == words[s])
                b = max(offsets[t][1] for t in tokens if words[t] == words[e])
                answer = found.setdefault(context[a:b].lower(), {"answer": context[a:b], "start": a, "end": b,
                                                                 "score": 0.0})
                answer["score"] += score
        results.append(max(found.values(), key=lambda x: x["score"]))
    return results


def test_question_answering_gives_the_pipelines_answers(prefect_harness, minilm, data_dir, tmp_path, capsys):
    from hfbatch.flows.cli import main

    model = tiny_qa(minilm, tmp_path / "qa")
    rows = squad_rows(data_dir)
    path, out = tmp_path / "squad.parquet", tmp_path / "out"
    pq.write_table(rows, path, row_group_size=20)
    assert main(["infer", "--model", model, "--task", "question-answering", "--input", str(path),
                 "--output", str(out), "--columns", "question=q,context=c", "--shard-rows", "20",
                 "--batch-tokens", "2048", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["rows_out"], summary["shards"]) == (46, 46, 3)
    got = pq.read_table(out)
    assert got.column_names == ["id", "row_id", "answer", "score", "start", "end", "model", "model_version"]
    assert got.column("id").to_pylist() == rows.column("id").to_pylist()
    expected = pipeline_answers(model, rows.column("q").to_pylist(), rows.column("c").to_pylist())
    assert [(a, s, e) for a, s, e in zip(*(got.column(c).to_pylist() for c in ("answer", "start", "end")))] == \
           [(e["answer"], e["start"], e["end"]) for e in expected]
    np.testing.assert_allclose(got.column("score").to_numpy(), [e["score"] for e in expected], rtol=1e-4, atol=1e-6)
    contexts = rows.column("c").to_pylist()
    assert all(contexts[i][r["start"]:r["end"]] == r["answer"] for i, r in enumerate(got.to_pylist()))
