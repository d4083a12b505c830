"""The `watch_data` flow: emit `hfbatch.dataset.updated` when files under a data prefix appear or change."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from hfbatch.tasks import watch
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store


@flow(name="watch_data")
def watch_data(prefix: str, store: str | None = None) -> dict:
    """Look at the data files under `prefix` (a local directory or `s3://` prefix); when some are new or
    changed since the last look, emit a Prefect event `hfbatch.dataset.updated` (payload: the prefix,
    its content fingerprint and the changed files), then remember the new state in `store`, so the
    same content never triggers twice. Removed files alone do not trigger a retraining."""
    logger = get_run_logger()
    settings = Settings()
    st = Store.open(settings, store)
    files = watch.scan(prefix, settings.storage_options(prefix))
    change = watch.changes(st, prefix, files)
    change["emitted"] = bool(change["added"] or change["changed"])
    if change["emitted"]:
        emit_event(watch.EVENT, id=watch.event_id(change),
                   resource={"prefect.resource.id": watch.resource_id(prefix),
                             "prefect.resource.name": prefix},
                   payload={k: change[k] for k in ("prefix", "fingerprint", "files", "added", "changed")})
        logger.info("%s: %d new, %d changed file(s): emitted %s", prefix, len(change["added"]),
                    len(change["changed"]), watch.EVENT)
    else:
        logger.info("%s: no new or changed files (%d files)", prefix, len(files))
    watch.record(st, prefix, files)
    create_markdown_artifact(key="watch-data", description=f"Changes under {prefix}",
                             markdown=_markdown(change))
    return change


def _markdown(change: dict) -> str:
    lines = [f"# {change['prefix']}", "", f"- files: {change['files']}, content `{change['fingerprint'][:16]}`",
             f"- event emitted: **{change['emitted']}**"]
    for kind in ("added", "changed", "removed"):
        lines += [f"- {kind}: " + (", ".join(f"`{f}`" for f in change[kind]) or "none")]
    return "\n".join(lines) + "\n"
