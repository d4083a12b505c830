"""`hfbatch` command line: `train`, `evaluate` and `infer` run the Prefect flow of the same name, with
options made from the flow's parameters (`flows/params.py`): same names, types, choices and defaults."""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import traceback
import types
import typing
from typing import TYPE_CHECKING, Any

from hfbatch.flows.boundary import reported_error, user_errors_quiet
from hfbatch.flows.commands import COMMANDS
from hfbatch.tasks.core.errors import ConfigError

if TYPE_CHECKING:
    from hfbatch.flows.params import Option
# The flows (and Prefect) are imported only by the commands that run one, and for their options: `status`
# answers without them. Neither the options nor their checks import torch or transformers.

def build_parser(flow_options: bool = True) -> argparse.ArgumentParser:
    """The command line; without `flow_options`, the flow commands are there without their options (and
    the flows are not imported): enough to parse any other command."""
    p = argparse.ArgumentParser(prog="hfbatch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print the result as JSON only")
    output.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    output.add_argument("--verbose", action="store_true", help="show the libraries' own progress bars and load "
                        "reports too (HFBATCH_VERBOSE=1)")
    for command, description in COMMANDS.items():
        parser = sub.add_parser(command, parents=[output], help=description, description=description)
        if flow_options:
            from hfbatch.flows.commands import flows
            from hfbatch.flows.params import flow_options as options_of

            for option in options_of(flows()[command]):
                add_option(parser, option)

    s = sub.add_parser("status", parents=[output], help="champions, metric trends and the last flow runs")
    s.add_argument("--store", help="artifact store URL holding the model registry")
    s.add_argument("--limit", type=int, default=5, help="last N runs of each deployment / flow")

    v = sub.add_parser("serve", help="serve watch-data, retrain, train and batch-inference here (needs a "
                       "Prefect server: PREFECT_API_URL)")
    v.add_argument("--name", required=True, help="model name: retrain registers versions of it, "
                   "batch-inference uses its champion")
    v.add_argument("--model", required=True, help="base model to fine-tune: local directory or hub id[@revision]")
    v.add_argument("--watch", required=True, help="labelled data prefix to watch (directory or s3://)")
    v.add_argument("--input", required=True, help="batch-inference input (Parquet file, directory, s3://)")
    v.add_argument("--output", required=True, help="batch-inference output; may hold {date} and {model_version}")
    v.add_argument("--task", default="text-classification", help="the ML task")
    v.add_argument("--cron", default="0 2 * * *", help="batch-inference schedule")
    v.add_argument("--watch-interval", type=float, default=300, help="seconds between looks at --watch")
    v.add_argument("--train-param", action="append", default=[], metavar="KEY=VALUE",
                   help="train flow parameter (value parsed as JSON when it is), e.g. max_train_samples=3000")
    v.add_argument("--store", help="artifact store URL")
    v.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    v.set_defaults(json=False)

    d = sub.add_parser("deploy", help="prefect deploy --all of deployments/prefect.yaml (PREFECT_API_URL)")
    d.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    d.set_defaults(json=False)
    for parser in (v, d):
        parser.add_argument("--alert-block", metavar="TYPE/NAME", help="notification block the alerts send "
                            "through (default: $HFBATCH_ALERT_BLOCK or custom-webhook/hfbatch-alerts)")
        parser.add_argument("--inference-deadline", type=float, metavar="SECONDS", help="alert when a "
                            "batch-inference run has not completed this long after it started or became late "
                            "(default: $HFBATCH_INFERENCE_DEADLINE or 7200)")

    pr = sub.add_parser("promote", parents=[output], help="make a registered version the champion",
                        description="make a registered version the champion (recorded in the history; refused "
                                    "if its files fail their sha256 check)")
    pr.add_argument("ref", metavar="NAME@VERSION", help="VERSION: a number, champion, challenger or previous")
    pr.add_argument("--reason", help="why (recorded in the history)")
    pr.add_argument("--store", help="artifact store URL holding the model registry")
    rb = sub.add_parser("rollback", parents=[output], help="make an earlier version the champion again",
                        description="make an earlier version the champion again (default: the champion the "
                                    "current one replaced)")
    rb.add_argument("name", metavar="NAME", help="registered model name")
    rb.add_argument("--to", metavar="VERSION", help="the version to go back to (a number or an alias)")
    rb.add_argument("--reason", required=True, help="why (recorded in the history)")
    rb.add_argument("--store", help="artifact store URL holding the model registry")

    pu = sub.add_parser("push", parents=[output], help="upload a registered version to the Hugging Face Hub",
                        description="upload a registered version's files and model card to a Hub model repository "
                                    "(HF_TOKEN; the files checked against their registered sha256; the commit "
                                    "recorded in the registry)")
    pu.add_argument("ref", metavar="NAME@VERSION", help="VERSION: a number, champion, challenger or previous")
    pu.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub model repository (created if "
                    "missing)")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--store", help="artifact store URL holding the model registry")

    pz = sub.add_parser("prune-results", parents=[output], help="remove results kept for reuse across runs",
                        description="remove the results kept for reuse across runs (the store's results/), whole "
                                    "predictors at a time: safe while runs go on (they compute again what they "
                                    "no longer find)")
    pz.add_argument("--unregistered", action="store_true",
                    help="those of a registered model version no longer in the registry")
    pz.add_argument("--older-than", type=float, metavar="DAYS", help="those no run has used for DAYS days")
    pz.add_argument("--max-size", type=_size, metavar="SIZE",
                    help="then the least recently used until the rest hold at most SIZE (e.g. 500MB, 20GB)")
    pz.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    pz.add_argument("--store", help="artifact store URL (default: $HFBATCH_STORE or ./hfbatch-store)")
    return p


def _size(text: str) -> int:
    """Bytes of a size such as 2GB, 500MB, 10k or 4096."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        return int(float(number.removesuffix(unit)) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 20GB)") from None


def add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    """`--name-with-dashes` for a flow parameter (or a field of its `training` or `options` models): its
    type, choices and description, its default in the help. Only options given reach the flow."""
    extra = option.info.json_schema_extra if isinstance(option.info.json_schema_extra, dict) else {}
    kind, inner = _kind(option.annotation)
    kwargs: dict[str, Any] = {"dest": option.dest, "help": option.help}
    if option.required:
        kwargs["required"] = True
    else:
        kwargs["default"] = argparse.SUPPRESS
        default = option.info.get_default()
        if not option.per_task and not unset(default):
            kwargs["help"] += f" (default: {default})"
    if kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind == "choice":
        kwargs["choices"] = inner
    elif kind == "list":
        kwargs.update(type=_comma_list, metavar="A,B,...")
    elif kind == "dict":
        metavar = str(extra.get("metavar", "KEY=VALUE,..."))
        kwargs.update(type=_pairs(metavar), metavar=metavar)
    else:
        kwargs["type"] = inner
    action = parser.add_argument(option.flag, *option.aliases, **kwargs)
    action.shown_default = None if option.per_task or option.required else option.info.get_default()  # type: ignore[attr-defined]


def _kind(annotation) -> tuple[str, Any]:
    """What kind of option a parameter type makes: ("bool" | "choice" | "list" | "dict" | "value", detail)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _kind(typing.get_args(annotation)[0])
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "bool", None
    if origin is typing.Literal:
        return "choice", list(typing.get_args(annotation))
    if origin in (list, tuple):
        return "list", None
    if origin is dict:
        return "dict", None
    return "value", annotation


def unset(default) -> bool:
    """A default that says "not given" rather than a value (shown as nothing in help)."""
    return default is None or default is False or default in ((), [], "")


def _comma_list(text: str) -> tuple[str, ...]:
    """`A,B` as its items; an empty item stays (to be refused where it matters, e.g. an empty choice)."""
    return tuple(x.strip() for x in text.split(",")) if text.strip() else ()


def _pairs(metavar: str):
    def parse(text: str) -> dict[str, str]:
        items = _comma_list(text)
        bad = [item for item in items if "=" not in item]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected {metavar} pairs; got {text!r}")
        return dict(item.split("=", 1) for item in items)

    return parse


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 an error in the input or configuration, 3 a service or storage that failed
    from outside (one message each; the traceback with --debug and in the Prefect run log), 130/143
    stopped by SIGINT/SIGTERM (committed work kept).
    Run as the program (no `argv`), it ends the process (`_skip_teardown`)."""
    if argv is not None:
        return _main(argv)
    atexit.register(_skip_teardown)  # the first exit handler registered: it runs last
    code = _main(sys.argv[1:])
    # logging's exit handler was registered before the temporary server started, so it would run after
    # the server's stop: Prefect's API log handler would wait seconds for a server that is gone, and the
    # last logs would be lost. Flush and close the handlers while the server still runs.
    logging.shutdown()
    _EXIT_CODE[:] = [code]
    sys.exit(code)


_EXIT_CODE = [0]


def _skip_teardown() -> None:
    """The last exit handler, once every other one has run (Prefect's, which send the last logs and
    events; the temporary server's stop): leave without the interpreter's finalization, which takes
    1.5-1.8 s after every command (torch's and oneDNN's native teardown; `benchmarks/RESULTS.md`) and
    saves nothing."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_EXIT_CODE[0])


def _main(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    # Without PREFECT_API_URL, a temporary local server (SQLite); its start-up limit (Prefect's default,
    # 20 s, is too short on a busy small machine, where migrating a fresh database takes longer)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from hfbatch.flows import server
    from hfbatch.tasks.core.settings import Settings

    server.client_limits(Settings().api_timeout)
    if command in COMMANDS and not {"-h", "--help"} & set(argv):
        server.start_unless_configured()  # first: it comes up while this process imports and checks the input
    try:
        args = build_parser(flow_options=command in COMMANDS).parse_args(argv)
    except SystemExit as e:  # usage errors (argparse printed them) and --help
        return int(e.code or 0)
    if getattr(args, "verbose", False):  # serve and deploy have no --verbose
        os.environ["HFBATCH_VERBOSE"] = "1"  # the flows' Settings, here and in the processes they start
    try:
        # libraries print progress to stdout (the Trainer prints its logs when tqdm is off): with
        # --json, stdout must hold the JSON document only
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext(), \
                _stopped_by_signals(), user_errors_quiet(not args.debug and args.command != "status"):
            result = _run(args)
    except Exception as e:
        reported = reported_error(e)
        if reported is None:
            raise  # a bug in hfbatch: its traceback
        if args.debug:
            traceback.print_exc()
        print(f"hfbatch: error: {reported}", file=sys.stderr)
        return reported.exit_code
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"hfbatch: stopped by {signal.Signals(signum).name}; committed work is kept, a rerun finishes "
              "the rest", file=sys.stderr)
        return 128 + signum
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_human(args.command, result)
    return 0


def flow_arguments(args: argparse.Namespace) -> dict:
    """A flow command's parsed options without the command's own (`--json`, `--debug`, `--verbose`)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "json", "debug", "verbose")}


def _run(args) -> dict:
    if args.command in ("serve", "deploy"):
        return _operate(args)
    if args.command == "push":
        from hfbatch.flows.registry import parse_ref, push_flow, registry_of
        from hfbatch.tasks.core.settings import Settings
        from hfbatch.tasks.core.store import Store

        name, version = parse_ref(args.ref)
        registry_of(Store.open(Settings(), args.store), name).resolve(version)  # checked before a flow starts
        return push_flow(name=name, version=version, repo_id=args.repo_id, private=args.private, store=args.store)
    if args.command in ("promote", "rollback"):
        from hfbatch.flows.registry import run_command

        return run_command(args.command, getattr(args, "ref", None) or args.name, args.reason,
                           getattr(args, "to", None), args.store)
    if args.command == "prune-results":
        from hfbatch.tasks.batch.results import prune
        from hfbatch.tasks.core.settings import Settings
        from hfbatch.tasks.core.store import Store

        if not (args.unregistered or args.older_than is not None or args.max_size is not None):
            raise ConfigError("prune-results: say what to remove: --unregistered, --older-than DAYS or --max-size SIZE")
        older = None if args.older_than is None else args.older_than * 86400
        return prune(Store.open(Settings(), args.store), args.unregistered, older, args.max_size, args.dry_run)
    if args.command == "status":
        from hfbatch.flows.server import check_api, configured_api_url
        from hfbatch.flows.status import collect_status
        from hfbatch.tasks.core.errors import ServiceError
        from hfbatch.tasks.core.settings import Settings

        # without a Prefect API, the registry only: a server started just to read would take seconds
        settings, down = Settings(), None
        if configured_api_url():
            try:
                check_api(settings.api_timeout)
            except ServiceError as e:
                down = str(e)
        result = collect_status(settings, args.store, args.limit, runs=bool(configured_api_url()) and not down)
        return result | ({"runs_unavailable": down} if down else {})
    from hfbatch.flows import commands

    given = flow_arguments(args)
    if args.command != "infer":
        return commands.run(args.command, given)
    with _InferProgress(enabled=not args.json) as bar:
        return commands.run(args.command, given, bar.update)


@contextlib.contextmanager
def _stopped_by_signals():
    """SIGTERM stops a run as Ctrl-C does (KeyboardInterrupt): the flow run is marked, what is committed
    stays, and the process exits through its normal shutdown, which also stops the temporary Prefect
    server (a plain SIGTERM would leave that server running)."""
    def stop(signum, frame):
        raise KeyboardInterrupt(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _operate(args) -> dict:
    from hfbatch.flows.deploy import build_deployments, deploy_all, serve_deployments
    from hfbatch.tasks.core.settings import Settings

    overrides = {"alert_block": args.alert_block, "inference_deadline": args.inference_deadline}
    settings = Settings().with_overrides(**overrides)
    if args.command == "deploy":
        return {"deployed": True, "alerts": deploy_all(settings=settings)}
    params = {}
    for item in args.train_param:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--train-param takes KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    serve_deployments(build_deployments(args.name, args.model, args.watch, args.input, args.output, args.task,
                                        args.cron, args.watch_interval, args.store, params), settings)
    return {"served": True}


class _InferProgress:
    """A progress bar on stderr over the run's rows, advanced as shards finish (not in --json mode,
    nor when stderr is not a terminal, unless HFBATCH_PROGRESS=1)."""

    def __init__(self, enabled: bool):
        force = os.environ.get("HFBATCH_PROGRESS")
        self.enabled = enabled and (force != "0") and (force == "1" or sys.stderr.isatty())
        self.bar: Any = None

    def __enter__(self) -> _InferProgress:
        return self

    def update(self, event: dict) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event["rows"], unit="row", unit_scale=True, desc="hfbatch infer",
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.2)
            self.skipped = 0
        self.skipped += event["skipped"]
        self.bar.set_postfix_str(f"shards {event['done']}/{event['shards']}"
                                 + (f" ({self.skipped} already done)" if self.skipped else ""), refresh=False)
        self.bar.update(event["rows_done"] - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_human(command: str, result: dict) -> None:
    if command == "deploy":
        print("alerts: " + (", ".join(result["alerts"]) or "none (no notification block: see deployments/README.md)"))
    if command in ("serve", "deploy"):
        return
    if command == "push":
        print(f"{result['name']} v{result['version']} → {result['url']} ({result['files']} files)")
        return
    if command in ("promote", "rollback"):
        print(f"{result['name']}: champion v{result['champion']} (was v{result['previous']}); {result['action']} "
              f"by {result['by']}: {result['reason']}")
        return
    if command == "prune-results":
        verb = "would remove" if result["dry_run"] else "removed"
        for p in result["removed"]:
            print(f"{verb} {p.get('task', '?')} {p.get('model', p['key'])} {p.get('model_version', '')}: "
                  f"{p['bytes'] / 2**20:.1f} MiB ({p['reason']})")
        print(f"{verb} {len(result['removed'])} predictors' results ({result['bytes_removed'] / 2**20:.1f} MiB), "
              f"kept {len(result['kept'])} ({result['bytes_kept'] / 2**20:.1f} MiB)")
        return
    if command == "status":
        from hfbatch.flows.status import format_status

        print(format_status(result))
        return
    if command == "infer":
        print(f"{result['rows']} rows → {result['output']}: {result['rows_out']} predicted, "
              f"{result['quarantined']} quarantined, {result['shards_skipped']}/{result['shards']} shards "
              f"already done; {result['rows_per_s']} rows/s ({result['model']} {result['model_version']})")
        if result.get("rows_reused"):
            print(f"  {result['rows_reused']} rows reused from earlier runs, {result['rows_computed']} computed "
                  f"({result['seconds_saved']:.1f} s of compute saved)")
        if result.get("corrupt_files"):
            print(f"  {result['corrupt_files']} unreadable input file(s) set aside: see _quarantine/_files.parquet")
        if result.get("drifted"):
            print(f"  predictions drifted from the version's evaluation: {', '.join(result['drifted'])} "
                  f"(max PSI {result['max_psi']:.3f})")
        return
    if command == "train":
        status = "champion" if result["promoted"] else f"not promoted (champion: v{result['champion']})"
        print(f"{result['name']} v{result['version']}: {status}; {result['reason']}")
    for name, value in result["metrics"].items():
        low_high = result.get("intervals", {}).get(name)
        print(f"  {name:>10}: {value:.4f}" + (f"  [{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""))


if __name__ == "__main__":
    sys.exit(main())
