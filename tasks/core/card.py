"""Model cards: the README.md written next to every trained and registered model."""
from __future__ import annotations

import json
from pathlib import Path

from hfbatch.tasks.core.refs import TrainedModel

GENERIC_LIMITS = ("The model reproduces biases present in its base checkpoint and training data.",)


def write_model_card(directory: Path, trained: TrainedModel, text: dict | None = None, metrics: dict | None = None,
                     name: str | None = None, version: str | None = None) -> Path:
    """Write `directory/README.md` for a `TrainedModel`, in the words of its task recipe (`text`:
    `summary`, `intended_use`, `limitations`; see `Recipe.card_text`), with eval `metrics` once known."""
    text = text or {}
    title = f"{name} v{version}" if name else f"run {trained.run_key}"
    labels = ", ".join(f"`{n}`" for n in trained.label_names)
    hp = "\n".join(f"| {k} | {v} |" for k, v in sorted(trained.config.items()))
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {trained.task}",
        f"base_model: {trained.base_model}", f"tags: [hfbatch, {trained.task}]", "---", "",
        f"# {title}", "",
        f"{text.get('summary', 'A model')} fine-tuned by hfbatch from `{trained.base_model}`"
        f" (revision `{trained.base_revision or 'local'}`, weights fingerprint `{trained.base_fingerprint}`).", "",
        "## Training data", "",
        f"- Task: {trained.task}",
        f"- Dataset fingerprint: `{trained.dataset_fingerprint}` ({trained.train_samples} training rows)",
    ]
    if labels:
        lines.append(f"- Labels: {labels}")
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
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
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
         "metrics": metrics or {}}, indent=2))
    return path
