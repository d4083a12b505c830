"""Translation and summarization on real WMT22 de→en and IMDb rows: options, prepare and tokenize, bad
input, the bulk predictor against per-row `model.generate`, a short real training of an
EncoderDecoderModel warm-started from MiniLM, and the train flow registering a translation model that
batch_inference then runs by name."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.core.models import load_tokenizer, local_model, trained_model
from hfbatch.tasks.core.options import validated
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store
from hfbatch.tasks.predictors import get_predictor_class
from hfbatch.tasks.predictors.seq2seq import Seq2SeqPredictor
from hfbatch.tasks.recipes import all_recipes, get_recipe, task_names
from hfbatch.tasks.recipes.seq2seq import Seq2Seq, Seq2SeqOptions
from hfbatch.tasks.training.evaluation import evaluate_model
from hfbatch.tasks.training.ingest import ingest
from hfbatch.tasks.training.tokenization import tokenize
from hfbatch.tasks.training.train import TrainConfig, train
from tests.generation_models import seq2seq_builders
from tests.helpers import call_flow, predictor, resolve_model, run_local

TRANSLATION, SUMMARIZATION = get_recipe("translation"), get_recipe("summarization")
PREFIX = "translate German to English: "


def options(recipe=TRANSLATION, **kwargs):
    return recipe.options_class(**{"source_column": "source", "target_column": "ref_a", **kwargs})


@pytest.fixture(scope="module")
def wmt(data_dir) -> pa.Table:
    return pq.read_table(data_dir / "wmt22_de_en" / "test.parquet")


@pytest.fixture(scope="module")
def wmt_short(wmt, tmp_path_factory) -> tuple[Path, Path]:
    """WMT22 de→en pairs of at most 10 words on both sides (580 of 1,984): the first 500 to train on,
    the last 60 held out."""
    def words(column):
        return pc.list_value_length(pc.utf8_split_whitespace(wmt[column]))

    short = wmt.filter(pc.and_(pc.less_equal(words("source"), 10), pc.less_equal(words("ref_a"), 10)))
    out = tmp_path_factory.mktemp("wmt")
    pq.write_table(short.slice(0, 500), out / "train.parquet")
    pq.write_table(short.slice(short.num_rows - 60, 60), out / "eval.parquet")
    return out / "train.parquet", out / "eval.parquet"


@pytest.fixture(scope="module")
def imdb_lead(data_dir, tmp_path_factory) -> Path:
    """40 IMDb reviews with their first sentence as the reference summary (a lead-1 summary)."""
    texts = pq.read_table(data_dir / "imdb" / "test_sample.parquet").column("text").to_pylist()[:40]
    leads = [re.split(r"(?<=[.!?])\s+", t, maxsplit=1)[0] for t in texts]
    path = tmp_path_factory.mktemp("imdb") / "imdb.parquet"
    pq.write_table(pa.table({"review": texts, "lead": leads}), path)
    return path


@pytest.fixture(scope="module")
def tiny_seq2seq(minilm, wmt, tmp_path_factory) -> dict[str, str]:
    """Tiny random Marian, T5 and BART models with MiniLM's WordPiece tokenizer ([CLS] starts, [SEP]
    ends, [PAD] pads), initialised with a large variance so that outputs depend on the input. BART's
    end token gets a bias that ends about a quarter of the WMT rows early, the others at the limit."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    root, paths = tmp_path_factory.mktemp("seq2seq"), {}
    for name, build in seq2seq_builders(tokenizer, t5_init=5.0, t5_tied=True).items():
        torch.manual_seed(0)
        model = build().eval()
        if name == "bart":
            enc = tokenizer(wmt.column("source").to_pylist()[:40], padding=True, return_tensors="pt",
                            return_token_type_ids=False)
            with torch.no_grad():
                logits = model(**enc, decoder_input_ids=torch.full((40, 1), 101)).logits[:, -1]
                model.final_logits_bias[0, 102] = 0.8 * (logits.max(-1).values - logits[:, 102]).mean()
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def test_both_tasks_share_one_base_and_one_option_model():
    assert {"translation", "summarization"} <= set(task_names())
    assert isinstance(TRANSLATION, Seq2Seq) and isinstance(SUMMARIZATION, Seq2Seq)
    assert not any(type(r) is Seq2Seq for r in all_recipes().values())  # the base names no task
    assert TRANSLATION.options_class is SUMMARIZATION.options_class is Seq2SeqOptions
    assert TRANSLATION.default_metric == "bleu" and SUMMARIZATION.default_metric == "rougeLsum"
    assert any("MarianMTModel".endswith(h) for h in TRANSLATION.heads)


def test_source_and_target_columns_are_required():
    with pytest.raises(ConfigError, match="--source-column is required; --text-column: no such option"):
        validated(Seq2SeqOptions, {"target_column": "ref_a", "text_column": "text"})
    with pytest.raises(ConfigError, match="--target-column is required"):
        validated(Seq2SeqOptions, {"source_column": "source"})
    assert options().columns() == {"source_column": "source", "target_column": "ref_a"}


def test_prepare_and_tokenize_wmt(wmt_short, minilm, tmp_path):
    store, settings = Store(str(tmp_path / "store")), Settings()
    opts = options(source_prefix=PREFIX, generation_max_length=12)
    data = ingest(str(wmt_short[1]), store, TRANSLATION, opts, settings)
    prepared = store.load_dataset(data.key)
    source = pq.read_table(wmt_short[1])
    assert prepared.column_names == ["source", "target"] and data.num_rows == 60 and data.label_names == ()
    assert prepared["source"] == source.column("source").to_pylist()
    assert prepared["target"] == source.column("ref_a").to_pylist()

    model = resolve_model(minilm)
    features = store.load_dataset(tokenize(data, model, store, TRANSLATION, opts, settings, 16, "eval").key)
    tokenizer = load_tokenizer(model, settings)
    assert set(features.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    prefix = tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
    for row, ids, labels in zip(prepared, features["input_ids"], features["labels"]):
        assert ids == tokenizer(PREFIX + row["source"], truncation=True, max_length=16)["input_ids"]
        assert ids[1: 1 + len(prefix)] == prefix and len(ids) <= 16
        assert labels == tokenizer(text_target=row["target"], truncation=True, max_length=12)["input_ids"]
    assert max(map(len, features["labels"])) == 12  # long references are cut at generation_max_length


def test_bad_input_is_named(wmt, tmp_path):
    store, settings = Store(str(tmp_path / "store")), Settings()
    rows = wmt.slice(0, 8)

    def write(name, table):
        pq.write_table(table, tmp_path / name)
        return str(tmp_path / name)

    sources = rows.column("source").to_pylist()
    with_null = write("null.parquet", rows.set_column(1, "source", pa.array(sources[:5] + [None] + sources[6:])))
    with pytest.raises(DataError, match=r"row 5: column 'source' is null"):
        ingest(with_null, store, TRANSLATION, options(), settings)
    refs = rows.column("ref_a").to_pylist()
    empty = write("empty.parquet", rows.set_column(2, "ref_a", pa.array(refs[:3] + ["  "] + refs[4:])))
    with pytest.raises(DataError, match=r"row 3: column 'ref_a' is empty"):
        ingest(empty, store, TRANSLATION, options(), settings)
    with pytest.raises(DataError, match=r"no column 'summary' \(--target-column\)"):
        ingest(write("ok.parquet", rows), store, TRANSLATION, options(target_column="summary"), settings)
    with pytest.raises(DataError, match="column 'id' .* is int64, not text"):
        ingest(write("ok.parquet", rows), store, TRANSLATION, options(source_column="id"), settings)


def test_unknown_forced_bos_token_is_a_config_error(tiny_seq2seq, wmt_short, tmp_path):
    store, settings = Store(str(tmp_path / "store")), Settings()
    model = resolve_model(tiny_seq2seq["marian"])
    data = ingest(str(wmt_short[1]), store, TRANSLATION, options(), settings)
    with pytest.raises(ConfigError, match="forced_bos_token 'xx_XX' is not a token"):
        tokenize(data, model, store, TRANSLATION, options(forced_bos_token="xx_XX"), settings, 32)
    with pytest.raises(ConfigError, match="forced_bos_token 'xx_XX' is not a token"):
        predictor("translation", model, forced_bos_token="xx_XX")


@pytest.mark.parametrize("name", ["marian", "t5", "bart"])
def test_predictor_equals_generate_row_by_row(name, tiny_seq2seq, wmt):
    """Greedy and beam search over length-sorted, padded token-budget batches (several at once on the
    CPU) give each row exactly what `model.generate` gives for it alone; results come back in input order."""
    texts = wmt.column("source").to_pylist()[:40]
    model = resolve_model(tiny_seq2seq[name])
    for beams in (None, 3):
        used = predictor("translation", model, num_beams=beams, max_new_tokens=20, source_prefix=PREFIX)
        assert used.generation_config.num_beams == beams or (beams is None and not used.generation_config.num_beams)
        table, tokens = used.predict({"text": texts}, 256)  # 256 tokens: several batches
        assert table.column_names == ["generated_text", "input_tokens", "output_tokens", "finish_reason"]
        got = table.to_pylist()
        assert got == [_generate_alone(used, text) for text in texts]
        assert tokens == sum(r["input_tokens"] for r in got)
        assert all(r["finish_reason"] == "eos" or r["output_tokens"] == 20 for r in got)
        assert len({r["generated_text"] for r in got}) > 5  # outputs depend on the input
        if name == "bart":
            assert {r["finish_reason"] for r in got} == {"eos", "length"}


def _generate_alone(used, text: str, prefix: str = PREFIX) -> dict:
    """The predictor's output row for `text`, from `model.generate` on that row alone (one thread: tiny
    models decode far slower with two threads on busy cores)."""
    import torch

    enc = used.tokenizer(prefix + text, truncation=True, max_length=used.max_length, return_tensors="pt",
                         return_token_type_ids=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            alone = used.model.generate(**enc, generation_config=used.generation_config)[0, 1:].tolist()
    finally:
        torch.set_num_threads(threads)
    ended = 102 in alone
    new = alone[: alone.index(102) + 1] if ended else alone
    return {"generated_text": used.tokenizer.decode(new, skip_special_tokens=True).strip(),
            "input_tokens": enc["input_ids"].shape[1], "output_tokens": len(new),
            "finish_reason": "eos" if ended else "length"}


def test_text2text_generation_runs_a_seq2seq_model_in_bulk(tiny_seq2seq, wmt, tmp_path):
    """text2text-generation (inference only) runs T5 with a task prefix through the runner: each row's
    output is what `model.generate` gives it alone, over shards and batches."""
    with pytest.raises(ConfigError, match="predicts with text2text-generation models but does not train them"):
        get_recipe("text2text-generation")
    assert issubclass(get_predictor_class("text2text-generation"), Seq2SeqPredictor)
    rows = wmt.slice(0, 30)
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": rows.column("id"), "text": rows.column("source")}), path, row_group_size=10)
    model = resolve_model(tiny_seq2seq["t5"])
    settings = {"source_prefix": "summarize: ", "max_new_tokens": 12, "num_beams": 2}
    manifest = run_local("text2text-generation", model, str(path), str(tmp_path / "out"), shard_rows=10,
                         batch_tokens=300, **settings)
    assert (manifest["rows_out"], manifest["shards"]) == (30, 3)
    out = pq.read_table(tmp_path / "out")
    assert out.column("id").to_pylist() == rows.column("id").to_pylist()
    used = predictor("text2text-generation", model, **settings)
    assert out.select(["generated_text", "input_tokens", "output_tokens", "finish_reason"]).to_pylist() == \
        [_generate_alone(used, t, "summarize: ") for t in rows.column("source").to_pylist()]


def test_predictor_forced_bos_token_and_empty_input(tiny_seq2seq, wmt):
    model = resolve_model(tiny_seq2seq["bart"])
    used = predictor("translation", model, forced_bos_token="[unused1]", max_new_tokens=6)
    table, _ = used.predict({"text": wmt.column("source").to_pylist()[:4]}, 4096)
    assert used.generation_config.forced_bos_token_id == used.tokenizer.convert_tokens_to_ids("[unused1]") == 2
    assert all(t.startswith("[unused1]") for t in table.column("generated_text").to_pylist())
    empty, tokens = used.predict({"text": []}, 4096)
    assert empty.num_rows == 0 and tokens == 0 and empty.schema == used.schema


def test_trainer_puts_the_options_in_the_generation_config(tiny_seq2seq, tmp_path):
    """The Seq2SeqTrainer generates as the options say, and the model saved after training keeps those
    settings: greedy search over a checkpoint tuned for beams still saves (beam-only settings dropped)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    net = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq["bart"])
    net.generation_config.update(num_beams=4, early_stopping=True, length_penalty=2.0)  # a summarizer's settings
    tokenizer = AutoTokenizer.from_pretrained(tiny_seq2seq["bart"])
    opts = options(num_beams=1, forced_bos_token="[unused1]", generation_max_length=40)
    args = TRANSLATION.training_arguments(opts, output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = TRANSLATION.trainer(model=net, args=args, processing_class=tokenizer,
                                  data_collator=TRANSLATION.collator(tokenizer, net))
    assert type(trainer).__name__ == "Seq2SeqTrainer"
    assert (args.predict_with_generate, args.generation_max_length, args.generation_num_beams) == (True, 40, 1)
    net.generation_config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert (saved["num_beams"], saved["forced_bos_token_id"], saved["max_length"]) == (1, 2, 40)
    assert "early_stopping" not in saved and "length_penalty" not in saved


def test_summarization_evaluates_with_rouge_on_imdb(tiny_seq2seq, imdb_lead, tmp_path):
    """An untrained tiny BART summarizing IMDb reviews through evaluate_model: ROUGE in [0, 1] (near 0),
    and the same figures the metric gives on the decoded texts."""
    store, settings = Store(str(tmp_path / "store")), Settings()
    opts = options(SUMMARIZATION, source_column="review", target_column="lead", generation_max_length=16)
    data = ingest(str(imdb_lead), store, SUMMARIZATION, opts, settings)
    model = resolve_model(tiny_seq2seq["bart"])
    features = tokenize(data, model, store, SUMMARIZATION, opts, settings, SUMMARIZATION.max_length, "eval")
    assert max(map(len, store.load_dataset(features.key)["input_ids"])) == 512  # long reviews truncated
    result = evaluate_model(model, data, features, store, SUMMARIZATION, opts, settings, batch_size=16)
    assert list(result.metrics) == ["rougeLsum", "rouge1", "rouge2", "rougeL"]
    assert all(0.0 <= v < 0.2 for v in result.metrics.values())
    samples = result.details["samples"]
    assert len(samples) == 20 and any(s["prediction"] for s in samples)
    assert samples[0]["reference"].split()[:3] == pq.read_table(imdb_lead)["lead"][0].as_py().lower().split()[:3]
    same, _ = SUMMARIZATION.compute_metrics([s["reference"] for s in samples], [s["reference"] for s in samples],
                                            (), SUMMARIZATION.metrics)
    assert same == {m: pytest.approx(1.0) for m in SUMMARIZATION.metrics}


@pytest.mark.slow
def test_encoder_decoder_from_minilm_loss_falls_and_bleu_rises(wmt_short, minilm, tmp_path, caplog):
    """MiniLM warm-starts an EncoderDecoderModel (encoder and decoder from its weights); 64 steps on 500
    WMT22 de→en pairs lower the loss and raise BLEU on 60 held-out pairs above the untrained model's."""
    import torch
    from transformers import set_seed

    store, settings = Store(str(tmp_path / "store")), Settings()
    opts = options(generation_max_length=32)
    base = resolve_model(minilm)
    tokenizer = load_tokenizer(base, settings)
    train_data, eval_data = (ingest(str(p), store, TRANSLATION, opts, settings) for p in wmt_short)
    train_features = tokenize(train_data, base, store, TRANSLATION, opts, settings, 32)
    eval_features = tokenize(eval_data, base, store, TRANSLATION, opts, settings, 32, "eval")
    held_out = store.load_dataset(eval_features.key)

    set_seed(42)  # the new cross-attention weights train() starts from (the default seed)
    with caplog.at_level(logging.INFO, logger="hfbatch.tasks.recipes.seq2seq"):
        untrained = TRANSLATION.model_for_training(base, (), settings)
    assert "warm-starting an EncoderDecoderModel" in caplog.text
    assert type(untrained).__name__ == "EncoderDecoderModel"
    assert (untrained.config.decoder_start_token_id, untrained.config.pad_token_id) == (101, 0)
    assert untrained.generation_config.eos_token_id == 102 and untrained.config.vocab_size == 30522
    untrained.save_pretrained(tmp_path / "untrained")
    tokenizer.save_pretrained(tmp_path / "untrained")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on busy shared cores one thread trains this model several times faster than two
    try:
        before = evaluate_model(local_model("untrained", tmp_path / "untrained", settings), eval_data,
                                eval_features, store, TRANSLATION, opts, settings)
        config = TrainConfig(epochs=2, learning_rate=5e-4, batch_size=16, save_steps=1000)
        trained = trained_model(train(train_features, base, store, TRANSLATION, opts, config, settings), store,
                                settings)
        after = evaluate_model(trained, eval_data, eval_features, store, TRANSLATION, opts, settings)
        losses = [_loss(untrained, held_out, tokenizer),
                  _loss(TRANSLATION.trained_model(trained, settings), held_out, tokenizer)]
    finally:
        torch.set_num_threads(threads)
    assert losses[1] < losses[0] - 2, losses  # held-out cross-entropy per token
    assert after.metrics["bleu"] > before.metrics["bleu"], (before.metrics, after.metrics)
    saved = json.loads((Path(trained.path) / "generation_config.json").read_text())
    assert saved["max_length"] == 32 and saved["decoder_start_token_id"] == 101


def _loss(model, features, tokenizer) -> float:
    """The model's mean cross-entropy on tokenized rows, batched by the recipe's collator."""
    import torch

    rows = [{k: row[k] for k in ("input_ids", "attention_mask", "labels")} for row in features]
    with torch.inference_mode():
        return model.eval()(**TRANSLATION.collator(tokenizer, model)(rows)).loss.item()


@pytest.mark.slow
def test_train_flow_registers_translation_and_batch_inference_uses_it(prefect_harness, tiny_seq2seq, wmt_short,
                                                                      tmp_path):
    from hfbatch.flows.inference import batch_inference
    from hfbatch.flows.training import train_flow

    store = str(tmp_path / "store")
    result = call_flow(train_flow, task="translation", dataset=str(wmt_short[0]), eval_dataset=str(wmt_short[1]),
                        model=tiny_seq2seq["marian"], name="de-en", source_column="source", target_column="ref_a",
                        source_prefix=PREFIX, generation_max_length=16, num_beams=2, max_train_samples=64,
                        batch_size=16, max_length=32, store=store)
    assert (result["task"], result["version"], result["champion"], result["promoted"]) == \
           ("translation", "1", "1", True)
    assert set(result["metrics"]) == {"bleu", "chrf"} and result["global_step"] == 12  # 3 epochs of 4 steps
    version = Path(store) / "models" / "de-en" / "1"
    card = (version / "README.md").read_text()
    assert "A translation model" in card and "| bleu |" in card and "pipeline_tag: translation" in card
    generation = json.loads((version / "generation_config.json").read_text())
    assert (generation["max_length"], generation["num_beams"]) == (16, 2)

    texts = pq.read_table(wmt_short[1]).slice(0, 25)
    pq.write_table(pa.table({"id": texts.column("id"), "text": texts.column("source")}), tmp_path / "in.parquet",
                   row_group_size=10)
    summary = call_flow(batch_inference, model="de-en", input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                              store=store, source_prefix=PREFIX, shard_rows=10)
    assert (summary["task"], summary["model_version"], summary["rows_out"]) == ("translation", "1", 25)
    out = pq.read_table(tmp_path / "out")
    assert out.column_names == ["id", "row_id", "generated_text", "input_tokens", "output_tokens", "finish_reason",
                                "model", "model_version"]
    assert out.column("id").to_pylist() == texts.column("id").to_pylist()
    # the registered model generates as it was evaluated: 2 beams, at most 15 new tokens
    used = predictor("translation", resolve_model(str(version)), source_prefix=PREFIX)
    expected, _ = used.predict({"text": texts.column("source").to_pylist()}, 4096)
    assert used.generation_config.num_beams == 2 and used.max_new_tokens == 15
    assert out.column("generated_text").to_pylist() == expected.column("generated_text").to_pylist()
    assert np.all(out.column("output_tokens").to_numpy() <= 15)
