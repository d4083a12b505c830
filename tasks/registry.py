"""The model registry: numbered versions of a model name in the store, and a gated champion.

`models/<name>/registry.json` lists every version (run key, metrics, eval set, time) and the
promotion history; `models/<name>/<version>/` holds the version's files. `NAME` resolves to the
champion, `NAME@3` to version 3.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone

from .card import write_model_card
from .errors import ConfigError, ModelError
from .refs import EvalResult, TrainedModel
from .store import MARKER, Store

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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

    def exists(self) -> bool:
        return self.store.exists(self.index_key)

    def load(self) -> dict:
        if not self.exists():
            return {"name": self.name, "champion": None, "versions": [], "history": []}
        return self.store.read_json(self.index_key)

    def version_key(self, version: str) -> str:
        return f"models/{self.name}/{version}"

    def task(self, version: str) -> str:
        """The task a version was trained for (versions registered before tasks were recorded: text
        classification, the only one there was)."""
        entry = next(v for v in self.load()["versions"] if v["version"] == version)
        return entry.get("task", "text-classification")

    def champion(self) -> dict | None:
        index = self.load()
        return next((v for v in index["versions"] if v["version"] == index["champion"]), None)

    def resolve(self, version: str | None = None) -> str:
        """A version string: `version` if registered, else the champion."""
        index = self.load()
        if version is None:
            if index["champion"] is None:
                raise ModelError(f"model {self.name!r} has no champion yet")
            return index["champion"]
        if version not in {v["version"] for v in index["versions"]}:
            known = [v["version"] for v in index["versions"]]
            raise ModelError(f"model {self.name!r} has no version {version!r} (versions: {known})")
        return version

    def register(self, trained: TrainedModel, evaluation: EvalResult, metric: str = "accuracy",
                 margin: float = 0.0, champion_score: float | None = None, card_text: dict | None = None
                 ) -> Registration:
        """Add `trained` as the next version; promote it if it beats `champion_score` by `margin`.
        `card_text`: the task recipe's words for the model card (`Recipe.card_text`).

        `champion_score` must be the current champion's `metric` on the same eval set as
        `evaluation`. Registering the same training run again returns its existing version.
        """
        if metric not in evaluation.metrics:
            raise ConfigError(f"promotion metric {metric!r} was not computed (have {list(evaluation.metrics)})")
        index = self.load()
        existing = next((v for v in index["versions"] if v["run_key"] == trained.run_key), None)
        if existing:
            return self._registration(index, existing, "already registered")

        score = evaluation.metrics[metric]
        if index["champion"] is None:
            promoted, reason = True, "first version"
        elif champion_score is None:
            raise ConfigError("champion_score is required once a champion exists")
        else:
            promoted = score > champion_score + margin
            verb = "beats" if promoted else "does not beat"
            reason = (f"{metric} {score:.4f} {verb} champion v{index['champion']} {champion_score:.4f} "
                      f"+ margin {margin} on eval set {evaluation.dataset_fingerprint[:12]}")
        version = str(max((int(v["version"]) for v in index["versions"]), default=0) + 1)
        with self.store.staging(self.version_key(version), {"name": self.name, "version": version}) as tmp:
            shutil.copytree(self.store.local_dir(trained.key), tmp, dirs_exist_ok=True)
            (tmp / MARKER).unlink(missing_ok=True)
            write_model_card(tmp, trained, card_text, evaluation.metrics, self.name, version)
        now = datetime.now(timezone.utc).isoformat()
        entry = {"version": version, "run_key": trained.run_key, "task": trained.task, "created": now,
                 "metrics": evaluation.metrics,
                 "eval_dataset": evaluation.dataset_fingerprint, "base_model": trained.base_model,
                 "uri": self.store.uri(self.version_key(version)), "promoted": promoted, "reason": reason}
        index["versions"].append(entry)
        if promoted:
            index["history"].append({"time": now, "champion": version, "previous": index["champion"],
                                     "reason": reason})
            index["champion"] = version
        self.store.write_json(self.index_key, index)
        return self._registration(index, entry, reason)

    def _registration(self, index: dict, entry: dict, reason: str) -> Registration:
        return Registration(self.name, entry["version"], entry["uri"], entry["promoted"],
                            index["champion"], reason, entry["metrics"])
