"""Language-model batch jobs as their users write them, with the real SmolLM2-135M-Instruct on real SST-2
reviews: prompt templates over a row's columns, answers constrained to choices, a pattern or a JSON Schema
(every answer valid by construction, greedy answers those of per-row `generate` with llguidance's mask as
its logits processor), a typed `generated_json`, tokens counted per row and per run, and bad templates and
constraints refused before any work."""
from __future__ import annotations

import json

import jsonschema
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from hfbatch.flows.commands import flows as cli_flows
from hfbatch.flows.params import flow_values
from hfbatch.tasks.core.errors import ConfigError, DataError
from hfbatch.tasks.core.options import validated
from hfbatch.tasks.engine.constraints import json_column
from hfbatch.tasks.predictors.text_generation import TextGenerationOptions
from tests.helpers import predictor, run_local

QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word.\nReview: {{ text }}"
SCHEMA = {"type": "object", "required": ["sentiment", "confidence", "topics", "person"],
          "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                         "topics": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 2},
                         "person": {"type": "object", "required": ["name", "age"],
                                    "properties": {"name": {"type": "string", "maxLength": 20},
                                                   "age": {"type": "integer", "minimum": 0, "maximum": 150}}}}}
JSON_PROMPT = ("Describe this movie review as JSON with its sentiment, your confidence, up to two topics and a "
               "person it names.\nReview: {{ text }}")


@pytest.fixture(scope="module")
def reviews(data_dir, tmp_path_factory):
    """12 SST-2 rows with `idx`, `text` and `label`, in row groups of 5."""
    table = pq.read_table(data_dir / "sst2" / "train.parquet").slice(40, 12)
    path = tmp_path_factory.mktemp("reviews") / "reviews.parquet"
    pq.write_table(table, path, row_group_size=5)
    return path


def options(**values) -> TextGenerationOptions:
    return validated(TextGenerationOptions, values)


@pytest.mark.parametrize("values, message", [
    ({"choices": ("positive", "")}, "--choices: Value error, a choice is empty|--choices: a choice is empty"),
    ({"choices": ("yes", "no", "yes")}, r"--choices: duplicate choice\(s\) \['yes'\]"),
    ({"regex": "(abc"}, "--regex: invalid pattern: unclosed group"),
    ({"regex": "a(?=b)"}, "--regex: invalid pattern: look-around.* is not supported"),
    ({"json_schema": "{not json"}, "--json-schema: not JSON"),
    ({"json_schema": '{"type": "strin"}'}, "--json-schema: not a valid JSON Schema: 'strin' is not valid"),
    ({"json_schema": '{"type": "array", "uniqueItems": true}'},
     r'--json-schema: the schema uses JSON Schema keyword\(s\) "uniqueItems", which llguidance cannot enforce'),
    ({"grammar": "start: answer"}, '--grammar: .*unknown name: "answer"'),
    ({"json_schema": "schema.json"}, "cannot read --json-schema file 'schema.json'"),
    ({"grammar": "answers.lark"}, "cannot read --grammar file 'answers.lark'"),
    ({"choices": ("a", "b"), "regex": "a|b"}, "give one constraint, not --choices, --regex"),
    ({"prompt_template": "{{ title "}, "--prompt-template: the template does not parse: unexpected end of template"),
    ({"prompt_template": "Just this"}, "--prompt-template: the template reads no column"),
    ({"prompt_template": "{{ a }}", "messages_column": "chat"}, "give --prompt-template or --messages-column"),
    ({"choices": ("a", "b"), "num_beams": 2}, "--choices decodes greedily or by sampling, not with beam search"),
])
def test_bad_templates_and_constraints_are_refused_naming_the_option(values, message):
    with pytest.raises(ConfigError, match=message):
        options(**values)


def test_options_come_from_the_command_line_and_belong_to_text_generation(tmp_path):
    """The options are the flow's typed parameters: a schema file is read into the option (its content is
    what the run's configuration and the predictor cache key on), a template file with @, and a constraint
    given to another task is refused naming it."""
    from hfbatch.flows import cli

    schema, template = tmp_path / "schema.json", tmp_path / "prompt.j2"
    schema.write_text(json.dumps(SCHEMA))
    template.write_text(QUESTION)
    args = cli.build_parser().parse_args(["infer", "--model", "m", "--input", "i", "--output", "o",
                                          "--json-schema", str(schema), "--prompt-template", f"@{template}",
                                          "--system-prompt", "Be brief."])
    given = cli.flow_arguments(args)
    values = flow_values(cli_flows()["infer"], given, "text-generation")["options"]["text_generation"]
    parsed = options(**values)
    assert json.loads(parsed.json_schema) == SCHEMA and parsed.prompt_template == QUESTION
    assert parsed.system_prompt == "Be brief."
    args = cli.build_parser().parse_args(["infer", "--model", "m", "--input", "i", "--output", "o",
                                          "--choices", "positive,,negative"])
    assert args.choices == ("positive", "", "negative")  # the empty choice reaches the check that refuses it
    given = cli.flow_arguments(args)
    with pytest.raises(ConfigError, match="--choices is an option of text-generation, not of text-classification"):
        flow_values(cli_flows()["infer"], given, "text-classification")


def test_json_column_types_follow_the_schema():
    arrow, fit = json_column(SCHEMA)
    assert arrow == pa.struct([("sentiment", pa.string()), ("confidence", pa.float64()),
                               ("topics", pa.list_(pa.string())),
                               ("person", pa.struct([("name", pa.string()), ("age", pa.int64())]))])
    assert fit({"sentiment": "positive", "confidence": 1, "topics": [], "person": {"name": "Al", "age": 3}}) == \
        {"sentiment": "positive", "confidence": 1.0, "topics": [], "person": {"name": "Al", "age": 3}}
    free = {"type": "object", "properties": {"tags": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}
    arrow, fit = json_column(free)
    assert arrow == pa.struct([("tags", pa.string())]) and fit({"tags": 3}) == {"tags": "3"}
    arrow, fit = json_column({"type": "object"})  # nothing to type: the JSON text
    assert arrow == pa.string() and fit({"a": [1]}) == '{"a": [1]}'


class GuidedProcessor:
    """llguidance's mask as a `generate` logits processor, for one row: the reference of the engine."""

    def __init__(self, grammar: str, tokenizer):
        import llguidance

        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        self.prompt_len: int | None = None

    def __call__(self, input_ids, scores):
        import llguidance.numpy

        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        else:
            self.matcher.consume_token(int(input_ids[0, -1]))
        logits = scores.numpy().copy()
        bits = llguidance.numpy.allocate_token_bitmask(1, logits.shape[-1])
        llguidance.numpy.fill_next_token_bitmask(self.matcher, bits)
        llguidance.numpy.apply_token_bitmask_inplace(logits, bits)
        return torch.from_numpy(logits)


@pytest.fixture(scope="module")
def plain(smollm2):
    """The model and tokenizer as transformers loads them (the reference's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2.path).eval(), AutoTokenizer.from_pretrained(smollm2.path)


def reference_answers(plain, prompts: list[str], constraint, max_new_tokens: int) -> list[str]:
    """Per-row `generate` (greedy) of each prompt as the user turn, masked by `constraint` if given."""
    import llguidance.hf
    from transformers import LogitsProcessorList

    net, tokenizer = plain
    eos = net.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    guided = llguidance.hf.from_tokenizer(tokenizer, n_vocab=net.get_output_embeddings().weight.shape[0],
                                          eos_token=eos)
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        processors = LogitsProcessorList()
        if constraint is not None:
            processors.append(GuidedProcessor(constraint.grammar(), guided))
        with torch.inference_mode():
            out = net.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def test_greedy_answers_are_those_of_per_row_generate_with_the_same_mask(smollm2, plain, reviews):
    """Unconstrained, under a pattern that allows everything, with choices and with a JSON Schema: each
    bulk answer is per-row `generate`'s with llguidance's mask as its logits processor; a pattern that
    allows the free answer leaves it as it was; every constrained answer is valid."""
    texts = pq.read_table(reviews).column("text").to_pylist()[:4]
    prompts = [QUESTION.replace("{{ text }}", t) for t in texts]
    runs = {"free": {}, "anything": {"regex": "(?s:.*)"}, "choices": {"choices": ("positive", "negative")},
            "grammar": {"grammar": 'start: word "."?\nword: "good" | "bad" | "mixed"'},
            "json": {"json_schema": json.dumps(SCHEMA)}}
    answers = {}
    for name, constraint in runs.items():
        template = JSON_PROMPT if name == "json" else QUESTION
        p = predictor("text-generation", smollm2, prompt_template=template, max_new_tokens=40, **constraint)
        table, _ = p.predict({"text": texts}, None, None)
        answers[name] = table
        if name == "anything":  # the same answers as without a constraint (below), so the same reference
            continue
        row_prompts = [JSON_PROMPT.replace("{{ text }}", t) for t in texts] if name == "json" else prompts
        assert table.column("generated_text").to_pylist() == \
            reference_answers(plain, row_prompts, options(**constraint).constraint(), 40), name
    assert answers["anything"].column("generated_text").equals(answers["free"].column("generated_text"))
    assert set(answers["choices"].column("generated_text").to_pylist()) <= {"positive", "negative"}
    assert answers["choices"].column("finish_reason").to_pylist() == ["eos"] * 4
    assert set(answers["grammar"].column("generated_text").to_pylist()) <= {"good", "bad", "mixed", "good.", "bad.",
                                                                            "mixed."}
    table = answers["json"]
    for text, reason, typed in zip(*(table.column(c).to_pylist() for c in ("generated_text", "finish_reason",
                                                                            "generated_json"))):
        if reason == "eos":
            jsonschema.validate(json.loads(text), SCHEMA)
            assert typed == json_column(SCHEMA)[1](json.loads(text))
        else:
            assert typed is None


def test_a_templated_constrained_job_writes_typed_answers_and_counts_tokens(smollm2, reviews, tmp_path):
    """A job over a table's columns: the template's columns are the inputs (a missing one named before any
    work), a row whose prompt renders empty is quarantined with the reason, answers cut at the token limit
    have a null `generated_json` and are counted, tokens in and out are in the rows and the manifest, and a
    resumed run with another template is refused."""
    table = pq.read_table(reviews)
    titles = [f"Review {i}" for i in range(table.num_rows)]
    titles[3] = "   "
    table = table.append_column("title", pa.array(titles))
    data = tmp_path / "in.parquet"
    pq.write_table(table, data, row_group_size=5)
    template = "{{ title }}" + "\n" + JSON_PROMPT
    out = tmp_path / "out"
    manifest = run_local("text-generation", smollm2, str(data), str(out), prompt_template="{{ title|trim }}",
                         json_schema=json.dumps(SCHEMA), max_new_tokens=32, on_bad_row="quarantine",
                         keep_columns=("idx",))
    assert manifest["quarantined"] == 1
    bad = pq.read_table(out / "_quarantine").to_pylist()
    assert bad[0]["idx"] == table.column("idx")[3].as_py() and bad[0]["reason"] == "the prompt template renders empty"
    result = pq.read_table(out)
    assert result.schema.field("generated_json").type == json_column(SCHEMA)[0]
    assert manifest["input_tokens"] == pc.sum(result.column("input_tokens")).as_py() > 0
    assert manifest["output_tokens"] == pc.sum(result.column("output_tokens")).as_py() > 0
    cut = pc.equal(result.column("finish_reason"), "length")
    assert manifest["cut_at_limit"] == pc.sum(cut).as_py()
    assert result.filter(cut).column("generated_json").null_count == manifest["cut_at_limit"]
    complete = result.filter(pc.invert(cut))
    assert complete.column("generated_json").null_count == 0
    sentiments = pc.struct_field(complete.column("generated_json"), "sentiment").to_pylist()
    assert set(sentiments) <= {"positive", "negative", "neutral"}

    with pytest.raises(ConfigError, match="another configuration"):
        run_local("text-generation", smollm2, str(data), str(out), prompt_template=template,
                  json_schema=json.dumps(SCHEMA), max_new_tokens=32, on_bad_row="quarantine", keep_columns=("idx",))
    with pytest.raises(DataError, match=r"has no column 'headline' \(input 'headline' of text-generation\)"):
        run_local("text-generation", smollm2, str(data), str(tmp_path / "out2"), prompt_template="{{ headline }}",
                  choices=("positive", "negative"))


def test_a_templated_choice_job_reads_and_writes_s3(smollm2, reviews, s3, tmp_path):
    """The same job with input and output on S3 (moto on 127.0.0.1) writes a local run's rows; a rerun
    computes no shard."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    fs.put(str(reviews), "hfbatch/in/reviews.parquet")
    job = dict(prompt_template=QUESTION, choices=("positive", "negative"), max_new_tokens=4, keep_columns=("idx",),
               shard_rows=5)
    local = run_local("text-generation", smollm2, str(reviews), str(tmp_path / "local"), **job)
    remote = run_local("text-generation", smollm2, "s3://hfbatch/in", "s3://hfbatch/out", **job)
    assert remote["rows_out"] == local["rows_out"] == 12 and remote["output_tokens"] == local["output_tokens"]
    with fs.open("hfbatch/out/" + remote["parts"][0]["part"], "rb") as f:
        first = pq.read_table(f)
    expected = pq.read_table(tmp_path / "local" / local["parts"][0]["part"])
    assert first.drop_columns(["model"]).equals(expected.drop_columns(["model"]))
    again = run_local("text-generation", smollm2, "s3://hfbatch/in", "s3://hfbatch/out", **job)
    assert again["shards_skipped"] == again["shards"] == 3
