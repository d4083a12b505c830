"""What the predictors share: token-budget batches, CPU streams, the first-token cut, int8, the allocator."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.engine.batching import token_budget_batches
from hfbatch.tasks.engine.first_token import FirstTokenLayer, first_token_only
from tests.helpers import predictor, resolve_model, run_local, texts_of


def test_token_budget_batches_cover_every_row_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(3, 40, 300), rng.integers(100, 513, 100), [512] * 30])
    rng.shuffle(lengths)
    batches = token_budget_batches(lengths, 4096)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert all(lengths[b].max() * len(b) <= 4096 for b in batches)
    for b in batches:  # a row is padded by at most max(8 tokens, 10 % of the batch's shortest row)
        assert lengths[b].max() - lengths[b].min() <= max(8, 0.1 * lengths[b].min())
    padded = sum(lengths[b].max() * len(b) for b in batches)
    assert padded <= 1.06 * lengths.sum()
    assert token_budget_batches(np.array([900, 5]), 100)[1].tolist() == [0]  # over budget: alone


def test_cpu_batches_run_on_single_threaded_streams(classifier, mixed, monkeypatch):
    """On the CPU a predictor's batches run two (torch's thread count) at a time, each with torch
    single-threaded, and give one stream's outputs; torch's thread count is set back afterwards, also
    when an item fails. With one stream, items run in the calling thread and torch is left alone."""
    import threading

    import torch

    from hfbatch.tasks.engine import cpu, streams

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = streams.Streams(2)
        both = threading.Barrier(2, timeout=60)

        def item(i):
            if i < 2:
                both.wait()  # BrokenBarrierError unless the first two items run at the same time
            return i, threading.current_thread().name, torch.get_num_threads()

        seen = pool.map(item, range(6))
        assert [i for i, _, _ in seen] == list(range(6))
        assert len({name for _, name, _ in seen[:2]}) == 2
        assert all(name.startswith("hfbatch-stream") and threads == 1 for _, name, threads in seen)
        assert torch.get_num_threads() == 2

        def fails(i):
            if i == 3:
                raise ValueError("item 3")
            return i

        with pytest.raises(ValueError, match="item 3"):
            pool.map(fails, range(8))
        assert torch.get_num_threads() == 2
        here = threading.current_thread().name
        assert streams.Streams(1).map(lambda i: (threading.current_thread().name, torch.get_num_threads()),
                                      range(3)) == [(here, 2)] * 3

        classify = predictor("text-classification", resolve_model(classifier))
        texts = texts_of(mixed)
        batches = []
        monkeypatch.setattr(pool, "map", lambda fn, items, map=pool.map: batches.append(len(items)) or map(fn, items))
        monkeypatch.setattr(cpu, "streams", lambda: pool)
        many, tokens = classify.predict({"text": texts}, 2048)
        assert len(batches) == 1 and batches[0] > 10
        monkeypatch.setattr(cpu, "streams", lambda: None)  # untuned: the batches one after another, here
        one, same_tokens = classify.predict({"text": texts}, 2048)
        assert many.column("label").equals(one.column("label")) and tokens == same_tokens
        # one thread or two per matmul: the reduction order, and so the last bit of a score, may differ
        np.testing.assert_allclose(many.column("score").to_numpy(), one.column("score").to_numpy(), rtol=1e-6)
    finally:
        torch.set_num_threads(before)


def test_first_token_only_where_the_head_reads_the_first_token(tiny_models, mixed):
    """The last layer is cut to the first token only where a probe keeps the logits: not for a
    sequence-classification head that reads every token, nor for another kind of head (token
    classification)."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    path = tiny_models["zero-shot-classification"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(texts_of(mixed)[:40], truncation=True, padding=True, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    full = copy.deepcopy(model)
    with torch.inference_mode():
        expected = full(**batch).logits
        assert first_token_only(model) and isinstance(model.bert.encoder.layer[-1], FirstTokenLayer)
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=1e-5)

        class MeanPooler(torch.nn.Module):  # a head that reads every token
            def __init__(self, pooler):
                super().__init__()
                self.pooler = pooler

            def forward(self, hidden):
                return self.pooler.activation(self.pooler.dense(hidden.mean(dim=1)))

        full.bert.pooler = MeanPooler(full.bert.pooler)
        expected = full(**batch).logits
        assert not first_token_only(full)
        assert not isinstance(full.bert.encoder.layer[-1], FirstTokenLayer)
        torch.testing.assert_close(full(**batch).logits, expected, rtol=0, atol=0)
    assert not first_token_only(AutoModelForTokenClassification.from_pretrained(tiny_models["token-classification"]))


def test_int8_precision_quantizes_and_stays_close(minilm, mixed, tmp_path):
    """`precision="int8"`: the linear layers run quantized, and the embeddings of the real MiniLM stay
    close to the exact ones (a broken quantization would scatter them)."""
    ref = resolve_model(minilm)
    embeddings = {}
    for precision in ("auto", "int8"):
        run_local("feature-extraction", ref, str(mixed), str(tmp_path / precision), shard_rows=120,
                  precision=precision)
        embeddings[precision] = np.stack(pq.read_table(tmp_path / precision).column("embedding").to_numpy(
            zero_copy_only=False))
    exact, fast = embeddings["auto"], embeddings["int8"]
    cosine = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
    # int8 kernels differ between CPUs: the least similar row was 0.8995 on the GPU host's Xeon
    assert cosine.min() > 0.85 and cosine.mean() > 0.96 and not np.allclose(exact, fast, atol=1e-4)
    quantized = predictor("feature-extraction", ref, "int8")
    # int8 everywhere but the first encoder layer
    parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")
    linear = {n: type(m).__module__ for n, m in quantized.model.named_modules() if type(m).__name__ == "Linear"}
    fp32 = {n for n, module in linear.items() if ".quantized" not in module}
    assert fp32 == {f"encoder.layer.0.{part}" for part in parts}, fp32
    assert len(linear) - len(fp32) == 5 * 6 + 1  # layers 1-5 and the pooler
    with pytest.raises(ConfigError, match="precision must be one of"):
        run_local("feature-extraction", ref, str(mixed), str(tmp_path / "bad"), precision="int4")


def test_int8_generation_keeps_the_head_and_mlp_outputs_fp32_and_most_answers(smollm2, data_dir):
    """`precision="int8"` for text generation: the real SmolLM2's linear layers run dynamic int8 except its
    output head and each MLP's down projection (their inputs' outliers), and its greedy answers to sentiment
    questions about SST-2 rows mostly give the fp32 verdict (free text: int8 changes the wording more)."""
    texts = pq.read_table(data_dir / "sst2" / "train.parquet").slice(100, 24).column("text").to_pylist()
    chats = [[{"role": "user", "content": f"Is this movie review positive or negative?\n\n{t}"}] for t in texts]
    answers = {}
    for precision in ("auto", "int8"):
        used = predictor("text-generation", smollm2, precision, max_new_tokens=6, messages_column="messages")
        table, _ = used.predict({"text": chats}, used.batch_tokens)
        answers[precision] = table.column("generated_text").to_pylist()
    linear = {n: type(m).__module__ for n, m in used.model.named_modules() if type(m).__name__ == "Linear"}
    fp32 = {n for n, module in linear.items() if ".quantized" not in module}
    assert fp32 == {"lm_head"} | {f"model.layers.{i}.mlp.down_proj" for i in range(30)}
    assert len(linear) - len(fp32) == 30 * 6  # q, k, v, o, gate and up of every layer
    def verdict(answer: str) -> str:
        return "negative" if "negative" in answer.lower() else "positive" if "positive" in answer.lower() else "?"

    same = sum(a == b for a, b in zip(answers["auto"], answers["int8"]))
    verdicts = sum(verdict(a) == verdict(b) for a, b in zip(answers["auto"], answers["int8"]))
    # measured here: 8 of 24 word for word (every layer int8: 3), 21 of 24 the same verdict
    assert same >= 5 and verdicts >= 19, list(zip(answers["auto"], answers["int8"]))


def test_bf16_precision_runs_in_bf16_where_the_cpu_has_bf16_units(minilm, mixed, tmp_path, monkeypatch):
    """`precision="bf16"`: on a CPU with bf16 units the model runs in bf16 and the embeddings of the real
    MiniLM stay close to the exact ones; a CPU without them is refused with a clear error (that CPU is
    simulated by making the detection say no: this machine's CPU cannot be swapped)."""
    import torch

    from hfbatch.tasks.engine import predictor as predictor_module

    ref = resolve_model(minilm)
    if predictor_module.cpu_has_bf16():
        fast = predictor("feature-extraction", ref, "bf16")
        assert fast.model.dtype == torch.bfloat16
        run_local("feature-extraction", ref, str(mixed), str(tmp_path / "bf16"), shard_rows=120, precision="bf16")
        run_local("feature-extraction", ref, str(mixed), str(tmp_path / "fp32"), shard_rows=120)
        exact, approx = (np.stack(pq.read_table(tmp_path / p).column("embedding").to_numpy(zero_copy_only=False))
                         for p in ("fp32", "bf16"))
        cosine = (exact * approx).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(approx, axis=1)
        assert cosine.min() > 0.98 and not np.allclose(exact, approx, atol=1e-4)
    monkeypatch.setattr(predictor_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="precision 'bf16' needs bf16 units"):
        predictor_module.Predictor(ref, None, predictor_module.Settings(device="cpu"), "bf16")


KEPT_MEMORY_PROBE = """
import resource, sys, torch
from hfbatch.tasks.engine.allocator import keep_freed_memory

def faults(rounds):
    # page faults of each round: a 64 MiB activation-sized tensor filled, used and freed
    counts = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16 << 20)
        del x
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

before = min(faults(4)[1:])
kept = keep_freed_memory()
print(kept, before, sum(faults(24)[-4:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_cpu_inference_keeps_freed_memory_instead_of_faulting_it_back():
    """Fresh process: glibc maps a 64 MiB tensor anew on every allocation (16k page faults, one per
    4 KiB page); once `keep_freed_memory()` has run (every CPU predictor calls it), the heap grows
    until a freed block fits the next tensor (a few rounds: torch's aligned allocations do not fit
    exactly into the block just freed) and from then on the tensors reuse memory already in place."""
    out = subprocess.run([sys.executable, "-c", KEPT_MEMORY_PROBE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    kept, before, after = out.stdout.split()
    assert kept == "True"
    assert int(before) > 10_000 and int(after) < 1_000, (before, after)


CAPPED_MEMORY_PROBE = """
import psutil, torch
from hfbatch.tasks.engine.allocator import FREE_CAP, cap_freed_memory, keep_freed_memory

keep_freed_memory()
rss = lambda: psutil.Process().memory_info().rss
assert not cap_freed_memory()  # the first batch: the RSS to compare with
# 40 x 32 MiB, each followed by a small tensor that stays: freed, they are holes inside the heap (its
# top is trimmed by glibc itself), as the fragments batches of many shapes leave behind
pairs = [(torch.ones(8 << 20), torch.ones(1024)) for _ in range(40)]
full = rss()
small = [s for _, s in pairs]
del pairs  # 1.25 GiB freed, kept by the heap
kept = rss()
print(cap_freed_memory(), cap_freed_memory(), (full - kept) >> 20, (kept - rss()) >> 20, FREE_CAP >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_memory_above_the_cap_goes_back_before_the_next_batch():
    """1.25 GiB freed in holes of the heap stays (the RSS does not fall); `cap_freed_memory` sees the RSS
    more than `FREE_CAP` above the first batch's and hands the free memory back (the RSS falls by more
    than the cap), then has nothing to do."""
    out = subprocess.run([sys.executable, "-c", CAPPED_MEMORY_PROBE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    first, second, fell_on_free, fell_on_trim, cap = out.stdout.split()
    assert (first, second) == ("True", "False")
    assert int(fell_on_free) < 100 and int(fell_on_trim) > int(cap), out.stdout
