"""The generation engine on real WMT22 and IMDb text with tiny models built here (Marian, T5, BART; GPT-2
and a Llama-style decoder with a BPE tokenizer trained here): each row's tokens equal `model.generate`'s
for that row alone (greedy and beam search, rows joining and leaving running batches, several batch
compositions), decoder-only output equals `pipeline("text-generation")`'s (text and chat), sampling is
reproducible per row, generation configs' processors are honoured, long inputs are truncated and
counted, and a lane's token budget holds."""
from __future__ import annotations

import collections
import contextlib

import pyarrow.parquet as pq
import pytest
import torch

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.inputs import CHAT
from hfbatch.tasks.engine import generation_batch
from hfbatch.tasks.engine.generation import row_seed
from hfbatch.tasks.engine.generation_engine import GenerationEngine
from hfbatch.tasks.engine.streams import Streams
from tests.generation_models import decoder_models, seq2seq_models
from tests.helpers import predictor, resolve_model

SEQ2SEQ, DECODERS = ("marian", "t5", "bart"), ("gpt2", "llama")


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
    """32 WMT22 de-en sentences and 8 IMDb reviews (cut to 600 characters: every prompt fits the tiny
    decoders' 256 positions with its output), interleaved."""
    wmt = pq.read_table(data_dir / "wmt22_de_en" / "test.parquet").column("source").to_pylist()
    imdb = pq.read_table(data_dir / "imdb" / "test_sample.parquet").column("text").to_pylist()
    rows = wmt[:32]
    for i, review in enumerate(imdb[:8]):
        rows.insert(5 * i + 2, review[:600])
    return rows


@pytest.fixture(scope="module")
def models(minilm, data_dir, tmp_path_factory) -> dict[str, str]:
    wmt = pq.read_table(data_dir / "wmt22_de_en" / "test.parquet").column("source").to_pylist()
    imdb = pq.read_table(data_dir / "imdb" / "test_sample.parquet").column("text").to_pylist()
    root = tmp_path_factory.mktemp("generation")
    return {**seq2seq_models(root, minilm, wmt[:40]), **decoder_models(root, wmt[:1500] + imdb[:300])}


@contextlib.contextmanager
def one_thread():
    """Tiny models decode far faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def merges(monkeypatch) -> collections.Counter:
    """Counts the times new rows joined a running batch (the real `Batch.merge`, observed)."""
    seen: collections.Counter = collections.Counter()
    merge = generation_batch.Batch.merge

    def observed(self, other):
        if self.rows and other.rows:
            seen["joins"] += 1
        return merge(self, other)

    monkeypatch.setattr(generation_batch.Batch, "merge", observed)
    return seen


def _load(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    encoder_decoder = AutoConfig.from_pretrained(path).is_encoder_decoder
    model = (AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM).from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path), encoder_decoder


def _alone(model, ids: list[int], config, encoder_decoder: bool) -> list[int]:
    """`model.generate` for one row: its new tokens."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=config)[0].tolist()
    return out[1:] if encoder_decoder else out[len(ids):]


@pytest.mark.parametrize("name", [*SEQ2SEQ, *DECODERS])
def test_greedy_and_beams_equal_generate_row_by_row(name, models, texts, merges):
    """Whatever the batches (a small budget on one lane, a larger one on two lanes), each row gets the tokens
    `generate` gives it alone; rows end at different steps, and new rows join running batches."""
    model, tokenizer, encoder_decoder = _load(models[name])
    ids = tokenizer(texts, truncation=True, max_length=160, return_token_type_ids=False)["input_ids"]
    for beams in (1, 3):
        config = model.generation_config
        config.update(num_beams=beams, max_new_tokens=16)
        engine = GenerationEngine(model, config, "cpu")
        assert engine.stepper.continuous
        with one_thread():
            expected = [_alone(model, x, config, encoder_decoder) for x in ids]
            for budget, streams in ((400, Streams(1)), (3000, Streams(2))):
                merges.clear()
                got = engine.generate(ids, [16] * len(ids), budget, streams=streams)
                assert [tokens for tokens, _ in got] == expected, (beams, budget)
                assert merges["joins"] > 0
        ended = [len(t) for t, reason in got if reason == "eos"]
        assert ended and len(ended) < len(got) and len(set(ended)) > 1  # rows end early, at different steps
        assert all(len(t) == 16 for t, reason in got if reason == "length")
        assert len({tuple(t) for t, _ in got}) > len(got) // 2  # outputs depend on the input


@pytest.mark.parametrize("beams", [1, 3])
def test_a_prefix_all_prompts_share_is_computed_once(models, texts, merges, beams):
    """Prompts that start with the same template compute its keys and values once: every prefill passes
    only the rest of its prompts through the model ((rows - 1) x the prefix fewer tokens on one lane, about
    as many on two); each row still gets the tokens `generate` gives it alone, with rows joining running
    batches."""
    model, tokenizer, _ = _load(models["llama"])
    template = "Translate the following sentence into English and answer with the translation only.\nSentence: "
    ids = tokenizer([template + t for t in texts], truncation=True, max_length=160)["input_ids"]
    config = model.generation_config
    config.update(num_beams=beams, max_new_tokens=12)
    embedded: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(args[0].numel()))
    try:
        with one_thread():
            expected = [_alone(model, x, config, False) for x in ids]
            shared = GenerationEngine(model, config, "cpu").stepper.shared_prefix(ids)
            whole = len(tokenizer(template)["input_ids"])  # its last token may merge with the text's first
            assert shared is not None and whole - 2 <= shared.length <= whole
            for streams in (Streams(1), Streams(2)):
                seen = {}
                for share in (False, True):
                    embedded.clear()
                    merges.clear()
                    got = GenerationEngine(model, config, "cpu", share_prefix=share).generate(
                        ids, [12] * len(ids), 500, streams=streams)
                    assert [tokens for tokens, _ in got] == expected, (share, streams.count)
                    assert merges["joins"] > 0
                    seen[share] = sum(embedded)
                if streams.count == 1:
                    assert seen[False] - seen[True] == (len(ids) - 1) * shared.length
                else:  # the lanes' prefills (their padding) depend on which lane takes which rows first
                    assert seen[False] - seen[True] > (len(ids) - 1) * shared.length * 0.8
    finally:
        hook.remove()


def test_cohorts_where_rows_cannot_join(minilm, texts, tmp_path):
    """An encoder-decoder whose decoder positions hfbatch cannot set per row (a BERT2BERT
    `EncoderDecoderModel`) decodes in cohorts, finished rows still leaving: the same tokens as `generate`."""
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel

    torch.manual_seed(0)
    small = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "initializer_range": 0.5}
    net = EncoderDecoderModel(encoder=BertModel(BertConfig(**small)),
                              decoder=BertLMHeadModel(BertConfig(**small, is_decoder=True, add_cross_attention=True)))
    net.config.decoder_start_token_id, net.config.pad_token_id = 101, 0
    net.generation_config.update(decoder_start_token_id=101, eos_token_id=102, pad_token_id=0, max_new_tokens=12)
    net.eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    ids = tokenizer(texts[:24], truncation=True, max_length=64)["input_ids"]
    engine = GenerationEngine(net, net.generation_config, "cpu")
    assert not engine.stepper.continuous
    with one_thread():
        got = engine.generate(ids, [12] * len(ids), 500, streams=Streams(1))
        assert [t for t, _ in got] == [_alone(net, x, net.generation_config, True) for x in ids]


@pytest.mark.parametrize("name", DECODERS)
def test_text_generation_equals_the_pipeline(name, models, texts):
    """`generated_text` is `pipeline("text-generation", return_full_text=False)`'s, greedy and with beams
    (prompts padded on the left; the Llama-style tokenizer adds a beginning token)."""
    from transformers import pipeline

    pipe = pipeline("text-generation", model=models[name], tokenizer=models[name])
    for beams in (None, 2):
        used = predictor("text-generation", resolve_model(models[name]), max_new_tokens=12, num_beams=beams)
        with one_thread():
            table, tokens = used.predict({"text": texts}, 2000)
            expected = pipe(texts, max_new_tokens=12, do_sample=False, num_beams=beams or 1, return_full_text=False)
        got = table.to_pylist()
        assert [g["generated_text"] for g in got] == [e[0]["generated_text"] for e in expected]
        assert tokens == sum(g["input_tokens"] for g in got)
        assert {g["finish_reason"] for g in got} == {"eos", "length"}
    if name == "llama":
        assert used.tokenizer(texts[0])["input_ids"][0] == used.tokenizer.bos_token_id


def test_chats_through_the_template_equal_the_pipeline(models, texts):
    """Chats (some ending in an assistant message, which the model continues) put through the tokenizer's
    chat template: the pipeline's new message text."""
    from transformers import pipeline

    path = models["llama"]
    chats = [[{"role": "system", "content": "Translate."}, {"role": "user", "content": t}] for t in texts[:12]]
    chats += [[{"role": "user", "content": t}, {"role": "assistant", "content": "Sure:"}] for t in texts[12:18]]
    used = predictor("text-generation", resolve_model(path), max_new_tokens=10, messages_column="messages")
    assert used.inputs(used.options) == {"text": CHAT} and used.input_columns(used.options) == {"text": "messages"}
    with one_thread():
        table, _ = used.predict({"text": chats}, 2000)
        pipe = pipeline("text-generation", model=path, tokenizer=path)
        expected = [pipe(c, max_new_tokens=10, do_sample=False, return_full_text=False)[0]["generated_text"]
                    for c in chats]
    assert table.column("generated_text").to_pylist() == expected
    assert CHAT.problem([{"role": "user"}], "messages") is not None and CHAT.problem(chats[0], "messages") is None


@pytest.mark.parametrize("name", ["bart", "llama"])
def test_sampling_is_reproducible_per_row(name, models, texts):
    """A row's sample depends on the seed and its id only: the same over budgets, lanes, thread counts and
    neighbours, and what `generate` gives it alone after `torch.manual_seed(row_seed(seed, id))`."""
    task = "translation" if name == "bart" else "text-generation"
    options = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 7}
    used = predictor(task, resolve_model(models[name]), **options)
    assert used.engine.sampling
    ids = [f"part-{i}" for i in range(len(texts))]
    table, _ = used.predict({"text": texts}, 4000, row_ids=ids)
    sampled = table.column("generated_text").to_pylist()
    half, _ = used.predict({"text": texts[::2]}, 300, row_ids=ids[::2])
    assert half.column("generated_text").to_pylist() == sampled[::2]
    encoded, limits = used._encode({"text": texts})
    seeds = [row_seed(7, i) for i in ids]
    runs = []
    for budget, lanes, threads in ((300, 1, 1), (4000, 2, 1), (800, 1, 2)):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(used.engine.generate(encoded, limits, budget, seeds, Streams(lanes)))
        finally:
            torch.set_num_threads(before)
    assert runs[0] == runs[1] == runs[2]
    decoded = used.tokenizer.batch_decode([t for t, _ in runs[0]], skip_special_tokens=True)
    assert [t.strip() if name == "bart" else t for t in decoded] == sampled
    other = predictor(task, resolve_model(models[name]), **{**options, "seed": 8})
    again = other.predict({"text": texts}, 4000, row_ids=ids)[0].column("generated_text").to_pylist()
    assert sum(a != b for a, b in zip(again, sampled)) > len(texts) // 2
    assert len(set(sampled)) > len(texts) // 2

    for i in (0, 3, 7):
        torch.manual_seed(seeds[i])
        with one_thread():
            alone = _alone(used.model, encoded[i], used.generation_config, name == "bart")
        assert alone == runs[0][i][0]


@pytest.mark.parametrize("name", ["bart", "gpt2"])
def test_generation_config_processors_are_honoured(name, models, texts):
    """Per-row processors (repetition penalty, no-repeat n-grams, multi-token bad words), step-dependent ones
    (minimum new tokens, forced end token, suppression at the start) and beam settings give the tokens of
    `generate` alone."""
    model, tokenizer, encoder_decoder = _load(models[name])
    ids = tokenizer(texts[:30], truncation=True, max_length=96, return_token_type_ids=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    common = {"max_new_tokens": 14, "repetition_penalty": 1.4, "no_repeat_ngram_size": 2,
              "bad_words_ids": [[ids[0][3], ids[0][4]], [ids[1][2]]], "min_new_tokens": 3,
              "begin_suppress_tokens": [ids[2][1]], "suppress_tokens": [ids[3][2]], "forced_eos_token_id": eos}
    for extra in ({"num_beams": 1}, {"num_beams": 3, "length_penalty": 0.6, "early_stopping": True},
                  {"num_beams": 2, "length_penalty": 1.5, "early_stopping": "never"}):
        config = model.generation_config
        config.update(**common, **extra)
        engine = GenerationEngine(model, config, "cpu")
        with one_thread():
            got = engine.generate(ids, [14] * len(ids), 600, streams=Streams(1))
            assert [t for t, _ in got] == [_alone(model, x, config, encoder_decoder) for x in ids], extra
        assert all(len(t) >= 3 for t, _ in got)
        assert all(t[-1] == eos for t, reason in got if reason == "length")  # forced at the limit
    config.update(stop_strings=["."])
    with pytest.raises(ConfigError, match="stop_strings"):
        GenerationEngine(model, config, "cpu")


def test_long_inputs_are_truncated_and_counted(models, texts):
    """Seq2seq inputs are cut to what the encoder takes; decoder-only prompts lose their beginning (not the
    tokenizer's beginning token) to leave room for the output; both are counted, none fails."""
    long = [" ".join([t] * 120) for t in texts[:6]]  # far beyond 512 tokens
    used = predictor("summarization", resolve_model(models["marian"]), max_new_tokens=8)
    table, _ = used.predict({"text": long + texts[6:10]}, 4000)
    assert table.column("input_tokens").to_pylist()[:6] == [512] * 6 and used.truncated_rows == 6
    assert all(n < 512 for n in table.column("input_tokens").to_pylist()[6:])

    used = predictor("text-generation", resolve_model(models["llama"]), max_new_tokens=16)
    assert used.max_length == 256 - 16
    with one_thread():
        table, _ = used.predict({"text": long[:3] + texts[6:8]}, 4000)
    assert table.column("input_tokens").to_pylist()[:3] == [240] * 3 and used.truncated_rows == 3
    ids = used._encode({"text": long[:1]})[0][0]
    whole = used.tokenizer(long[0])["input_ids"]
    assert ids[0] == used.tokenizer.bos_token_id and ids[1:] == whole[len(whole) - 239:]


def test_a_lane_holds_at_most_its_budget(models, texts, monkeypatch):
    """Sequences x (input + limit) of the largest row stays within the budget (a row larger than it runs
    alone); the result is the same with any budget."""
    seen = []
    step = generation_batch.Stepper.step

    def observed(self, batch):
        seen.append((batch.size, batch.cost()))
        return step(self, batch)

    monkeypatch.setattr(generation_batch.Stepper, "step", observed)
    used = predictor("text-generation", resolve_model(models["gpt2"]), max_new_tokens=10, num_beams=2)
    with one_thread():
        small, _ = used.predict({"text": texts}, 700)
    assert seen and all(cost <= 700 or size == 2 for size, cost in seen)
    assert max(size for size, _ in seen) > 2
    large, _ = used.predict({"text": texts}, 50_000)
    assert small.equals(large)


def test_a_decoder_without_an_output_limit_needs_max_new_tokens(models):
    from hfbatch.tasks.core.options import validated
    from hfbatch.tasks.predictors import get_predictor_class

    with pytest.raises(ConfigError, match="--max-new-tokens"):
        predictor("text-generation", resolve_model(models["gpt2"]))
    with pytest.raises(ConfigError, match="--forced-bos-token: forced_bos_token is for encoder-decoder models"):
        validated(get_predictor_class("text-generation").options_class,
                  {"forced_bos_token": "<|bos|>", "max_new_tokens": 4})


def test_position_hook_fits_the_decoders_embedding(models):
    """Marian's and BART's decoder position embeddings are found and their offsets (0, 2) checked; T5 needs
    none (relative positions)."""
    for name, offset in (("marian", 0), ("bart", 2)):
        model, _, _ = _load(models[name])
        hook = generation_batch.PositionHook.install(model)
        assert hook is not None and hook.offset == offset
    assert generation_batch.PositionHook.install(_load(models["t5"])[0]) is None


def test_a_changed_private_generation_api_fails_early_and_names_it(monkeypatch):
    """The private transformers APIs the engine relies on are checked before the first use: the installed
    release passes; a release that dropped one or a parameter of one (simulated by patching transformers:
    another release cannot be installed here) fails naming it and the version."""
    from transformers import GenerationMixin

    from hfbatch.tasks.engine import transformers_api

    transformers_api.check_private_api.cache_clear()
    transformers_api.check_private_api()
    monkeypatch.delattr(GenerationMixin, "_get_logits_processor")
    transformers_api.check_private_api.cache_clear()
    with pytest.raises(ConfigError, match=r"transformers 5\.\S+: GenerationMixin\._get_logits_processor no longer "
                                          r"exists; hfbatch's generation engine relies on it"):
        transformers_api.check_private_api()
    monkeypatch.undo()
    monkeypatch.setattr(GenerationMixin, "_prepare_special_tokens", lambda self, generation_config, device=None: None)
    transformers_api.check_private_api.cache_clear()
    with pytest.raises(ConfigError, match="_prepare_special_tokens no longer takes kwargs_has_attention_mask"):
        transformers_api.check_private_api()
    monkeypatch.undo()
    transformers_api.check_private_api.cache_clear()
