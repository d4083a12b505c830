"""Model cards: the README.md written next to every trained and registered model."""
from __future__ import annotations

import json
import re
from pathlib import Path

from hfbatch.tasks.core.refs import TrainedModel

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FILE_SUFFIXES = {".parquet", ".csv", ".json", ".jsonl", ".txt", ".arrow", ".gguf", ".safetensors", ".bin"}
"""A name ending so is a file (`train.parquet`), not a Hub repository (`Qwen/Qwen2.5-0.5B` is one)."""

GENERIC_LIMITS = ("The model reproduces biases present in its base checkpoint and training data.",)


def write_model_card(directory: Path, trained: TrainedModel, text: dict | None = None, metrics: dict | None = None,
                     name: str | None = None, version: str | None = None, intervals: dict | None = None) -> Path:
    """Write `directory/README.md` for a `TrainedModel`, in the words of its task recipe (`text`:
    `summary`, `intended_use`, `limitations`; see `Recipe.card_text`), with eval `metrics` once known."""
    text = text or {}
    title = f"{name} v{version}" if name else f"run {trained.run_key}"
    labels = ", ".join(f"`{n}`" for n in trained.label_names)
    hp = "\n".join(f"| {k} | {v} |" for k, v in sorted(trained.config.items()))
    lines = [
        "---", card_data(trained, metrics or {}, title, intervals or {}).to_yaml(), "---", "",
        f"# {title}", "",
        f"{text.get('summary', 'A model')} fine-tuned by hfbatch from `{trained.base_model}`"
        f" (revision `{trained.base_revision or 'local'}`, weights fingerprint `{trained.base_fingerprint}`).", "",
        "## Training data", "",
        f"- Task: {trained.task}",
        f"- Dataset fingerprint: `{trained.dataset_fingerprint}` ({trained.train_samples} training rows)",
    ]
    if labels:
        lines.append(f"- Labels: {labels}")
    if trained.parent:
        lines.append(f"- Continued from the registered version `{trained.parent}` (a warm start)")
    if trained.adapter:
        a = trained.adapter
        lines += ["", "## Adapter", "",
                  f"LoRA adapters ({a['method']}: r {a['r']}, alpha {a['alpha']}, dropout {a['dropout']}, on "
                  f"{a['target_modules']}) trained on the base `{trained.base_model}` (fingerprint "
                  f"`{trained.base_fingerprint}`); the adapter is in `adapter/`, this directory's weights are the "
                  "base with the adapter merged (what hfbatch evaluates and runs in bulk)."]
    if trained.prompt:
        lines += ["", "## Prompt", "", "Bulk inference (`hfbatch infer`) prompts the model this way unless told "
                  "otherwise: each row's columns through the prompt template, as the user turn of its chat template.",
                  ""]
        if trained.prompt.get("system_prompt"):
            lines += ["System prompt:", "", "```text", trained.prompt["system_prompt"], "```", ""]
        if trained.prompt.get("prompt_template"):
            lines += ["Prompt template (Jinja2):", "", "```jinja", trained.prompt["prompt_template"], "```"]
    lines += [
        "", "## Hyperparameters", "", "| parameter | value |", "| --- | --- |", hp, "",
        f"Trained on {trained.device} ({trained.precision}) for {trained.global_step} steps;"
        f" final training loss {trained.train_loss:.4f}.", "",
        "## Evaluation", "",
    ]
    if metrics:
        intervals = intervals or {}
        lines += ["| metric | value | 95 % interval |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v:.4f} | {interval_text(intervals.get(k))} |" for k, v in sorted(metrics.items())
                  if isinstance(v, (int, float))]
        lines += ["", "Intervals: percentile bootstrap over the eval rows (1,000 resamples); none where the metric "
                  "has no per-row statistics."]
    else:
        lines += ["Not evaluated yet."]
    lines += ["", "## Intended use", "", text.get("intended_use", "Within the domain of the training data."), "",
              "## Limitations", ""]
    lines += [f"- {limit}" for limit in (*text.get("limitations", ()), *GENERIC_LIMITS)]
    lines += [f"- Training data: {warning}" for warning in trained.warnings]
    path = Path(directory) / "README.md"
    path.write_text("\n".join(lines) + "\n")
    (Path(directory) / "hfbatch.json").write_text(json.dumps(
        {"run_key": trained.run_key, "task": trained.task, "name": name, "version": version,
         "metrics": metrics or {}, "intervals": intervals or {}}, indent=2))
    return path


def interval_text(interval) -> str:
    """`[low, high]` of a metric's interval, or a dash."""
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "–"


def hub_id(source: str) -> str | None:
    """The Hub repository (`org/name`) `source` names (`ID[:CONFIG][#SPLIT]`, `ID[@REVISION]`), None for a
    local path, a file or a URL."""
    repo = source.split("#")[0].split(":")[0].split("@")[0]
    if "://" in source or not HUB_ID.match(repo) or Path(source).exists() or Path(repo).suffix in FILE_SUFFIXES:
        return None
    return repo


def card_data(trained: TrainedModel, metrics: dict, title: str, intervals: dict):
    """The card's YAML metadata as the Hub reads it (`huggingface_hub.ModelCardData`): `model-index` with
    the eval metrics, `base_model` and `datasets` where they are Hub ids, `license` (the base model's, when
    its card says), and hfbatch's own record (run, local sources, intervals, prompt, adapter)."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = trained.dataset_source or trained.dataset_fingerprint
    dataset_id = hub_id(trained.dataset_source) if trained.dataset_source else None
    results = [EvalResult(task_type=trained.task, task_name=trained.task, dataset_type=dataset_id or "local",
                          dataset_name=Path(dataset).name or dataset, metric_type=k, metric_name=k,
                          metric_value=round(float(v), 4)) for k, v in sorted(metrics.items())
               if isinstance(v, (int, float))]
    optional = {"parent": trained.parent, "intervals": intervals, "prompt": trained.prompt,
                "adapter": trained.adapter}
    record = {"run_key": trained.run_key, "base_model": trained.base_model, "base_fingerprint":
              trained.base_fingerprint, "dataset": dataset, "dataset_fingerprint": trained.dataset_fingerprint,
              **{k: v for k, v in optional.items() if v}}
    tags = ["hfbatch", trained.task, *(["lora"] if trained.adapter else [])]
    # the directory's weights are a whole model (an adapter merged into its base): a transformers model
    return ModelCardData(model_name=title, base_model=hub_id(trained.base_model),
                         datasets=[dataset_id] if dataset_id else None, eval_results=results or None,
                         library_name="transformers", pipeline_tag=trained.task, license=trained.license, tags=tags,
                         hfbatch=record)


def base_license(model_dir: str) -> str | None:
    """The `license` of a model directory's card (README.md metadata), None where it says none."""
    from huggingface_hub import ModelCard

    readme = Path(model_dir) / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a README without valid metadata: no license known
        return None
