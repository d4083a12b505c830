"""Model cards as the Hugging Face Hub reads them, checked with huggingface_hub's own parsers (no Hub here)."""
from huggingface_hub import ModelCard, metadata_eval_result

from hfbatch.tasks.core.card import base_license, hub_id, write_model_card
from hfbatch.tasks.core.refs import TrainedModel


def _results(model_index: list[dict]) -> set[tuple]:
    return {(r["task"]["type"], r["dataset"]["type"], r["dataset"]["name"], m["type"], m["value"])
            for entry in model_index for r in entry["results"] for m in r["metrics"]}


def test_a_language_models_card_carries_hub_metadata(tmp_path, minilm):
    trained = TrainedModel(
        store="", key="k", run_key="r1", task="text-generation", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        base_revision=None, base_fingerprint="b" * 8, dataset_fingerprint="d" * 8, label_names=(),
        config={"epochs": 1}, device="cpu", precision="bf16", global_step=5, resumed_from_step=0, train_samples=40,
        train_samples_per_second=1.0, train_loss=0.5, dataset_source=str(tmp_path / "chats.parquet"),
        adapter={"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        prompt={"prompt_template": "Review: {{ text }}", "system_prompt": "Answer positive or negative."},
        license=base_license(minilm))
    (tmp_path / "chats.parquet").write_bytes(b"")  # a local file: not a Hub dataset id
    metrics = {"exact_match": 86.5, "f1": 88.25}
    write_model_card(tmp_path, trained, {"summary": "A chat model"}, metrics, "sst2-llm", "3",
                     {"exact_match": [83.0, 89.5]})

    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"  # MiniLM's card says so
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "datasets" not in data
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"hfbatch", "text-generation", "lora"} <= set(data["tags"])
    expected = set()
    for name, value in metrics.items():
        expected |= _results(metadata_eval_result(
            model_pretty_name="sst2-llm v3", task_pretty_name="text-generation", task_id="text-generation",
            metrics_pretty_name=name, metrics_id=name, metrics_value=value, dataset_pretty_name="chats.parquet",
            dataset_id="local")["model-index"])
    assert _results(data["model-index"]) == expected and data["model-index"][0]["name"] == "sst2-llm v3"
    record = data["hfbatch"]
    assert record["prompt"]["system_prompt"] == "Answer positive or negative."
    assert record["adapter"]["r"] == 8 and record["intervals"]["exact_match"] == [83.0, 89.5]
    assert "| exact_match | 86.5000 | [83.0000, 89.5000] |" in card.text


def test_hub_ids_and_local_sources_are_told_apart(tmp_path):
    assert hub_id("stanfordnlp/sst2") == "stanfordnlp/sst2" and hub_id("gpt2") == "gpt2"
    assert hub_id("nyu-mll/glue:sst2#validation") == "nyu-mll/glue" and hub_id("org/model@v2") == "org/model"
    assert hub_id(str(tmp_path)) is None and hub_id("s3://bucket/data.parquet") is None
    assert hub_id("train.parquet") is None  # a file name, wherever it is
    assert hub_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # dots in a repository name
