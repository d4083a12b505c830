"""Parameters are defined once: the flows' signatures come from the parameter models, and the command
line, the Prefect parameter schema, the deployments and the README's command table agree with them."""
import argparse
import inspect
import typing
from pathlib import Path

import pytest
import yaml
from hfbatch.flows import cli, reference
from hfbatch.flows.params import check_parameters
from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.recipes import all_recipes

ROOT = Path(__file__).resolve().parents[2]


def _options(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


@pytest.mark.parametrize("command", ["train", "evaluate", "infer"])
def test_every_flow_parameter_is_a_cli_option_with_the_same_default(command):
    flow = cli.flows()[command]
    options = _options(command)
    signature = inspect.signature(flow.fn).parameters
    assert signature and set(signature) <= set(options)
    for name, param in signature.items():
        action = options[name]
        assert action.option_strings[0] == f"--{name.replace('_', '-')}"
        if param.default is inspect.Parameter.empty:
            assert action.required, name
        else:
            assert action.default == param.default and not action.required, name
        literal = [a for a in typing.get_args(param.annotation) if typing.get_origin(a) is typing.Literal]
        if typing.get_origin(param.annotation) is typing.Literal or literal:
            allowed = typing.get_args(param.annotation if not literal else literal[0])
            assert tuple(action.choices) == allowed, name
        schema = flow.parameters.properties[name]
        assert schema.get("description"), f"{name} has no description in the Prefect parameter schema"


def test_recipe_options_become_flow_parameters():
    """A recipe's options reach the flows and the CLI without a word elsewhere: every recipe's fields
    are parameters of the flows that use them."""
    train = inspect.signature(cli.flows()["train"].fn).parameters
    infer = inspect.signature(cli.flows()["infer"].fn).parameters
    for recipe in all_recipes().values():
        assert set(recipe.infer_options.model_fields) <= set(infer), recipe.task
        if recipe.trainable:
            assert set(recipe.train_options.model_fields) <= set(train), recipe.task
    assert {"text_column", "label_column"} <= set(train) and {"candidate_labels", "top_k"} <= set(infer)
    assert _options("infer")["candidate_labels"].option_strings == ["--candidate-labels", "--labels"]
    train_tasks = _options("train")["task"].choices
    assert set(train_tasks) == {t for t, r in all_recipes().items() if r.trainable}


def test_cli_values_reach_the_flow_typed():
    args = cli.build_parser().parse_args(["infer", "--model", "m", "--input", "i", "--output", "o", "--columns",
                                          "question=q,context=c", "--keep-columns", "id,day", "--multi-label",
                                          "--labels", "a,b"])
    assert (args.columns, args.keep_columns, args.multi_label, args.candidate_labels) == \
        ({"question": "q", "context": "c"}, ("id", "day"), True, ("a", "b"))
    with pytest.raises(ConfigError, match="learning_rate: Input should be less than 1"):
        check_parameters(cli.flows()["train"], {"dataset": "d", "model": "m", "name": "n", "learning_rate": 5})
    with pytest.raises(ConfigError, match="has no parameter"):
        check_parameters(cli.flows()["infer"], {"model": "m", "input": "i", "output": "o", "no_such": 1})


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
