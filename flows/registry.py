"""`promote` and `rollback`: change a model's champion by hand, as small Prefect flows (so each change
shows in the UI with its parameters and logs).

Each records the change in the registry's history (who, why, the champion before), refuses a version
whose files no longer match their registered sha256, emits `hfbatch.model.promoted` and refreshes the
`<name>-champion` artifact. The next batch-inference run resolves `NAME` to the new champion when it
starts. `plan_promotion` / `plan_rollback` are the flows' checks, also run by the CLI before a flow starts.
"""
from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger

from hfbatch.tasks import artifacts, events
from hfbatch.tasks.core import hub
from hfbatch.tasks.core.errors import ConfigError, ModelError
from hfbatch.tasks.core.registry import ALIASES, Registry, aliases_of
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store


@dataclass(frozen=True)
class Plan:
    """A champion change to make: `version` becomes champion of `registry`'s name. `expected` is the
    champion the change was worked out from, when it depends on it (an alias, a rollback without a
    target): the change is refused if another one came first."""

    registry: Registry
    version: str
    champion: str | None
    expected: str | None


def parse_ref(ref: str) -> tuple[str, str]:
    """`NAME@VERSION` → (name, version); VERSION is a number or an alias."""
    name, sep, version = ref.partition("@")
    if not (sep and name and version):
        raise ConfigError(f"expected NAME@VERSION (VERSION: a number, {', '.join(ALIASES)}), got {ref!r}")
    return name, version


def plan_promotion(store: Store, name: str, version: str) -> Plan:
    """Check that `name`@`version` can become champion; raise the `HfbatchError` that says why not."""
    registry = registry_of(store, name)
    target = registry.resolve(version)
    return _checked(registry, target, "promote", expected=version in ALIASES)


def plan_rollback(store: Store, name: str, to: str | None = None) -> Plan:
    """Check the rollback of `name` to `to` (default: the champion the current one replaced)."""
    registry = registry_of(store, name)
    if to is None:
        target = aliases_of(registry.load())["previous"]
        if target is None:
            raise ModelError(f"model {name!r} has no earlier champion to roll back to (see its history with "
                             "hfbatch status); name a version with --to")
    else:
        target = registry.resolve(to)
    return _checked(registry, target, "roll back to", expected=to is None or to in ALIASES)


@flow(name="push", flow_run_name="push {name}@{version} to {repo_id}")
def push_flow(name: str, version: str, repo_id: str, private: bool = False, store: str | None = None) -> dict:
    """Upload `version` of the registered model `name` (its files, checked against their registered sha256,
    and its model card) to the Hub model repository `repo_id` with `HF_TOKEN`; the commit is recorded in the
    version's registry entry."""
    registry = registry_of(Store.open(Settings().with_overrides(store=store)), name)
    pushed = hub.push(registry, version, repo_id, private)
    get_run_logger().info("%s v%s pushed to %s (commit %s)", name, pushed["version"], pushed["url"], pushed["commit"])
    return pushed


def registry_of(store: Store, name: str) -> Registry:
    registry = Registry(store, name)
    if not registry.exists():
        raise ModelError(f"model {name!r} is not registered in {store.url} "
                         f"(registered: {Registry.names(store) or 'none'})")
    return registry


def _checked(registry: Registry, target: str, verb: str, expected: bool) -> Plan:
    champion = registry.load()["champion"]
    if target == champion:
        raise ModelError(f"model {registry.name!r}: v{target} is the champion already")
    try:
        registry.verify_stored(target)
    except ModelError as e:
        raise ModelError(f"refusing to {verb} v{target}: {e}") from e
    return Plan(registry, target, champion, champion if expected else None)


@flow(name="promote", flow_run_name="promote {name}@{version}")
def promote_flow(name: str, version: str, reason: str | None = None, store: str | None = None,
                 by: str | None = None) -> dict:
    """Make `version` of the registered model `name` its champion: a number, or `challenger` (the newest
    version registered after the champion and never promoted) or `previous` (the champion before).

    `reason` is recorded in the history with `by` (default: user@host of the process running the flow).
    """
    plan = plan_promotion(Store.open(Settings().with_overrides(store=store)), name, version)
    return _apply(plan, "promote", reason or "promoted by hand", by)


@flow(name="rollback", flow_run_name="rollback {name}")
def rollback_flow(name: str, reason: str, to: str | None = None, store: str | None = None,
                  by: str | None = None) -> dict:
    """Make an earlier version of `name` its champion again: `to`, or by default the champion the current
    one replaced (repeated rollbacks walk further back). `reason` is recorded in the history with `by`."""
    if not reason.strip():
        raise ConfigError("a rollback needs a reason (--reason): it is recorded in the history")
    plan = plan_rollback(Store.open(Settings().with_overrides(store=store)), name, to)
    return _apply(plan, "rollback", reason, by)


def run_command(command: str, target: str, reason: str | None, to: str | None, store: str | None) -> dict:
    """`hfbatch promote NAME@VERSION` / `hfbatch rollback NAME`: checked here first (the registry, the
    version, its files), then run as the flow of the same name, recorded as done by this user@host."""
    st = Store.open(Settings(), store)
    if command == "promote":
        name, version = parse_ref(target)
        plan_promotion(st, name, version)
        return promote_flow(name=name, version=version, reason=reason or "", store=store, by=events.operator())
    if not (reason or "").strip():
        raise ConfigError("--reason must say why: it is recorded in the history")
    plan_rollback(st, target, to)
    return rollback_flow(name=target, reason=reason or "", to=to, store=store, by=events.operator())


def _apply(plan: Plan, action: str, reason: str, by: str | None) -> dict:
    registry = plan.registry
    change = registry.set_champion(plan.version, action, reason, by or events.operator(), plan.expected)
    events.emit_promoted(registry.name, change)
    index = registry.load()
    artifacts.publish_champion_history(registry.name, index)
    artifacts.publish_dashboard(registry.name, index, registry.runs(), registry.store)
    get_run_logger().info("%s: %s v%s → champion v%s (%s, by %s)", registry.name, action, change["previous"],
                          change["champion"], reason, change["by"])
    return {"name": registry.name, "action": action, "champion": change["champion"], "previous": change["previous"],
            "reason": reason, "by": change["by"], "time": change["time"], "aliases": aliases_of(index),
            "store": registry.store.url}
