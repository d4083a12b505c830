"""What the peer benchmarks (`peers_*.py`) share: every way over interleaved slices of the rows, a process of
its own per way and slice, so that each way's process settings are its own and a busy neighbour slows
each way alike."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def run_rounds(script: str, ways: list[str], rows: list, rounds: int, tmp: Path, job: dict,
               pythons: dict[str, str] | None = None) -> tuple[dict[str, list], dict[str, float], dict[str, float]]:
    """Run `script --worker JOB` for each way on every `rounds`-th row in turn; a worker reads the JSON
    file JOB (`job` with `way` and `rows` added) and writes `{"answers": [...], "seconds": s}` back to it.
    `pythons`: the interpreter a way's workers run under (a way not in it: this one, `sys.executable`).
    Returns each way's answers in row order, its seconds of work as the workers measured them, and its
    seconds of whole processes."""
    answers: dict[str, list] = {w: [None] * len(rows) for w in ways}
    work_s = dict.fromkeys(ways, 0.0)
    whole_s = dict.fromkeys(ways, 0.0)
    for k in range(rounds):
        indices = list(range(k, len(rows), rounds))
        for way in ways:
            path = tmp / f"{way}-{k}.json"
            path.write_text(json.dumps({**job, "way": way, "rows": [rows[i] for i in indices]}))
            started = time.perf_counter()
            python = (pythons or {}).get(way, sys.executable)
            done = subprocess.run([python, script, "--worker", str(path)], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{way}: {done.stderr[-3000:]}")
            whole_s[way] += time.perf_counter() - started
            out = json.loads(path.read_text())
            work_s[way] += out["seconds"]
            for i, answer in zip(indices, out["answers"]):
                answers[way][i] = answer
    return answers, work_s, whole_s
