"""The model registry: numbered versions of a model name in the store, and a gated champion.

`models/<name>/registry.json` lists every version (run key, metrics, eval set, time) and the
promotion history; `models/<name>/<version>/` holds the version's files. `NAME` resolves to the
champion, `NAME@3` to version 3, and `NAME@champion`, `NAME@challenger`, `NAME@previous` to the
versions those aliases name (`aliases_of`).
"""
from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hfbatch.tasks.core.card import write_model_card
from hfbatch.tasks.core.errors import ConfigError, ModelError
from hfbatch.tasks.core.fingerprint import file_sha256
from hfbatch.tasks.core.refs import EvalResult, TrainedModel
from hfbatch.tasks.core.store import MARKER, Store
from hfbatch.tasks.metrics import paired

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RUNS_KEPT = 50
"""Batch-inference runs kept per model name (the dashboard and `hfbatch status` show the last ones)."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    uri: str
    promoted: bool
    champion: str
    reason: str
    metrics: dict


class Registry:
    def __init__(self, store: Store, name: str):
        if not self.valid_name(name):
            raise ConfigError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-'")
        self.store, self.name = store, name
        self.index_key = f"models/{name}/registry.json"

    @staticmethod
    def valid_name(name: str) -> bool:
        return bool(NAME_RE.match(name))

    @staticmethod
    def names(store: Store) -> list[str]:
        """The model names registered in `store`."""
        return [n for n in store.list("models") if Registry.valid_name(n) and Registry(store, n).exists()]

    def exists(self) -> bool:
        return self.store.exists(self.index_key)

    def load(self) -> dict:
        if not self.exists():
            return {"name": self.name, "champion": None, "versions": [], "history": []}
        try:
            index = self.store.read_json(self.index_key)
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            raise ConfigError(f"registry file {self.store.uri(self.index_key)} is damaged (not JSON: {e}); restore "
                              "it from a backup or remove it to start the name afresh") from e
        if not (isinstance(index, dict) and isinstance(index.get("versions"), list)
                and all(isinstance(v, dict) and "version" in v for v in index["versions"])):
            raise ConfigError(f"registry file {self.store.uri(self.index_key)} is damaged (no list of versions); "
                              "restore it from a backup or remove it to start the name afresh")
        return index

    def version_key(self, version: str) -> str:
        return f"models/{self.name}/{version}"

    def task(self, version: str) -> str:
        """The task a version was trained for (versions registered before tasks were recorded: text
        classification, the only one there was)."""
        entry = next(v for v in self.load()["versions"] if v["version"] == version)
        return entry.get("task", "text-classification")

    def entry(self, version: str) -> dict:
        """The registry entry of `version` (a number or an alias)."""
        version = self.resolve(version)
        return next(v for v in self.load()["versions"] if v["version"] == version)

    def champion(self) -> dict | None:
        index = self.load()
        return next((v for v in index["versions"] if v["version"] == index["champion"]), None)

    def resolve(self, version: str | None = None) -> str:
        """A version string: `version` if registered (a number, or an alias: `champion`, `challenger`,
        `previous`), else the champion."""
        index = self.load()
        if version is None or version == "champion":
            if index["champion"] is None:
                raise ModelError(f"model {self.name!r} has no champion yet")
            return index["champion"]
        if version in ALIASES:
            found = aliases_of(index)[version]
            if found is None:
                raise ModelError(f"model {self.name!r} has no {version} ({ALIASES[version]})")
            return found
        if version not in {v["version"] for v in index["versions"]}:
            known = [v["version"] for v in index["versions"]]
            raise ModelError(f"model {self.name!r} has no version {version!r} (versions: {known})")
        return version

    def register(self, trained: TrainedModel, evaluation: EvalResult, metric: str = "accuracy",
                 margin: float = 0.0, champion: EvalResult | None = None, card_text: dict | None = None,
                 problem: str | None = None) -> Registration:
        """Add `trained` as the next version; promote it if it beats the champion by more than `margin` on
        the evidence (`_gate`).

        `champion` must be the current champion's evaluation on the same eval set as `evaluation`;
        `problem` says why the model must not be promoted whatever it scores (a degenerate model);
        `card_text` is the task recipe's words for the model card. Registering the same training
        run again returns its existing version. Safe against concurrent registrations of the same name
        (each gets its own version): the version number is claimed first, then the index is updated
        without losing another writer's update (`Store.update_json`).
        """
        if metric not in evaluation.metrics:
            raise ConfigError(f"promotion metric {metric!r} was not computed (have {list(evaluation.metrics)})")
        existing = self._entry(self.load(), trained.run_key)
        if existing:
            return self._registration(self.load(), existing, "already registered")
        version = self._claim_version()
        with self.store.staging(self.version_key(version), {"name": self.name, "version": version}) as tmp:
            shutil.copytree(self.store.local_dir(trained.key), tmp, dirs_exist_ok=True)
            (tmp / MARKER).unlink(missing_ok=True)
            write_model_card(tmp, trained, card_text, evaluation.metrics, self.name, version, evaluation.intervals)
            files = file_digests(tmp)
        seen_champion = self.load()["champion"]
        result: dict[str, Any] = {}

        def add(index: dict | None) -> dict:
            index = index or {"name": self.name, "champion": None, "versions": [], "history": []}
            result.clear()
            if self._entry(index, trained.run_key):  # the same run, registered meanwhile by another process
                result["entry"], result["reason"] = self._entry(index, trained.run_key), "already registered"
                return index
            promoted, reason = self._gate(index, seen_champion, evaluation, metric, margin, champion, problem)
            now = datetime.now(UTC).isoformat()
            entry = {"version": version, "run_key": trained.run_key, "task": trained.task, "created": now,
                     "metrics": evaluation.metrics, "intervals": evaluation.intervals,
                     "eval_dataset": evaluation.dataset_fingerprint, "eval_key": evaluation.key,
                     "base_model": trained.base_model, "uri": self.store.uri(self.version_key(version)),
                     **({"prompt": trained.prompt} if trained.prompt else {}),
                     **({"tracker": trained.tracker} if trained.tracker else {}),
                     **({"parent": trained.parent} if trained.parent else {}),
                     "promoted": promoted, "reason": reason, "files": files,
                     "reference": evaluation.details.get("reference_figures")}
            index = {**index, "versions": [*index["versions"], entry]}
            if promoted:
                index["history"] = [*index["history"], {"time": now, "champion": version,
                                                        "previous": index["champion"], "reason": reason}]
                index["champion"] = version
            result["entry"], result["reason"] = entry, reason
            return index

        index = self.store.update_json(self.index_key, add)
        if result["entry"]["version"] != version:  # lost the race to register this very run: drop the copy
            self.store.remove(self.version_key(version))
        return self._registration(index, result["entry"], result["reason"])

    @property
    def runs_key(self) -> str:
        return f"models/{self.name}/inference_runs.json"

    def record_run(self, run: dict, keep: int = RUNS_KEPT) -> list[dict]:
        """Add a batch-inference run's record (`monitoring.run_record`) to the last `keep` runs of this
        name, replacing one with its `id` (the same flow run, retried); returns them, oldest first."""
        return self.store.update_json(self.runs_key, lambda runs: [*(r for r in runs or [] if r["id"] != run["id"]),
                                                                   run][-keep:])

    def runs(self) -> list[dict]:
        """The recorded batch-inference runs, oldest first."""
        return self.store.read_json(self.runs_key) if self.store.exists(self.runs_key) else []

    def reference(self, version: str) -> dict | None:
        """The prediction figures recorded when `version` was evaluated (None: registered before
        references were recorded, or a task without figures)."""
        entry = next((v for v in self.load()["versions"] if v["version"] == version), None)
        return entry and entry.get("reference")

    def _claim_version(self) -> str:
        """The next free version number, claimed atomically (`_claims/<version>.json`), so two concurrent
        registrations never write the same version directory."""
        taken = [int(v["version"]) for v in self.load()["versions"]]
        taken += [int(n.split(".")[0]) for n in self.store.list(f"models/{self.name}/_claims")]
        version = max(taken, default=0) + 1
        while not self.store.create_json(f"models/{self.name}/_claims/{version}.json", {"version": str(version)}):
            version += 1
        return str(version)

    @staticmethod
    def _entry(index: dict, run_key: str) -> dict | None:
        return next((v for v in index["versions"] if v["run_key"] == run_key), None)

    def _gate(self, index: dict, seen_champion: str | None, evaluation: EvalResult, metric: str, margin: float,
              champion_eval: EvalResult | None, problem: str | None) -> tuple[bool, str]:
        """Whether the new version becomes champion, and why: where both evaluations kept the metric's row
        statistics, only when the lower bound of the 95 % paired bootstrap interval of the difference is above
        `margin`; else (a custom metric, a version evaluated before rows were kept) on the point estimates."""
        score = evaluation.metrics[metric]
        if problem:
            return False, f"not promoted: {problem}"
        champion = next((v for v in index["versions"] if v["version"] == index["champion"]), None)
        if champion is None:
            return True, "first version"
        if index["champion"] != seen_champion or champion_eval is None:
            # the champion changed while this version trained: compare with it only on the same eval set
            if champion["eval_dataset"] != evaluation.dataset_fingerprint or metric not in champion["metrics"]:
                return False, (f"not promoted: champion v{champion['version']} was measured on another eval set; "
                               "evaluate both on one set and promote by hand")
            champion_key, champion_score = champion.get("eval_key"), champion["metrics"][metric]
        else:
            champion_key, champion_score = champion_eval.key, champion_eval.metrics[metric]
        mine = paired.stored_rows(self.store, evaluation.key).get(metric)
        theirs = paired.stored_rows(self.store, champion_key).get(metric) if champion_key else None
        against = f"champion v{champion['version']}"
        if mine and theirs and len(mine["stats"]) == len(theirs["stats"]):
            difference, low, high = paired.paired_difference(metric, mine, theirs)
            promoted = low > margin
            return promoted, (f"{'promoted' if promoted else 'not promoted'}: {metric} {difference:+.4f} "
                              f"[{low:+.4f}, {high:+.4f}] against {against} ({score:.4f} vs {champion_score:.4f}; "
                              f"{paired.CONFIDENCE:.0%} interval of the difference, {paired.RESAMPLES} paired "
                              f"resamples of {len(mine['stats'])} eval rows); its lower bound is "
                              f"{'above' if promoted else 'not above'} the margin {margin}")
        promoted = score > champion_score + margin
        verb = "beats" if promoted else "does not beat"
        return promoted, (f"{'promoted' if promoted else 'not promoted'}: {metric} {score:.4f} {verb} {against} "
                          f"{champion_score:.4f} + margin {margin} on eval set {evaluation.dataset_fingerprint[:12]} "
                          "(point estimates: no row statistics of this metric for both)")

    def record_push(self, version: str, record: dict) -> None:
        """Add a Hub upload of `version` (`core.hub.push`: repository, commit) to its registry entry."""

        def add(index: dict | None) -> dict:
            if index is None:
                raise ModelError(f"model {self.name!r} is not registered in {self.store.url}")
            versions = [{**v, "hub": [*v.get("hub", []), record]} if v["version"] == version else v
                        for v in index["versions"]]
            return {**index, "versions": versions}

        self.store.update_json(self.index_key, add)

    def verify(self, version: str, directory: Path) -> dict[str, str] | None:
        """Check the files of `version` (fetched to `directory`) against the sha256 digests registered
        with it: a corrupted or replaced file is a `ModelError`, not a silently different model.
        Returns the digests it found (`file_digests`), None for a version registered without them."""
        entry = next(v for v in self.load()["versions"] if v["version"] == version)
        expected = entry.get("files")
        if expected is None:  # registered before digests were recorded
            return None
        found = file_digests(directory)
        bad = sorted(n for n in expected if found.get(n) != expected[n])
        if bad:
            raise ModelError(f"model {self.name} v{version}: {', '.join(bad)} in "
                             f"{self.store.uri(self.version_key(version))} do not match the sha256 recorded at "
                             "registration (corrupted or replaced)")
        return found

    def verify_stored(self, version: str) -> None:
        """`verify` the files of `version` as they are in the store now (a remote store's files are
        fetched afresh, not taken from the local cache, which would hide a corruption since)."""
        key = self.version_key(version)
        if not self.store.is_complete(key):
            raise ModelError(f"model {self.name} v{version}: {self.store.uri(key)} is missing or incomplete")
        if self.store.is_local:
            self.verify(version, Path(self.store.path(key)))
            return
        with tempfile.TemporaryDirectory(prefix="hfbatch-verify-") as tmp:
            self.store.fs.get(self.store.path(key) + "/", tmp + "/", recursive=True)
            self.verify(version, Path(tmp))

    def set_champion(self, version: str, action: str, reason: str, by: str,
                     expected_champion: str | None = None) -> dict:
        """Make the registered `version` the champion by hand (`action`: promote or rollback) and record
        it in the history; returns the history entry. With `expected_champion`, refuse if the champion
        is no longer that one (another promotion came first). Updated through `Store.update_json`, so a
        concurrent registration or promotion is never lost."""
        entry: dict = {}

        def change(index: dict | None) -> dict:
            if index is None:
                raise ModelError(f"model {self.name!r} is not registered in {self.store.url}")
            if version not in {v["version"] for v in index["versions"]}:
                raise ModelError(f"model {self.name!r} has no version {version!r}")
            if expected_champion is not None and index["champion"] != expected_champion:
                raise ModelError(f"model {self.name!r}: the champion changed meanwhile (now v{index['champion']}, "
                                 f"was v{expected_champion}); look again and retry")
            if index["champion"] == version:
                raise ModelError(f"model {self.name!r}: v{version} is the champion already")
            entry.clear()
            entry.update(time=datetime.now(UTC).isoformat(), champion=version,
                         previous=index["champion"], reason=reason, action=action, by=by)
            return {**index, "champion": version, "history": [*index["history"], dict(entry)]}

        self.store.update_json(self.index_key, change)
        return entry

    def _registration(self, index: dict, entry: dict, reason: str) -> Registration:
        return Registration(self.name, entry["version"], entry["uri"], entry["promoted"],
                            index["champion"], reason, entry["metrics"])


ALIASES = {"champion": "the version in use",
           "challenger": "no version registered after the champion that was never promoted",
           "previous": "no champion before the current one to go back to"}


def champion_line(index: dict) -> list[str]:
    """The champions that led to the current one, oldest first: each promotion adds its version, a
    rollback goes back to the version it names and drops those after it. The last is the champion,
    the one before it is `previous` (where a rollback without a target goes), so repeated rollbacks
    walk further back instead of flipping between two versions."""
    line: list[str] = []
    for h in index["history"]:
        if h.get("action") == "rollback" and h["champion"] in line:
            del line[len(line) - line[::-1].index(h["champion"]):]
        else:
            line.append(h["champion"])
    return line


def aliases_of(index: dict) -> dict[str, str | None]:
    """`champion`, `challenger` (the newest version registered after the champion that was never
    champion) and `previous` (the champion the current one replaced, see `champion_line`)."""
    champion = index["champion"]
    line = champion_line(index)
    ever = {h["champion"] for h in index["history"]}
    newer = [v["version"] for v in index["versions"]
             if champion is not None and int(v["version"]) > int(champion) and v["version"] not in ever]
    return {"champion": champion, "challenger": max(newer, key=int, default=None),
            "previous": line[-2] if len(line) >= 2 and line[-1] == champion else None}


def file_digests(directory: Path) -> dict[str, str]:
    """`{relative path: sha256}` of the files of a model directory (its marker aside)."""
    digests = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.name != MARKER:
            digests[path.relative_to(directory).as_posix()] = file_sha256(path)
    return digests
