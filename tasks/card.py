"""Model cards: the README.md written next to every trained and registered model."""
from __future__ import annotations

import json
from pathlib import Path


def write_model_card(directory: Path, trained, metrics: dict | None = None, name: str | None = None,
                     version: str | None = None) -> Path:
    """Write `directory/README.md` for a `TrainedModel` (with eval `metrics` once they are known)."""
    title = f"{name} v{version}" if name else f"run {trained.run_key}"
    labels = ", ".join(f"`{n}`" for n in trained.label_names)
    hp = "\n".join(f"| {k} | {v} |" for k, v in sorted(trained.config.items()))
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-classification",
        f"base_model: {trained.base_model}", "tags: [hfbatch, text-classification]", "---", "",
        f"# {title}", "",
        f"A sequence classifier fine-tuned by hfbatch from `{trained.base_model}`"
        f" (revision `{trained.base_revision or 'local'}`, weights fingerprint `{trained.base_fingerprint}`).", "",
        "## Training data", "",
        f"- Dataset fingerprint: `{trained.dataset_fingerprint}` ({trained.train_samples} training rows)",
        f"- Labels: {labels}", "",
        "## Hyperparameters", "", "| parameter | value |", "| --- | --- |", hp, "",
        f"Trained on {trained.device} ({trained.precision}) for {trained.global_step} steps;"
        f" final training loss {trained.train_loss:.4f}.", "",
        "## Evaluation", "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    else:
        lines += ["Not evaluated yet."]
    lines += [
        "", "## Intended use", "",
        f"Classifying short English texts into {labels}, in the domain of the training data.", "",
        "## Limitations", "",
        "- Accuracy outside the training data's domain, language and text length is unknown.",
        "- Inputs longer than the training `max_length` are truncated.",
        "- The model reproduces biases present in its base checkpoint and training data.", "",
    ]
    path = Path(directory) / "README.md"
    path.write_text("\n".join(lines))
    (Path(directory) / "hfbatch.json").write_text(json.dumps(
        {"run_key": trained.run_key, "name": name, "version": version, "metrics": metrics or {}}, indent=2))
    return path
