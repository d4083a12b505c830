"""Publishing a registered version on the Hugging Face Hub (`hfbatch push`): its files, checked against the
sha256 digests registered with it, in one commit of `huggingface_hub`; the commit recorded in the registry."""
from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from hfbatch.tasks.core.errors import ConfigError, ModelError, ServiceError
from hfbatch.tasks.core.registry import Registry


def upload_plan(directory: Path, digests: dict[str, str]) -> list:
    """One `CommitOperationAdd` per registered file of a version (`directory`, its files fetched), each
    checked against its registered sha256 (what the Hub's LFS upload declares too)."""
    from huggingface_hub import CommitOperationAdd

    operations = []
    for name, sha in sorted(digests.items()):
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(directory) / name))
        if op.upload_info.sha256.hex() != sha:
            raise ModelError(f"{Path(directory) / name}: sha256 {op.upload_info.sha256.hex()} is not the one "
                             f"registered ({sha}); not pushed")
        operations.append(op)
    return operations


def push(registry: Registry, version: str, repo_id: str, private: bool = False, api=None) -> dict:
    """Upload `registry`'s `version` to the Hub model repository `repo_id` (created if missing, private if
    asked) in one commit, with `HF_TOKEN`; the commit goes into the version's registry entry and is returned.
    `api`: an `HfApi` (default: one with `HF_TOKEN`)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    version = registry.resolve(version)
    entry = next(v for v in registry.load()["versions"] if v["version"] == version)
    if not entry.get("files"):
        raise ModelError(f"model {registry.name} v{version} was registered without file digests: register it "
                         "again to push it")
    if api is None:
        token = os.environ.get("HF_TOKEN")
        if not token:
            raise ConfigError("hfbatch push needs a Hub token with write access in HF_TOKEN")
        api = HfApi(token=token)
    registry.verify_stored(version)
    directory = registry.store.local_dir(registry.version_key(version))
    operations = upload_plan(directory, entry["files"])
    where = f"https://huggingface.co/{repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo_id, operations, repo_type="model",
                                   commit_message=f"hfbatch: {registry.name} v{version}",
                                   commit_description=f"Registered as {registry.name} v{version} in "
                                                      f"{registry.store.url} (run {entry['run_key']}).")
    except OfflineModeIsEnabled as e:
        raise ServiceError(f"cannot push to {where}: HF_HUB_OFFLINE is set (unset it to reach the Hub)") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise ConfigError(f"the Hub refused the push to {where} (HTTP {status}): HF_TOKEN needs write "
                              "access to that repository") from e
        raise ServiceError(f"the Hub failed the push to {where}: {e}".splitlines()[0]) from e
    except OSError as e:  # the Hub unreachable (connection refused, DNS, timeout)
        raise ServiceError(f"cannot reach the Hub to push to {where}: {e}".splitlines()[0]) from e
    record = {"repo_id": repo_id, "commit": commit.oid, "url": commit.commit_url, "private": private,
              "files": len(operations), "time": datetime.now(UTC).isoformat()}
    registry.record_push(version, record)
    return {"name": registry.name, "version": version, **record}
