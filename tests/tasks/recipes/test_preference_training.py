"""Preference training (`--objective dpo`) through TRL's `DPOTrainer`: preference rows in TRL's standard and
conversational formats checked row by row, tokenized once by the recipe's cached step, and LoRA DPO end to
end through the train flow on a tiny Llama-style model, going on from a registered SFT version (its
reference model) and registered with the generated-answer metrics and TRL's reward figures."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hfbatch.flows.training import train_flow
from hfbatch.tasks.core.errors import DataError
from hfbatch.tasks.predictors.text_generation import render_prompts
from hfbatch.tasks.recipes import get_recipe
from tests.generation_models import decoder_models
from tests.helpers import call_flow

Q = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"


@pytest.fixture(scope="module")
def llama(data_dir, tmp_path_factory) -> str:
    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet").column("text").to_pylist()
    return decoder_models(tmp_path_factory.mktemp("dpo"), sst2[:2000] + [Q] * 20)["llama"]


@pytest.fixture(scope="module")
def sst2_pairs(data_dir, tmp_path_factory) -> dict:
    """SST-2 as instructions: prompt-completion rows (SFT) and preference rows (the right label chosen, a
    refusal rejected: a preference the tiny model can learn without reading the review), the eval rows apart."""
    root = tmp_path_factory.mktemp("sst2-pairs")
    t = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 120)
    prompts = [Q + x for x in t.column("text").to_pylist()]
    right = ["positive" if label == 1 else "negative" for label in t.column("label").to_pylist()]
    wrong = ["I cannot tell from this review."] * len(right)
    pq.write_table(pa.table({"prompt": prompts[:96], "completion": right[:96]}), root / "sft.parquet")
    pq.write_table(pa.table({"prompt": prompts[:96], "chosen": right[:96], "rejected": wrong[:96]}),
                   root / "train.parquet")
    pq.write_table(pa.table({"prompt": prompts[96:], "chosen": right[96:], "rejected": wrong[96:]}),
                   root / "eval.parquet")
    return {"sft": root / "sft.parquet", "train": root / "train.parquet", "eval": root / "eval.parquet"}


def _prepare(rows: dict, **options):
    import datasets

    recipe = get_recipe("text-generation")
    return recipe.prepare(datasets.Dataset.from_dict(rows), "rows", recipe.options_class(**options), None)[0]


DPO = {"objective": "dpo", "chosen_column": "chosen", "rejected_column": "rejected"}


def test_preference_rows_in_both_formats_and_their_errors():
    standard = _prepare({"q": ["2+2?"], "chosen": ["4"], "rejected": ["5"]}, prompt_column="q", **DPO,
                        system_prompt="Be brief.")
    assert standard[0] == {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                           "completion": "4", "rejected": "5"}
    chat = [{"role": "user", "content": "2+2?"}]
    conversational = _prepare({"m": [chat], "chosen": [[{"role": "assistant", "content": "4"}]],
                               "rejected": [[{"role": "assistant", "content": "5"}]]}, messages_column="m", **DPO)
    assert conversational[0] == {"prompt": chat, "completion": "4", "rejected": "5"}

    with pytest.raises(DataError, match="row 0: the prompt chat ends with an assistant message"):
        _prepare({"m": [[*chat, {"role": "assistant", "content": "4"}]], "chosen": ["4"], "rejected": ["5"]},
                 messages_column="m", **DPO)
    with pytest.raises(DataError, match="row 1: column 'rejected' is empty"):
        _prepare({"q": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", " "]}, prompt_column="q", **DPO)
    with pytest.raises(DataError, match="row 0: column 'chosen' is a list, but not of one assistant message"):
        _prepare({"q": ["a"], "chosen": [[{"role": "user", "content": "x"}]], "rejected": ["z"]},
                 prompt_column="q", **DPO)
    recipe = get_recipe("text-generation")
    for options, message in [({"prompt_column": "q", "objective": "dpo", "chosen_column": "c"}, "needs --chosen"),
                             ({"prompt_column": "q", "completion_column": "a", "chosen_column": "c"}, "give --objective dpo"),
                             ({"prompt_column": "q", "completion_column": "a", **DPO}, "not --completion-column"),
                             ({"prompt_column": "q", "packing": True, **DPO}, "--packing is for --objective sft")]:
        with pytest.raises(ValueError, match=message):
            recipe.options_class(**options)


def test_preference_rows_are_tokenized_as_trl_takes_them(llama):
    """`prompt_ids` as bulk inference prompts the model, each answer's tokens and EOS; an over-long row is
    cut from its prompt's start so that the longer answer fits whole (or dropped, or refused)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    recipe = get_recipe("text-generation")
    rows = _prepare({"q": ["short one", "a much longer prompt " * 20], "chosen": ["yes", "no"],
                     "rejected": ["no, not at all", "yes"]}, prompt_column="q", **DPO)
    options = recipe.options_class(prompt_column="q", **DPO)
    tokenized = recipe.tokenize(rows, tokenizer, options, 64, "train")
    prompt = render_prompts(tokenizer, [rows[0]["prompt"]])[0]
    eos = tokenizer.eos_token_id
    first = tokenized[0]
    assert first["prompt_ids"] == prompt and first["cut"] == 0
    assert first["chosen_ids"] == [*tokenizer("yes", add_special_tokens=False)["input_ids"], eos]
    assert first["rejected_ids"] == [*tokenizer("no, not at all", add_special_tokens=False)["input_ids"], eos]
    second = tokenized[1]
    longest = max(len(second["chosen_ids"]), len(second["rejected_ids"]))
    assert second["cut"] == 1 and len(second["prompt_ids"]) + longest == 64
    assert second["prompt_ids"] == render_prompts(tokenizer, [rows[1]["prompt"]])[0][-len(second["prompt_ids"]):]
    # the eval split: the chosen answers as supervised targets (the evaluation's loss)
    evaluation = recipe.tokenize(rows, tokenizer, options, 64, "eval")
    assert evaluation[0]["input_ids"] == prompt + first["chosen_ids"]
    with pytest.raises(DataError, match="row 1: .* tokens, more than --max-length 64"):
        recipe.tokenize(rows, tokenizer, recipe.options_class(prompt_column="q", long_rows="fail", **DPO), 64, "train")


def test_dpo_goes_on_from_a_registered_sft_version_and_registers_its_rewards(prefect_harness, llama, sst2_pairs,
                                                                              tmp_path):
    store = tmp_path / "store"
    common = dict(task="text-generation", name="sentiment", store=str(store), prompt_column="prompt",
                  peft="lora", lora_r=8, epochs=1.0, batch_size=16, max_length=160, max_new_tokens=4, seed=1)
    sft = call_flow(train_flow, dataset=str(sst2_pairs["sft"]), model=llama, completion_column="completion",
                    learning_rate=1e-3, **common)
    assert sft["version"] == "1"

    params = dict(dataset=str(sst2_pairs["train"]), eval_dataset=str(sst2_pairs["eval"]), model="sentiment@1",
                  learning_rate=5e-3, **DPO, **common)
    result = call_flow(train_flow, **params)
    assert result["version"] == "2" and result["global_step"] == 6
    metrics = result["metrics"]
    assert {"f1", "exact_match", "loss", "reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected",
            "preference_loss"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("reward_margin", "reward_accuracy", "preference_loss"))
    assert metrics["reward_margin"] > 0 and metrics["reward_accuracy"] >= 0.9  # on the eval rows
    version = store / "models" / "sentiment" / "2"
    entry = json.loads((store / "models" / "sentiment" / "registry.json").read_text())["versions"][1]
    assert entry["metrics"]["reward_margin"] == metrics["reward_margin"]
    assert "reward_margin" in (version / "README.md").read_text()
    # the reference is the SFT version it started from: at the first step the policy is the reference and
    # the DPO loss is ln 2; the preference it learns brings the loss down
    log = json.loads((version / "train_log.json").read_text())
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[-1] < losses[0]
    saved = {p.name for p in (version / "adapter").iterdir()}  # the trained adapter only, not TRL's `ref` copy
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and not any(p.is_dir() for p in
                                                                                   (version / "adapter").iterdir())
    again = call_flow(train_flow, **params)  # every step a cache hit
    assert (again["run_key"], again["version"], again["metrics"]) == (result["run_key"], "2", metrics)



def test_orpo_learns_answers_and_preference_from_a_base_model(prefect_harness, llama, sst2_pairs, tmp_path):
    """`--objective orpo` (TRL's `ORPOTrainer`): no SFT version first and no reference model; the same
    tokenized preference rows, the chosen answers' loss and the odds-ratio term both fall."""
    store = tmp_path / "store"
    result = call_flow(train_flow, task="text-generation", name="sentiment", store=str(store), model=llama,
                       dataset=str(sst2_pairs["train"]), eval_dataset=str(sst2_pairs["eval"]),
                       prompt_column="prompt", objective="orpo", chosen_column="chosen", rejected_column="rejected",
                       peft="lora", lora_r=8, epochs=2.0, batch_size=16, learning_rate=5e-3, max_length=160,
                       max_new_tokens=4, seed=1)
    assert result["version"] == "1" and result["global_step"] == 12
    metrics = result["metrics"]
    assert {"f1", "exact_match", "reward_margin", "reward_accuracy", "log_odds_ratio", "chosen_nll_loss"} <= set(metrics)
    assert metrics["reward_margin"] > 0 and metrics["reward_accuracy"] >= 0.9  # on the eval rows
    log = json.loads((store / "models" / "sentiment" / "1" / "train_log.json").read_text())
    nll = [e["nll_loss"] for e in log if "nll_loss" in e]
    assert len(nll) >= 2 and nll[-1] < 0.85 * nll[0]  # it learns the chosen answers too, unlike DPO


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_trainers_checkpoint_activations(llama, objective, tmp_path):
    """A preference batch holds twice the sequences: activation checkpointing must be on (transformers 5
    ignores the deprecated `gradient_checkpointing` alias in a copy of arguments that sets the new name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    recipe = get_recipe("text-generation")
    options = recipe.options_class(prompt_column="q", **(DPO | {"objective": objective}))
    tokenizer = AutoTokenizer.from_pretrained(llama)
    rows = recipe.tokenize(_prepare({"q": ["2+2?"], "chosen": ["4"], "rejected": ["5"]}, prompt_column="q",
                                    **(DPO | {"objective": objective})), tokenizer, options, 64, "train")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = recipe.trainer(options, model=AutoModelForCausalLM.from_pretrained(llama), args=args,
                             train_dataset=rows, processing_class=tokenizer)
    assert trainer.args.activation_checkpointing is True
