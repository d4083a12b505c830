"""Token classification: CoNLL-2003 rows prepared and tokenized as run_ner.py does it (each word's tag on its
first sub-token), bad rows named, a real (short) fine-tuning scored with seqeval, the train flow registering
a version that bulk inference then runs, and bulk inference giving the pipeline's aggregated entities."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.errors import DataError
from hfbatch.tasks.recipes import get_recipe
from tests.helpers import NER_LABELS, SETTINGS, artifact_keys, call_flow, resolve_model, run_local, texts_of

NER = get_recipe("token-classification")
SORTED_TAGS = ("O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER")
ENTITY_TYPES = {"PER", "ORG", "LOC", "MISC"}


def conll_rows(data_dir: Path, split: str = "validation", rows: int = 300) -> pa.Table:
    return pq.read_table(data_dir / "conll2003" / f"{split}.parquet").slice(0, rows)


def prepared(table: pa.Table, label_names=None, src: str = "conll.parquet", **options):
    return NER.prepare(datasets.Dataset(table), src, NER.options_class(**options), label_names)


def tag_names(ds: datasets.Dataset) -> list[list[str]]:
    names = ds.features["tags"].feature.names
    return [[names[i] for i in row] for row in ds["tags"]]


@pytest.fixture(scope="module")
def conll_files(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """400 CoNLL-2003 training sentences and 200 validation sentences (every one shorter than 128 sub-tokens)."""
    out = tmp_path_factory.mktemp("conll-train")
    pq.write_table(conll_rows(data_dir, "train", 400), out / "train.parquet")
    pq.write_table(conll_rows(data_dir, "validation", 200), out / "eval.parquet")
    return out / "train.parquet", out / "eval.parquet"


def test_prepare_keeps_words_and_tags_by_name(data_dir, tmp_path):
    from hfbatch.tasks.core.store import Store
    from hfbatch.tasks.training.ingest import ingest

    table = conll_rows(data_dir)
    words, tags = table.column("tokens").to_pylist(), table.column("ner_tags").to_pylist()
    ds, names = prepared(table)
    assert names == SORTED_TAGS  # the distinct tags sorted, O first
    assert ds.column_names == ["tokens", "tags"] and ds["tokens"] == words and tag_names(ds) == tags

    # given tag names (an eval set takes its training set's) fix the ids, whatever their order
    ds, names = prepared(table, label_names=tuple(reversed(NER_LABELS)))
    assert names == tuple(reversed(NER_LABELS)) and tag_names(ds) == tags

    # ids with ClassLabel names (the Hugging Face conll2003 layout), read from Parquet through ingest
    features = datasets.Features({"words": datasets.Sequence(datasets.Value("string")),
                                  "ner": datasets.Sequence(datasets.ClassLabel(names=NER_LABELS))})
    ids = datasets.Dataset.from_dict({"words": words, "ner": [[NER_LABELS.index(t) for t in row] for row in tags]},
                                     features=features)
    ids.to_parquet(str(tmp_path / "ids.parquet"))
    store, options = Store(str(tmp_path / "store")), NER.options_class(tokens_column="words", tags_column="ner")
    ref = ingest(str(tmp_path / "ids.parquet"), store, NER, options, SETTINGS)
    assert ref.label_names == tuple(NER_LABELS) and ref.num_rows == len(words)
    stored = store.load_dataset(ref.key)
    assert stored["tokens"] == words and tag_names(stored) == tags


def test_tokenize_tags_the_first_subtoken_of_each_word(data_dir, minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    normalize = tokenizer.backend_tokenizer.normalizer.normalize_str  # lower case, accents stripped
    ds, _ = prepared(conll_rows(data_dir))
    features = NER.tokenize(ds, tokenizer, NER.options_class(), 128, "train")
    assert {"input_ids", "attention_mask", "labels"} <= set(features.column_names)
    assert "tokens" not in features.column_names and "tags" not in features.column_names
    split_words = 0
    for i in range(0, len(ds), 7):
        words, tags, labels = ds[i]["tokens"], ds[i]["tags"], features[i]["labels"]
        pieces = tokenizer.convert_ids_to_tokens(features[i]["input_ids"])
        word_ids = tokenizer(words, is_split_into_words=True, truncation=True, max_length=128).word_ids()
        firsts = [j for j, w in enumerate(word_ids) if w is not None and w != word_ids[j - 1]]
        assert [word_ids[j] for j in firsts] == list(range(len(words)))  # nothing truncated in these rows
        assert [labels[j] for j in firsts] == tags  # each word's tag on its first sub-token ...
        assert all(v == -100 for j, v in enumerate(labels) if j not in firsts)  # ... and nowhere else
        for j, word in zip(firsts, words):  # the labelled sub-token begins its word
            assert pieces[j] == "[UNK]" or normalize(word).startswith(pieces[j])
        split_words += len(labels) - 2 - len(words)
    assert split_words > 100  # many words are several sub-tokens here

    # truncation: the words that still have a first sub-token keep their tags, the rest are cut
    longest = int(np.argmax([len(w) for w in ds["tokens"]]))
    short = NER.tokenize(ds.select([longest]), tokenizer, NER.options_class(), 16, "train")[0]
    kept = [v for v in short["labels"] if v != -100]
    assert len(short["input_ids"]) == 16 and 0 < len(kept) < len(ds[longest]["tokens"])
    assert kept == ds[longest]["tags"][: len(kept)]


def test_bad_rows_are_named(data_dir):
    table = conll_rows(data_dir, rows=20)
    words, tags = table.column("tokens").to_pylist(), table.column("ner_tags").to_pylist()

    def table_with(row: int, words_row="keep", tags_row="keep") -> pa.Table:
        w, t = list(words), list(tags)
        if words_row != "keep":
            w[row] = words_row
        if tags_row != "keep":
            t[row] = tags_row
        return pa.table({"tokens": pa.array(w, pa.list_(pa.string())), "ner_tags": pa.array(t, pa.list_(pa.string()))})

    with pytest.raises(DataError, match=r"'conll.parquet' has no column 'labels' \(--tags-column\)"):
        prepared(table, tags_column="labels")
    with pytest.raises(DataError, match=r"row 7: column 'ner_tags' has a different number of tags than column "
                                        r"'tokens' has words"):
        prepared(table_with(7, tags_row=tags[7][:-1]))
    with pytest.raises(DataError, match=r"row 11: unknown tag 'B-DATE' in column 'ner_tags'"):
        prepared(table_with(11, tags_row=["B-DATE"] + tags[11][1:]), label_names=tuple(NER_LABELS))
    with pytest.raises(DataError, match=r"row 3: column 'tokens' is null"):
        prepared(table_with(3, words_row=None))
    with pytest.raises(DataError, match=r"row 4: column 'tokens' is an empty list of words"):
        prepared(table_with(4, words_row=[], tags_row=[]))
    with pytest.raises(DataError, match=r"row 5: column 'tokens' has an empty word"):
        prepared(table_with(5, words_row=[""] + words[5][1:]))
    with pytest.raises(DataError, match=r"row 9: column 'ner_tags' has a null tag"):
        prepared(table_with(9, tags_row=[None] + tags[9][1:]))
    with pytest.raises(DataError, match=r"row 2: tag 'PER' in column 'ner_tags' is not an IOB2 tag"):
        prepared(table_with(2, tags_row=["PER"] * len(tags[2])))
    with pytest.raises(DataError, match=r"tags must be names \(e.g. B-PER\) or ids with ClassLabel names"):
        prepared(pa.table({"tokens": table.column("tokens"),
                           "ner_tags": [[NER_LABELS.index(t) for t in row] for row in tags]}))
    with pytest.raises(DataError, match=r"column 'tokens' of 'conll.parquet' is string, not a list of words"):
        prepared(pa.table({"tokens": [" ".join(w) for w in words], "ner_tags": tags}))


def test_training_data_without_entities_is_refused_and_a_tagger_of_none_is_not_promoted(data_dir, minilm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    table = conll_rows(data_dir)
    words, tags = table.column("tokens").to_pylist(), table.column("ner_tags").to_pylist()

    def checked(tag_rows):
        ds, names = prepared(pa.table({"tokens": words, "ner_tags": tag_rows}))
        return NER.check_training_data(NER.tokenize(ds, tokenizer, NER.options_class(), 128, "train"), names,
                                       "conll.parquet")

    mentions = sum(t.startswith("B-") for row in tags for t in row)  # IOB2: each entity begins with B-
    assert checked(tags) == []
    row = next(i for i, r in enumerate(tags) if r[:2] == ["O", "O"])  # a word tagged O before another O
    rare = [["B-EVENT", *r[1:]] if i == row else r for i, r in enumerate(tags)]
    assert checked(rare) == [(f"entity type 'EVENT' has 1 of {mentions + 1} training mentions "
                              f"({1 / (mentions + 1):.2%}): predictions of it are unreliable")]
    with pytest.raises(DataError, match="'conll.parquet' has no entity tags"):
        checked([["O"] * len(r) for r in tags])

    # the gate: a tagger that finds no entity never becomes champion; one that finds some may
    scores, details = NER.compute_metrics([["O"] * len(r) for r in tags], tags, SORTED_TAGS, NER.metrics)
    assert scores["overall_f1"] == 0 and details["entities"] == {"predicted": 0, "reference": mentions}
    assert NER.gate_problem(scores, details) == "it tags no entity in the eval set (a degenerate model)"
    scores, details = NER.compute_metrics(tags, tags, SORTED_TAGS, NER.metrics)
    assert scores["overall_f1"] == 1 and NER.gate_problem(scores, details) is None


@pytest.mark.slow
def test_short_training_is_scored_by_seqeval(conll_files, minilm, tmp_path):
    """MiniLM fine-tuned on 400 CoNLL sentences (50 steps); the evaluation's figures are seqeval's on
    predictions made here by hand, word by word."""
    import torch
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.metrics.sequence_labeling import get_entities
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from hfbatch.tasks.core.models import trained_model
    from hfbatch.tasks.core.store import Store
    from hfbatch.tasks.training.evaluation import evaluate_model
    from hfbatch.tasks.training.ingest import ingest
    from hfbatch.tasks.training.tokenization import tokenize
    from hfbatch.tasks.training.train import TrainConfig, train

    train_file, eval_file = conll_files
    store, options = Store(str(tmp_path / "store")), NER.options_class()
    base = resolve_model(minilm)
    data = ingest(str(train_file), store, NER, options, SETTINGS)
    examples = ingest(str(eval_file), store, NER, options, SETTINGS, data.label_names)
    assert data.label_names == examples.label_names == SORTED_TAGS
    trained = train(tokenize(data, base, store, NER, options, SETTINGS), base, store, NER, options,
                    TrainConfig(epochs=2, batch_size=16, save_steps=1000), SETTINGS)
    assert trained.global_step == 50 and trained.label_names == SORTED_TAGS
    model = trained_model(trained, store, SETTINGS)
    config = json.loads((Path(model.path) / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(SORTED_TAGS)}
    assert config["label2id"] == {n: i for i, n in enumerate(SORTED_TAGS)}
    assert "`LOC`, `MISC`, `ORG`, `PER`" in (Path(model.path) / "README.md").read_text()

    features = tokenize(examples, model, store, NER, options, SETTINGS, split="eval")
    result = evaluate_model(model, examples, features, store, NER, options, SETTINGS)
    assert list(result.metrics) == list(NER.metrics) and all(0 <= v <= 1 for v in result.metrics.values())
    assert result.metrics["overall_f1"] > 0.2  # an untrained head finds no entities
    per_type = result.details["per_type"]
    assert set(per_type) == ENTITY_TYPES
    references = pq.read_table(eval_file).column("ner_tags").to_pylist()
    for name, figures in per_type.items():
        assert set(figures) == {"precision", "recall", "f1", "number"}
        assert figures["number"] == sum(t == f"B-{name}" for row in references for t in row)
    assert result.details["entities"]["reference"] == sum(v["number"] for v in per_type.values())
    assert (Path(store.path(result.key)) / "per_type.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    net = AutoModelForTokenClassification.from_pretrained(model.path).eval()
    predictions = []
    with torch.inference_mode():
        for words in pq.read_table(eval_file).column("tokens").to_pylist():
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=128, return_tensors="pt")
            best = net(**enc).logits[0].argmax(-1).tolist()
            word_ids = enc.word_ids()
            firsts = [j for j, w in enumerate(word_ids) if w is not None and w != word_ids[j - 1]]
            predictions.append([net.config.id2label[best[j]] for j in firsts])
    assert result.metrics["overall_f1"] == pytest.approx(f1_score(references, predictions))
    assert result.metrics["overall_precision"] == pytest.approx(precision_score(references, predictions))
    assert result.metrics["overall_recall"] == pytest.approx(recall_score(references, predictions))
    assert result.metrics["overall_accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert result.details["entities"]["predicted"] == len(get_entities(predictions)) > 0
    assert NER.gate_problem(result.metrics, result.details) is None


@pytest.mark.slow
def test_train_flow_registers_a_tagger_that_bulk_inference_runs(prefect_harness, conll_files, conll, minilm,
                                                                 tmp_path):
    from hfbatch.flows.inference import batch_inference
    from hfbatch.flows.training import train_flow

    train_file, eval_file = conll_files
    store = tmp_path / "store"
    result = call_flow(train_flow, task="token-classification", dataset=str(train_file), eval_dataset=str(eval_file),
                        model=minilm, name="conll-ner", epochs=2, batch_size=16, save_steps=1000, store=str(store))
    assert (result["version"], result["promoted"], result["champion"], result["reason"]) == \
           ("1", True, "1", "first version")
    assert result["task"] == "token-classification" and list(result["metrics"]) == list(NER.metrics)
    index = json.loads((store / "models" / "conll-ner" / "registry.json").read_text())
    assert [(v["version"], v["task"]) for v in index["versions"]] == [("1", "token-classification")]
    card = (store / "models" / "conll-ner" / "1" / "README.md").read_text()
    assert "pipeline_tag: token-classification" in card and "| overall_f1 |" in card and "`PER`" in card
    assert {"conll-ner-eval-metrics", "conll-ner-eval-per-type", "conll-ner-registration"} <= artifact_keys("conll-ner")

    # the registered name alone: the registry says which task runs it
    summary = call_flow(batch_inference, model="conll-ner", input=str(conll), output=str(tmp_path / "out"), store=str(store))
    assert (summary["rows"], summary["rows_out"], summary["model_version"]) == (120, 120, "1")
    entities = pq.read_table(tmp_path / "out").column("entities").to_pylist()
    found = [e for row in entities for e in row]
    assert len(found) > 20 and {e["entity_group"] for e in found} <= ENTITY_TYPES
    assert all(0 < e["score"] <= 1 and e["start"] < e["end"] for e in found)


def test_token_classification_matches_pipeline(tiny_models, conll, tmp_path):
    from transformers import pipeline

    model = tiny_models["token-classification"]
    run_local("ner", resolve_model(model), str(conll), str(tmp_path / "out"), shard_rows=50)
    got = pq.read_table(tmp_path / "out").column("entities").to_pylist()
    pipe = pipeline("token-classification", model=model, tokenizer=model, aggregation_strategy="simple")
    expected = pipe(texts_of(conll))
    assert len(got) == len(expected) == 120
    for g, e in zip(got, expected):
        assert [(x["entity_group"], x["word"], x["start"], x["end"]) for x in g] == \
               [(x["entity_group"], x["word"], x["start"], x["end"]) for x in e]
        np.testing.assert_allclose([x["score"] for x in g], [x["score"] for x in e], atol=1e-4)
