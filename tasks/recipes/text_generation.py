"""Text generation: supervised fine-tuning of a decoder-only (causal) language model on chats or
prompt-completion pairs, as TRL's `SFTTrainer` does it, scored by generating each eval row's answer
(in bulk: `predictors/text_generation.py`).

Data, in TRL's two formats: conversational (`--messages-column`: a list of `{role, content}`, its last
message the assistant's target) or prompt-completion (`--prompt-column`, or a Jinja2 `--prompt-template`
over the row's columns, and `--completion-column`; with a chat model the prompt is the user turn, after
`--system-prompt`). A completion column of class labels (a `ClassLabel`) is its label names.
Each row is the prompt through the tokenizer's chat template
with the generation prompt, then the target's tokens and EOS (the end of the assistant turn), so the
model learns to stop; the loss is on the target tokens only (the prompt's labels are -100). Batches are
padded, or padding-free with `--packing` (rows concatenated, each with its own positions: transformers
keeps their attention apart, with the KV cache off). The plain `Trainer` with this collation is what
`SFTTrainer` runs for such data (its completion-only loss and padding-free collator); the head and loss
run only at target positions (`causal_lm.py`). Rows are read and checked by `chat_rows.py`.

Evaluation generates each eval row's answer with the bulk-inference predictor (greedy, the same template
and settings, and a constraint where one is given) and scores it with SQuAD's exact match and F1, BLEU
and ROUGE-L, plus the eval loss; with `--choices`, also accuracy and a confusion matrix over the choices
(as the classification recipe reports them). The prompt format (`chat` or `text`), the chat template's
digest, and the prompt template and system prompt go into the model directory (`hfbatch_prompt.json`):
bulk inference prompts the model as it was trained, and refuses a tokenizer whose template has changed
since.
"""
from __future__ import annotations

import logging
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from hfbatch.tasks.core.errors import DataError
from hfbatch.tasks.metrics import compute, paired
from hfbatch.tasks.predictors.text_generation import (
    PROMPT_FILE,
    ConstraintOptions,
    PromptOptions,
    TextGenerationOptions,
    TextGenerationPredictor,
    prompt_format,
    render_prompts,
)
from hfbatch.tasks.recipes import chat_rows
from hfbatch.tasks.recipes.base import Recipe

log = logging.getLogger(__name__)
SAMPLES = 20


class TextGenerationColumns(PromptOptions, ConstraintOptions):
    messages_column: str | None = Field(None, description="column of chats (lists of {role, content}), the last "
                                        "message the assistant's target")
    prompt_column: str | None = Field(None, description="column of the prompt (with a chat model, the user turn)")
    completion_column: str | None = Field(None, description="column of the target completion of --prompt-column")
    packing: bool = Field(False, description="padding-free batches: rows concatenated, each with its own positions")
    long_rows: Literal["truncate", "drop", "fail"] = Field(
        "truncate", description="rows longer than --max-length: cut the prompt's beginning (the target kept), "
        "drop the row, or fail naming it")
    max_new_tokens: int = Field(64, ge=1, description="longest generated answer in evaluation (and the trained "
                                "model's default in bulk inference)")
    objective: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="sft: learn the completions; dpo: learn to prefer --chosen-column's answer to "
        "--rejected-column's (TRL's DPOTrainer, the starting model as the reference); orpo: learn the chosen "
        "answers and the preference at once, no reference model (TRL's ORPOTrainer)")
    chosen_column: str | None = Field(None, description="with --objective dpo or orpo: column of the preferred "
                                      "answer")
    rejected_column: str | None = Field(None, description="with --objective dpo or orpo: column of the answer not "
                                        "preferred")
    beta: float = Field(0.1, gt=0, description="with --objective dpo: how far from the reference model the "
                        "preferences may pull (DPO's beta); with orpo: the weight of the preference term (ORPO's "
                        "lambda)")

    @model_validator(mode="after")
    def _one_format(self):
        prompt = self.prompt_column or self.prompt_template
        answers = self.completion_column if self.objective == "sft" else self.chosen_column
        pair = "--completion-column" if self.objective == "sft" else "--chosen-column and --rejected-column"
        if self.objective == "sft" and (self.chosen_column or self.rejected_column):
            raise ValueError("--chosen-column and --rejected-column are preference data: give --objective dpo "
                             "or orpo")
        if self.objective != "sft":
            if self.completion_column:
                raise ValueError(f"with --objective {self.objective}, give --chosen-column and --rejected-column, "
                                 "not --completion-column")
            if not (self.chosen_column and self.rejected_column):
                raise ValueError(f"--objective {self.objective} needs --chosen-column and --rejected-column")
            if self.packing:
                raise ValueError("--packing is for --objective sft")
        if self.messages_column and (prompt or self.completion_column or self.system_prompt):
            raise ValueError(f"give --messages-column, or --prompt-column (or --prompt-template) with {pair}, "
                             "not both")
        if self.prompt_column and self.prompt_template:
            raise ValueError("give --prompt-column or --prompt-template, not both")
        if not self.messages_column and not (prompt and answers):
            raise ValueError(f"give --messages-column, or --prompt-column (or --prompt-template) and {pair}")
        return self

    def ingest_key(self) -> dict:
        """The prepared rows depend on the template, system prompt and choices too (where given)."""
        extra = {k: getattr(self, k) for k in ("prompt_template", "system_prompt", "choices")
                 if getattr(self, k) is not None}
        return self.columns() | extra

    def prompt_record(self) -> dict:
        """How the trained model is to be prompted, beyond its chat template: what `infer` uses by default."""
        return {k: getattr(self, k) for k in ("prompt_template", "system_prompt") if getattr(self, k) is not None}


class TextGeneration(Recipe[TextGenerationColumns]):
    task = "text-generation"
    options_class = TextGenerationColumns
    model_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    heads = TextGenerationPredictor.heads
    metrics: ClassVar[tuple[str, ...]] = ("f1", "exact_match", "bleu", "rougeL", "loss", "accuracy")
    """`accuracy` (and the confusion matrix) where the answers are `--choices`."""
    max_length = 512
    train_defaults: ClassVar[dict] = {"batch_size": 8, "learning_rate": 2e-4}

    # --- ingest: canonical `prompt` (a list of messages) and `completion` (a string) ------------------
    def prepare(self, dataset, src: str, options: TextGenerationColumns, label_names):
        table = dataset.data.table
        if table.num_rows == 0:
            raise DataError(f"data source {src!r} is empty (0 rows)")
        for column in options.columns().values():
            if column not in table.column_names:
                raise DataError(f"data source {src!r} has no column {column!r}; its columns are {table.column_names}")
        prompts, completions = [], []
        system = [{"role": "system", "content": options.system_prompt}] if options.system_prompt else []
        if options.objective != "sft":  # the prompt (a chat, or a text as the user turn) and two answers
            chats = (table[options.messages_column].to_pylist() if options.messages_column else
                     [[*system, {"role": "user", "content": text}] for text in _prompts(table, src, options)])
            for row, chat in enumerate(chats):
                prompts.append(chat_rows.chat_prompt(chat, src, row, str(options.messages_column)))
            columns = {"completion": str(options.chosen_column), "rejected": str(options.rejected_column)}
            answers = {name: chat_rows.answers(dataset, src, column) for name, column in columns.items()}
            return chat_rows.prepared({"prompt": prompts, **answers}), options.choices
        if options.messages_column:
            for row, chat in enumerate(table[options.messages_column].to_pylist()):
                prompt, completion = chat_rows.split_chat(chat, src, row, options.messages_column)
                prompts.append(prompt)
                completions.append(completion)
        else:
            completion_column = str(options.completion_column)
            pairs = zip(_prompts(table, src, options), chat_rows.answers(dataset, src, completion_column))
            for text, completion in pairs:
                prompts.append([*system, {"role": "user", "content": text}])
                completions.append(completion)
        names = options.choices  # the answers' classes: accuracy and a confusion matrix in evaluation
        return chat_rows.prepared({"prompt": prompts, "completion": completions}), names

    # --- tokenize, collate, train ------------------------------------------------------------------
    def tokenize(self, dataset, tokenizer, options: TextGenerationColumns, max_length: int, split: str):
        """`input_ids` (prompt, target, EOS) and `labels` (-100 on the prompt); for preference training,
        TRL's tokenized preference rows (`prompt_ids`, `chosen_ids`, `rejected_ids`, each answer ending
        with EOS), and for its evaluation the chosen answers as targets. Over-long rows as `long_rows`
        says (the longer answer decides), counted in a `cut` column (1 truncated, dropped rows left out)."""
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token: a fine-tuned model could not learn to stop")
        eos = tokenizer.eos_token_id
        preference = options.objective != "sft" and split == "train"
        answers = ("completion", "rejected") if preference else ("completion",)

        def encode(batch, indices):
            prompts = render_prompts(tokenizer, batch["prompt"])
            targets = [tokenizer(batch[a], add_special_tokens=False)["input_ids"] for a in answers]
            out: dict[str, list] = {k: [] for k in (("prompt_ids", "chosen_ids", "rejected_ids") if preference
                                                    else ("input_ids", "labels"))} | {"cut": []}
            for row, prompt, *ends in zip(indices, prompts, *targets):
                ends = [[*t, eos] for t in ends]
                longest, cut = max(len(t) for t in ends), 0
                if len(prompt) + longest > max_length:
                    if options.long_rows == "fail":
                        raise DataError(f"row {row}: {len(prompt) + longest} tokens, more than --max-length "
                                        f"{max_length} (use --long-rows truncate or drop)")
                    room = max_length - longest
                    if options.long_rows == "drop" or room < 1:
                        continue
                    prompt, cut = prompt[len(prompt) - room:], 1
                if preference:
                    out["prompt_ids"].append(prompt)
                    out["chosen_ids"].append(ends[0])
                    out["rejected_ids"].append(ends[1])
                else:
                    out["input_ids"].append(prompt + ends[0])
                    out["labels"].append([-100] * len(prompt) + ends[0])
                out["cut"].append(cut)
            return out

        dropped_before = dataset.num_rows
        tokenized = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names)
        dropped = dropped_before - tokenized.num_rows
        if dropped:
            log.warning("%d of %d rows longer than max_length %d were dropped", dropped, dropped_before, max_length)
        if tokenized.num_rows == 0:
            raise DataError(f"every row is longer than --max-length {max_length}: raise it or use --long-rows truncate")
        return tokenized.add_column("dropped", [dropped] * tokenized.num_rows) if split == "train" else tokenized

    def check_training_data(self, dataset, label_names, src: str) -> list[str]:
        notes = []
        cut = int(np.sum(dataset["cut"])) if "cut" in dataset.column_names else 0
        dropped = int(dataset["dropped"][0]) if "dropped" in dataset.column_names and dataset.num_rows else 0
        if cut:
            notes.append(f"{cut} of {dataset.num_rows} rows were longer than max_length: their prompts were "
                         "truncated from the start (the target kept)")
        if dropped:
            notes.append(f"{dropped} rows longer than max_length were dropped")
        return notes

    def trainer(self, options: TextGenerationColumns | None = None, **kwargs):
        """Supervised: the language-model head and loss run only where a completion token is
        (`causal_lm.py`); preferences: TRL's `DPOTrainer` (`preference.py`)."""
        from hfbatch.tasks.recipes.causal_lm import targets_only_trainer

        if options is not None and options.objective != "sft":
            from hfbatch.tasks.recipes.preference import preference_trainer

            return preference_trainer(options.objective, options.beta, **kwargs)
        return targets_only_trainer(**kwargs)

    def groups_by_length(self, options: TextGenerationColumns) -> bool:
        """Supervised rows vary a lot (SQuAD chats: 1.57x fewer padded positions in batches of 8 when
        grouped); packed batches have no padding, and TRL batches preference pairs itself."""
        return options.objective == "sft" and not options.packing

    def evaluates_while_training(self, options: TextGenerationColumns) -> bool:
        return options.objective != "sft"

    def training_figures(self, log_history, options: TextGenerationColumns) -> dict[str, float]:
        """Preference training's reward margin and accuracy on the eval set (TRL's figures)."""
        from hfbatch.tasks.recipes.preference import preference_figures

        return preference_figures(log_history) if options.objective != "sft" else {}

    def collator(self, tokenizer, model):
        from transformers import DataCollatorForSeq2Seq

        return _Columns(DataCollatorForSeq2Seq(tokenizer, model=None, label_pad_token_id=-100, padding=True))

    def packing_collator(self):
        """Rows concatenated into one, each with its own positions. The model keeps their attention apart
        only without a KV cache (transformers builds the packed-sequence mask only when no cache is
        passed, and a causal LM makes one whenever `use_cache` is on): the batch turns it off, or rows
        would attend to the rows before them (measured: the loss then differs from the padded batch's)."""
        from transformers import DataCollatorWithFlattening

        return _Columns(DataCollatorWithFlattening(return_position_ids=True), use_cache=False)

    def prepare_model(self, net, tokenizer, options: TextGenerationColumns):
        """The trained model's defaults for bulk inference: greedy, `max_new_tokens`, padding with EOS."""
        config = net.generation_config
        config.max_new_tokens, config.max_length, config.do_sample = options.max_new_tokens, None, False
        config.temperature = config.top_p = config.top_k = None
        if config.pad_token_id is None:
            pad = tokenizer.pad_token_id
            config.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return net

    def prompt_record(self, options: TextGenerationColumns) -> dict | None:
        return options.prompt_record() or None

    def save_extras(self, model_dir, tokenizer, options: TextGenerationColumns) -> None:
        import json

        (model_dir / PROMPT_FILE).write_text(json.dumps(prompt_format(tokenizer) | options.prompt_record(), indent=2))

    # --- evaluate -----------------------------------------------------------------------------------
    def generates(self) -> bool:
        return True

    def generated(self, model, examples, settings, options: TextGenerationColumns) -> pa.Table:
        """Each eval row's answer, generated by the bulk-inference predictor from its prompt: its table of
        predictions (answers, token counts, finish reasons)."""
        from hfbatch.tasks.engine.predictor import PredictorSpec

        constraint = {k: getattr(options, k) for k in ("choices", "regex", "json_schema", "grammar")}
        spec = PredictorSpec(TextGenerationPredictor, model,
                             TextGenerationOptions(messages_column="prompt", max_new_tokens=options.max_new_tokens,
                                                   **constraint), settings)
        predictor = spec.load()
        table, _ = predictor.predict({"text": list(examples["prompt"])}, None, None)
        spec.release()
        return table

    def postprocess(self, predictions, features, examples, tokenizer, model_config, label_names, options):
        answers = predictions.column("generated_text").to_pylist()
        return [p.strip() for p in answers], [c.strip() for c in examples["completion"]]

    def compute_metrics(self, predictions, references, label_names, metrics):
        squad = compute(("squad",), [{"id": str(i), "prediction_text": p} for i, p in enumerate(predictions)],
                        [{"id": str(i), "answers": {"text": [r], "answer_start": [0]}}
                         for i, r in enumerate(references)])
        scores = {"f1": float(squad["f1"]), "exact_match": float(squad["exact_match"])}
        if "bleu" in metrics:
            scores["bleu"] = float(compute(("bleu",), predictions, [[r] for r in references])["bleu"])
        if "rougeL" in metrics:
            scores["rougeL"] = float(compute(("rouge",), predictions, references)["rougeL"])
        samples = [{"prediction": p, "reference": r} for p, r in zip(predictions[:SAMPLES], references)]
        details: dict = {"samples": samples}
        if label_names:  # the answers are choices: scored as a classifier is
            scores["accuracy"] = float(np.mean([p == r for p, r in zip(predictions, references)]))
            labels = [*label_names, *sorted({p for p in predictions if p not in label_names})]  # cut answers
            index = {name: i for i, name in enumerate(labels)}
            matrix = np.zeros((len(labels), len(labels)), dtype=int)
            for p, r in zip(predictions, references):
                if r in index:
                    matrix[index[r], index[p]] += 1
            details["confusion_matrix"] = {"labels": labels, "matrix": matrix.tolist()}
        return {m: scores[m] for m in metrics if m in scores}, details

    def row_statistics(self, predictions, references, label_names, metrics):
        stats = paired.squad_stats(predictions, [[r] for r in references])
        if "bleu" in metrics:
            stats["bleu"] = paired.sacrebleu_stats("bleu", predictions, [[r] for r in references])
        if "rougeL" in metrics:
            stats |= paired.rouge_stats(("rougeL",), predictions, references)
        if label_names:
            stats["accuracy"] = paired.mean_stats([p == r for p, r in zip(predictions, references)])
        return {m: stats[m] for m in metrics if m in stats}

    def output_table(self, predictions, predicted, model_config) -> pa.Table | None:
        """The predictor's own table: what a batch run of this model records too (`monitoring.figures`)."""
        return predictions

    def card_text(self, label_names):
        return {"summary": "A language model fine-tuned (supervised) to answer like the training data's targets",
                "intended_use": "Answering prompts like those of the training data, through the same chat "
                                "template (bulk inference uses the template recorded with the model).",
                "limitations": (("Generated answers may be fluent and wrong; exact match and F1 measure overlap "
                                 "with one reference answer."),
                                ("Prompts longer than the training `max_length` were truncated or dropped in "
                                 "training (see the warnings), and answers stop at `max_new_tokens`."))}


class _Columns:
    """A collator that drops the bookkeeping columns (`cut`, `dropped`) before collating."""

    def __init__(self, collate, **extra):
        self.collate, self.extra = collate, extra

    def __call__(self, features):
        batch = self.collate([{k: v for k, v in f.items() if k in ("input_ids", "labels")} for f in features])
        return {**batch, **self.extra}


def _prompts(table, src: str, options: TextGenerationColumns) -> list[str]:
    return chat_rows.prompts(table, src, options.prompt_column, options.prompt_template)
