"""Supervised fine-tuning of causal language models: TRL's data formats checked row by row, the loss on the
targets only with EOS, padding-free batches that give the padded batches' loss, LoRA end to end through the
train flow on a tiny Llama-style model (adapter and merged model registered, bulk chat generation equal to
per-row `generate` of the merged model, the trained prompt format enforced), LoRA for a classifier, and the
real SmolLM2-135M-Instruct read from its GGUF file."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hfbatch.flows.training import train_flow
from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.predictors.text_generation import PROMPT_FILE
from hfbatch.tasks.recipes import get_recipe
from tests.generation_models import decoder_models
from tests.helpers import SETTINGS, call_flow, predictor, resolve_model, run_local

Q = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"


@pytest.fixture(scope="module")
def llama(data_dir, tmp_path_factory) -> str:
    imdb = pq.read_table(data_dir / "imdb" / "test_sample.parquet").column("text").to_pylist()
    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet").column("text").to_pylist()
    return decoder_models(tmp_path_factory.mktemp("sft"), imdb[:200] + sst2[:2000] + [Q] * 20)["llama"]


@pytest.fixture(scope="module")
def sst2_chats(data_dir, tmp_path_factory) -> dict[str, Path]:
    """SST-2 as instructions: prompt-completion rows for training and evaluation, chats for inference."""
    root = tmp_path_factory.mktemp("sst2-chats")
    t = pq.read_table(data_dir / "sst2" / "train.parquet").slice(0, 140)
    prompts = [Q + x for x in t.column("text").to_pylist()]
    answers = ["positive" if label == 1 else "negative" for label in t.column("label").to_pylist()]
    pq.write_table(pa.table({"prompt": prompts[:96], "completion": answers[:96]}), root / "train.parquet")
    pq.write_table(pa.table({"prompt": prompts[96:120], "completion": answers[96:120]}), root / "eval.parquet")
    chats = [[{"role": "user", "content": p}] for p in prompts[120:]]
    pq.write_table(pa.table({"id": list(range(20)), "messages": chats, "text": prompts[120:]}), root / "infer.parquet")
    return {"root": root, "train": root / "train.parquet", "eval": root / "eval.parquet",
            "infer": root / "infer.parquet"}


def _prepare(rows: dict, **options):
    import datasets

    recipe = get_recipe("text-generation")
    return recipe.prepare(datasets.Dataset.from_dict(rows), "rows", recipe.options_class(**options), None)[0]


@pytest.mark.parametrize("chat, message", [
    ([{"role": "user", "content": "hi"}], "row 0: the chat does not end with an assistant message"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "row 0: message 1 has an unknown role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "row 0: the final assistant message (the target) is empty"),
    ([{"role": "assistant", "content": "alone"}], "row 0: the chat has no prompt"),
])
def test_bad_chats_are_named_by_row(chat, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _prepare({"messages": [chat]}, messages_column="messages")


def test_bad_prompt_completion_rows_and_formats():
    with pytest.raises(DataError, match="row 1: column 'completion' is empty"):
        _prepare({"prompt": ["a", "b"], "completion": ["x", ""]}, prompt_column="prompt", completion_column="completion")
    recipe = get_recipe("text-generation")
    with pytest.raises(ValueError, match="not both"):
        recipe.options_class(messages_column="m", prompt_column="p", completion_column="c")
    with pytest.raises(ValueError, match=r"give --messages-column, or --prompt-column \(or --prompt-template\) and "
                                         "--completion-column"):
        recipe.options_class(prompt_column="p")
    with pytest.raises(ValueError, match="give --prompt-column or --prompt-template, not both"):
        recipe.options_class(prompt_column="p", prompt_template="{{ p }}", completion_column="c")
    with pytest.raises(DataError, match=r"row 1: the prompt template renders empty"):
        _prepare({"t": ["a", " "], "c": ["x", "y"]}, prompt_template="{{ t|trim }}", completion_column="c")
    with pytest.raises(DataError, match=r"has no column 'title' \(read by --prompt-template\)"):
        _prepare({"t": ["a"], "c": ["x"]}, prompt_template="{{ title }}", completion_column="c")
    prepared = _prepare({"t": ["a"], "c": ["x"]}, prompt_template="Say {{ t }}", system_prompt="Be short.",
                        completion_column="c")
    assert prepared[0] == {"prompt": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Say a"}],
                           "completion": "x"}


def test_loss_only_on_the_target_with_eos_and_long_rows_as_chosen(llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    recipe = get_recipe("text-generation")
    rows = {"messages": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How was it?"},
                          {"role": "assistant", "content": "positive"}],
                         [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "negative"}]]}
    data = _prepare(rows, messages_column="messages")
    options = recipe.options_class(messages_column="messages")
    tokens = recipe.tokenize(data, tokenizer, options, 64, "train")
    prompt = tokenizer.apply_chat_template(rows["messages"][0][:2], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    target = tokenizer("positive", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokens[0]["input_ids"] == prompt + target
    assert tokens[0]["labels"] == [-100] * len(prompt) + target  # the prompt is never learnt
    assert len(tokens[1]["input_ids"]) == 64 and tokens[1]["labels"][-1] == tokenizer.eos_token_id
    assert tokens["cut"] == [0, 1]
    assert recipe.check_training_data(tokens, (), "rows") == [
        "1 of 2 rows were longer than max_length: their prompts were truncated from the start (the target kept)"]
    dropped = recipe.tokenize(data, tokenizer, recipe.options_class(messages_column="messages", long_rows="drop"),
                              64, "train")
    assert dropped.num_rows == 1 and "1 rows longer than max_length were dropped" in \
        recipe.check_training_data(dropped, (), "rows")
    with pytest.raises(DataError, match=r"row 1: \d+ tokens, more than --max-length 64"):
        recipe.tokenize(data, tokenizer, recipe.options_class(messages_column="messages", long_rows="fail"), 64, "train")


def test_padding_free_batches_give_the_padded_loss(llama, sst2_chats):
    """`--packing`: rows concatenated with their own positions; the loss equals the padded batch's, so the
    model's attention keeps the rows apart (transformers' packed-sequence mask under sdpa)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    recipe = get_recipe("text-generation")
    options = recipe.options_class(prompt_column="prompt", completion_column="completion", packing=True)
    table = pq.read_table(sst2_chats["train"]).slice(0, 6)
    data = recipe.prepare(datasets.Dataset(table), "rows", options, None)[0]
    rows = [dict(r) for r in recipe.tokenize(data, tokenizer, options, 128, "train")]
    padded = recipe.collator(tokenizer, model)(rows)
    packed = recipe.packing_collator()(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        a = model(**padded).loss
        b = model(**packed).loss
    assert abs(a.item() - b.item()) < 1e-4, (a.item(), b.item())


@pytest.mark.parametrize("packing", [False, True])
def test_the_loss_on_target_positions_only_is_the_models_loss(llama, sst2_chats, tmp_path, packing):
    """The recipe's Trainer runs the head only where a row has a target (`causal_lm.py`): the loss and every
    gradient equal the model's own loss over all positions, padded or padding-free, with fewer logits."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(llama)
    model = AutoModelForCausalLM.from_pretrained(llama)
    recipe = get_recipe("text-generation")
    options = recipe.options_class(prompt_column="prompt", completion_column="completion", packing=packing)
    data = recipe.prepare(datasets.Dataset(pq.read_table(sst2_chats["train"]).slice(0, 6)), "rows", options, None)[0]
    rows = [dict(r) for r in recipe.tokenize(data, tokenizer, options, 128, "train")]
    batch = (recipe.packing_collator() if packing else recipe.collator(tokenizer, model))(rows)
    count = (batch["labels"][..., 1:] != -100).sum()  # what the Trainer passes (`num_items_in_batch`)

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    expected, expected_grads = loss_and_grads(lambda: model(**batch, num_items_in_batch=count).loss)
    trainer = recipe.trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    outputs = {}

    def targets_only():
        loss, outputs["out"] = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=count)
        return loss

    loss, grads = loss_and_grads(targets_only)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    kept, positions = outputs["out"].logits.shape[1], batch["input_ids"].shape[1]
    assert 0 < kept < positions / 2, (kept, positions)


def test_lora_sft_end_to_end(prefect_harness, llama, sst2_chats, tmp_path):
    store = tmp_path / "store"
    params = dict(task="text-generation", dataset=str(sst2_chats["train"]), eval_dataset=str(sst2_chats["eval"]),
                  model=llama, name="sst2-chat", store=str(store), prompt_column="prompt",
                  completion_column="completion", peft="lora", lora_r=8, epochs=1.0, batch_size=16,
                  learning_rate=1e-3, max_length=160, eval_strategy="epoch", max_new_tokens=4, seed=1)
    result = call_flow(train_flow, **params)
    assert set(result["metrics"]) == {"f1", "exact_match", "bleu", "rougeL", "loss"}
    assert result["metrics"]["loss"] > 0 and 0 <= result["metrics"]["f1"] <= 100
    version = store / "models" / "sst2-chat" / result["version"]
    entry = json.loads((store / "models" / "sst2-chat" / "registry.json").read_text())["versions"][0]
    assert (version / "adapter" / "adapter_config.json").exists() and (version / "model.safetensors").exists()
    adapter = json.loads((version / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["task_type"] == "CAUSAL_LM"
    assert json.loads((version / PROMPT_FILE).read_text())["format"] == "chat"
    assert "LoRA" in (version / "README.md").read_text() or "lora" in (version / "README.md").read_text()
    assert entry["task"] == "text-generation"
    again = call_flow(train_flow, **params)  # every step a cache hit: the same version, nothing trained
    assert again["run_key"] == result["run_key"] and again["global_step"] == result["global_step"]

    # bulk chat generation of the registered version: what per-row `generate` of the merged model gives
    model = resolve_model(str(version))
    out = tmp_path / "out"
    run_local("text-generation", model, str(sst2_chats["infer"]), str(out), messages_column="messages",
              max_new_tokens=4)
    bulk = pq.read_table(out).sort_by("id").column("generated_text").to_pylist()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(version).eval()
    tokenizer = AutoTokenizer.from_pretrained(version)
    for i, chat in enumerate(pq.read_table(sst2_chats["infer"]).column("messages").to_pylist()):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        new = merged.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert bulk[i] == tokenizer.decode(new, skip_special_tokens=True), i
    # a text column reaches a chat-trained model as the user turn, as in training: the same answers
    run_local("text-generation", model, str(sst2_chats["infer"]), str(tmp_path / "text"), max_new_tokens=4)
    assert pq.read_table(tmp_path / "text").sort_by("id").column("generated_text").to_pylist() == bulk


def test_a_lora_version_warm_starts_from_its_adapter_on_its_base(prefect_harness, llama, sst2_chats, tmp_path):
    """`--model NAME@VERSION` of a LoRA version: training goes on with that version's adapter (its rank, not
    the one asked) on the version's own base, so the new adapter still fits that base; the registry entry and
    the card name the parent."""
    from safetensors.torch import load_file

    store = tmp_path / "store"
    params = dict(task="text-generation", dataset=str(sst2_chats["train"]), model=llama, name="warm",
                  store=str(store), prompt_column="prompt", completion_column="completion", peft="lora", lora_r=8,
                  epochs=1.0, batch_size=16, learning_rate=1e-3, max_length=160, max_train_samples=48, seed=1)
    first = call_flow(train_flow, **params)
    second = call_flow(train_flow, **{**params, "model": "warm@1", "lora_r": 4, "seed": 2})
    index = json.loads((store / "models" / "warm" / "registry.json").read_text())
    entry = index["versions"][1]
    assert (first["version"], second["version"]) == ("1", "2")
    assert entry["parent"] == "warm@1" and entry["base_model"] == llama  # the root base, not v1's merged weights
    v1, v2 = (store / "models" / "warm" / v / "adapter" for v in ("1", "2"))
    assert json.loads((v2 / "adapter_config.json").read_text())["r"] == 8  # v1's adapter, trained on
    w1, w2 = (load_file(v / "adapter_model.safetensors") for v in (v1, v2))
    assert w1.keys() == w2.keys() and any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert "Continued from the registered version `warm@1`" in (store / "models" / "warm" / "2" / "README.md").read_text()


def test_a_prompt_template_is_trained_recorded_and_used_by_bulk_inference(prefect_harness, llama, data_dir,
                                                                          tmp_path):
    """Fine-tuned with a template over SST-2's own columns (`text`, and `label`'s class names as the target)
    and `--choices`: the template and system prompt are in the version's prompt file, registry entry and
    card; evaluation scores the choices as a classifier is scored (accuracy, confusion matrix); bulk
    inference without a template prompts as in training, and one given explicitly is used and noted."""
    from hfbatch.flows.inference import batch_inference

    sst2 = pq.read_table(data_dir / "sst2" / "train.parquet")
    train, held = tmp_path / "train.parquet", tmp_path / "eval.parquet"
    pq.write_table(sst2.slice(0, 96), train)
    pq.write_table(sst2.slice(96, 24), held)
    template, system = "Review: {{ text }}\nPositive or negative?", "Answer with one word."
    store = tmp_path / "store"
    result = call_flow(train_flow, task="text-generation", dataset=str(train), eval_dataset=str(held), model=llama,
                       name="templated", store=str(store), prompt_template=template, system_prompt=system,
                       completion_column="label", choices=("negative", "positive"), peft="lora", lora_r=8,
                       epochs=1.0, batch_size=16, learning_rate=1e-3, max_length=96, max_new_tokens=4, seed=1)
    assert 0 <= result["metrics"]["accuracy"] <= 1
    version = store / "models" / "templated" / result["version"]
    recorded = json.loads((version / PROMPT_FILE).read_text())
    assert (recorded["prompt_template"], recorded["system_prompt"], recorded["format"]) == (template, system, "chat")
    entry = json.loads((store / "models" / "templated" / "registry.json").read_text())["versions"][0]
    assert entry["prompt"] == {"prompt_template": template, "system_prompt": system}
    card = (version / "README.md").read_text()
    assert "## Prompt" in card and template in card and system in card
    [matrix] = [json.loads(p.read_text()) for p in (store / "evals").glob("*/confusion_matrix.json")]
    assert matrix["labels"][:2] == ["negative", "positive"] and sum(map(sum, matrix["matrix"])) == 24

    rows = tmp_path / "rows.parquet"
    pq.write_table(sst2.slice(200, 10).select(["idx", "text"]), rows)
    common = dict(model=str(version), task="text-generation", input=str(rows), store=str(store), max_new_tokens=4)
    recorded_run = call_flow(batch_inference, output=str(tmp_path / "a"), **common)
    assert recorded_run["notes"] == f"prompt template and system prompt as {version} was trained with"
    out = pq.read_table(tmp_path / "a")  # tokens are the unit: per row, and per run in the summary
    assert recorded_run["input_tokens"] == sum(out.column("input_tokens").to_pylist()) > 0
    assert recorded_run["output_tokens"] == sum(out.column("output_tokens").to_pylist()) > 0
    assert recorded_run["tokens_per_s"] > recorded_run["output_tokens_per_s"] > 0
    call_flow(batch_inference, output=str(tmp_path / "b"), prompt_template=template, system_prompt=system, **common)
    answers = [pq.read_table(tmp_path / d).sort_by("idx").column("generated_text").to_pylist() for d in "ab"]
    assert answers[0] == answers[1]
    noted = call_flow(batch_inference, output=str(tmp_path / "c"), prompt_template="{{ text }}", **common)
    assert noted["notes"] == (f"system prompt as {version} was trained with; "
                              f"prompt template differs from the one {version} was trained with; using the one given")

    # drift for generated outputs: the evaluation recorded the answers' figures (the choices' shares, output
    # tokens, finish reasons), and a run of the registered name is compared with them by PSI
    from hfbatch.tasks.core.registry import Registry
    from hfbatch.tasks.core.store import Store

    [reference] = [json.loads(p.read_text()) for p in (store / "evals").glob("*/reference_figures.json")]
    assert {"answer", "finish_reason", "output_tokens", "output_chars"} <= set(reference)
    assert set(reference["answer"]["counts"]) <= {"negative", "positive"}
    assert sum(reference["answer"]["counts"].values()) == 24
    named = call_flow(batch_inference, output=str(tmp_path / "d"), choices=("negative", "positive"),
                      **(common | {"model": "templated"}))
    [run] = Registry(Store(str(store)), "templated").runs()
    assert {"answer", "finish_reason", "output_tokens", "output_chars"} <= set(run["drift"])
    assert named["max_psi"] == max(run["drift"].values())
    assert set(run["figures"]["answer"]) <= {"negative", "positive"}


def test_a_chat_template_changed_since_training_is_refused(prefect_harness, llama, sst2_chats, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(llama, trained)
    from transformers import AutoTokenizer

    from hfbatch.tasks.predictors.text_generation import prompt_format

    (trained / PROMPT_FILE).write_text(json.dumps(prompt_format(AutoTokenizer.from_pretrained(llama))))
    predictor("text-generation", resolve_model(str(trained)), max_new_tokens=2)  # the trained template: fine
    config = json.loads((trained / "tokenizer_config.json").read_text())
    (trained / "chat_template.jinja").unlink(missing_ok=True)
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (trained / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="the chat template changed since training"):
        predictor("text-generation", resolve_model(str(trained)), max_new_tokens=2)


def test_lora_fine_tunes_a_classifier_and_registers_adapter_and_merged_model(prefect_harness, minilm, sst2_split,
                                                                              tmp_path):
    train, _ = sst2_split
    store = tmp_path / "store"
    result = call_flow(train_flow, dataset=str(train), model=minilm, name="lora-cls", store=str(store),
                       peft="lora", max_train_samples=128, epochs=1.0, batch_size=32, learning_rate=5e-4,
                       lora_target_modules="query,value")
    version = store / "models" / "lora-cls" / result["version"]
    adapter = json.loads((version / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and sorted(adapter["target_modules"]) == ["query", "value"]
    from safetensors import safe_open

    with safe_open(version / "model.safetensors", "pt") as f:  # merged: a plain BERT classifier, no LoRA weights
        names = list(f.keys())
        assert not [k for k in names if "lora" in k] and "classifier.weight" in names
    assert result["metrics"]["accuracy"] > 0.5


def test_qlora_without_a_gpu_is_one_clear_error(minilm, sst2_split, tmp_path):
    import torch

    from hfbatch.tasks.training.train import TrainConfig, check_peft

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("this machine has what QLoRA needs")
    with pytest.raises(ConfigError, match="--peft qlora .* needs a CUDA GPU and the bitsandbytes package"):
        check_peft(TrainConfig(peft="qlora"))


def test_a_gguf_instruct_model_is_converted_once_and_answers(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct from its GGUF file: converted into the cache (safetensors, keyed by the file's
    content), loaded fast the second time, and its bulk answer to a chat is per-row `generate`'s."""
    import time

    from hfbatch.tasks.core.models import resolve_model as resolve

    settings = SETTINGS.with_overrides(cache_dir=tmp_path / "cache")
    model = resolve(str(smollm2_gguf), settings)
    assert Path(model.path).parent == tmp_path / "cache" / "converted" and (Path(model.path) / "model.safetensors").exists()
    started = time.perf_counter()
    assert resolve(str(smollm2_gguf), settings) == model
    assert time.perf_counter() - started < 5  # no second conversion
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name a colour of the sky."}]]
    p = predictor("text-generation", model, messages_column="messages", max_new_tokens=12)
    table, _ = p.predict({"text": chats}, None, None)
    answers = table.column("generated_text").to_pylist()
    assert "Paris" in answers[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(model.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    for chat, answer in zip(chats, answers):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        new = net.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert answer == tokenizer.decode(new, skip_special_tokens=True)
