"""Parameters are defined once, in the flows' typed signatures: the command line, the Prefect parameter
schema, the deployments and the README's command table agree with them, and each task's options are its
own namespace."""
import argparse
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from hfbatch.flows import cli, reference
from hfbatch.flows.commands import flows
from hfbatch.flows.params import InferOptions, TrainOptions, check_parameters, flow_options, flow_values
from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.options import param_name
from hfbatch.tasks.predictors import predictor_classes
from hfbatch.tasks.recipes import all_recipes
from hfbatch.tasks.training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _options(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


@pytest.mark.parametrize("command", ["train", "evaluate", "infer"])
def test_flows_have_ordinary_typed_signatures_that_make_the_cli(command):
    """Every flat parameter of the flow is an option of the same name, type and choices; the models
    (`training`, `options`) are expanded into their fields' options; the Prefect schema describes each."""
    flow = flows()[command]
    assert not hasattr(flow.fn, "__signature__")  # written out, not grafted on
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    options = _options(command)
    for name, param in inspect.signature(flow.fn).parameters.items():
        if name == "plan":  # handed over by a caller that worked it out: not an option, not in the UI's form
            assert name not in options and name not in flow.parameters.properties and param.default is None
            continue
        assert flow.parameters.properties[name].get("description"), name
        if name in ("training", "options"):
            assert name not in options
            continue
        action = options[name]
        assert action.option_strings[0] == f"--{name.replace('_', '-')}"
        assert action.required == (param.default is inspect.Parameter.empty), name
        if not action.required:
            assert action.shown_default == param.default, name
        kind, choices = cli._kind(hints[name])
        assert action.choices == (choices if kind == "choice" else None), name
    if command == "train":
        assert set(TrainConfig.model_fields) <= set(options)


def test_each_task_brings_its_options_in_its_own_namespace():
    """A recipe's or predictor's options reach the flows and the CLI without a word elsewhere; the same
    name means what each task says (`--top-k`), and an option of another task is refused by name."""
    for task, recipe in all_recipes().items():
        if recipe.options_class.model_fields:
            assert TrainOptions.model_fields[param_name(task)].annotation == recipe.options_class | None
    for task, cls in predictor_classes().items():
        if cls.options_class.model_fields:
            assert InferOptions.model_fields[param_name(task)].annotation == cls.options_class | None
    top_k = next(o for o in flow_options(flows()["infer"]) if o.dest == "top_k")
    assert {"fill-mask", "text-generation", "translation"} <= set(top_k.paths)
    assert "fill-mask: tokens to return per row (default: 5)" in top_k.help and "sampling: keep the K" in top_k.help
    assert _options("infer")["candidate_labels"].option_strings == ["--candidate-labels", "--labels"]
    assert flow_values(flows()["train"], {"dataset": "d", "doc_stride": 64, "epochs": 2.0}, "question-answering") == \
        {"dataset": "d", "options": {"question_answering": {"doc_stride": 64}}, "training": {"epochs": 2.0}}
    with pytest.raises(ConfigError, match="--doc-stride is an option of question-answering, not of text-classification"):
        flow_values(flows()["train"], {"doc_stride": 64}, "text-classification")
    assert set(_options("train")["task"].choices) == {*all_recipes(), "ner", "sentiment-analysis"}


def test_cli_values_reach_the_flow_typed():
    args = cli.build_parser().parse_args(["infer", "--model", "m", "--input", "i", "--output", "o", "--columns",
                                          "question=q,context=c", "--keep-columns", "id,day", "--multi-label",
                                          "--labels", "a,b"])
    assert (args.columns, args.keep_columns, args.multi_label, args.candidate_labels) == \
        ({"question": "q", "context": "c"}, ("id", "day"), True, ("a", "b"))
    assert not hasattr(args, "text_column")  # not given: the flow's default applies
    with pytest.raises(ConfigError, match=r"--learning-rate: Input should be less than 1 \(got 5\)"):
        check_parameters(flows()["train"], {"dataset": "d", "model": "m", "name": "n", "training": {"learning_rate": 5}})
    with pytest.raises(ConfigError, match="--no-such: no such option"):
        check_parameters(flows()["infer"], {"model": "m", "input": "i", "output": "o", "no_such": 1})


def test_parsing_and_checking_a_command_line_imports_neither_torch_nor_transformers():
    code = ("import sys; from hfbatch.flows import cli; from hfbatch.flows.commands import flows; "
            "from hfbatch.flows.params import flow_values, parameter_model; "
            "a = cli.build_parser().parse_args(['infer', '--model', 'm', '--input', 'i', '--output', 'o', '--top-k', '3',"
            " '--task', 'fill-mask']); "
            "v = flow_values(flows()['infer'], cli.flow_arguments(a), 'fill-mask'); "
            "parameter_model(flows()['infer']).model_validate(v); "
            "print([m for m in ('torch', 'transformers', 'datasets', 'evaluate') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_deployment_parameters_are_flow_parameters():
    """deployments/prefect.yaml: every entrypoint is one of the flows, and its parameters are valid for it."""
    from prefect.utilities.importtools import import_object

    config = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        flow = import_object(deployment["entrypoint"])
        check_parameters(flow, deployment.get("parameters") or {})
        for trigger in deployment.get("triggers", []):
            check_parameters(flow, {**deployment["parameters"], **trigger.get("parameters", {})})


def test_readme_command_reference_is_the_generated_one():
    """README.md holds `reference.commands_markdown()` verbatim; regenerate it with
    `.venv/bin/python -c "from hfbatch.flows.reference import commands_markdown; print(commands_markdown())"`."""
    assert reference.commands_markdown() in (ROOT / "README.md").read_text()
