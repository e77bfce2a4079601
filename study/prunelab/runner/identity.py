"""A run's identity: what its configuration hash covers, and when a finished run is reused.

A study's results are identified by a ``RunIdentity``: the study's settings, the model's weights,
the evaluated items, the calibration text and the code. Its ``config()`` is the document a run
records (``manifest.json`` ``config``, the work folder's ``config.json``) and ``digest`` its hash
(``config_hash`` in the manifest, the last part of the run folder's name). The runner decides here

* whether this configuration already finished (``finished_run``: reused unless ``--rerun``);
* whether another finished run, or the work folder, holds the same settings computed by other code
  or with another calibration text (``same_settings``, ``run_of_other_code``): computed again, and
  said so.

The report only reads what the runner recorded (``config_hash``, ``config``); it hashes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from prunelab.evaluate.run import PreparedTask
from prunelab.model.loading import source_fingerprint
from prunelab.records import json_digest
from prunelab.runner.studyfile import Study
from prunelab.versions import code_version


@dataclass(frozen=True)
class RunIdentity:
    """What identifies a run's results; ``config()`` is hashed, field by field, in this order.

    To add a field (e.g. the installed plugins' distributions and versions, issue #25): add it
    here, fill it in ``identify``, and name it in ``CODE_FIELDS`` when a change of it means "the
    same study run by other code" (computed again, with a message) rather than "another study"
    (a work folder of the other one is refused). A new field changes every configuration hash, so
    no finished run of older code is reused by mistake.
    """

    settings: dict[str, Any]  # ``Study.settings``: model, device, dtype, seeds, evaluation, strategies, ...
    model_hash: str  # the weights' fingerprint (``prunelab.model.loading.source_fingerprint``)
    data: dict[str, str]  # per task: a digest of the evaluated items (ids, groups, payloads)
    calibration_text: str | None  # a local calibration file's SHA-256, a Hub source's name, or None
    code: dict[str, str | None]  # prunelab's version and git commit (``prunelab.versions.code_version``)

    #: The fields that tell "the same settings, other code" from "other settings".
    CODE_FIELDS: ClassVar[tuple[str, ...]] = ("code", "calibration_text")

    def config(self) -> dict[str, Any]:
        """The recorded configuration: the settings' keys, then the other fields."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        return {**self.settings, **fields}

    @property
    def digest(self) -> str:
        """The configuration hash (``json_digest`` of ``config()``)."""
        return json_digest(self.config())


def identify(study: Study, tasks: list[PreparedTask]) -> RunIdentity:
    """The identity of a study's results: its settings, the model's weights and the evaluated items."""
    return RunIdentity(settings=study.settings, model_hash=source_fingerprint(study.model),
                       data={task.evaluator.name: items_digest(task) for task in tasks},
                       calibration_text=calibration_fingerprint(study.calibration), code=code_version())


def items_digest(task: PreparedTask) -> str:
    """16 hex digits of SHA-256 over the task's items (id, group, payload), in order."""
    digest = hashlib.sha256()
    for item in task.items:
        digest.update(json.dumps([item.id, item.group, item.data], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def calibration_fingerprint(calibration: dict[str, Any] | None) -> str | None:
    """SHA-256 of a local calibration file's bytes (an edited file is another configuration); a Hub
    source by name (its text is fixed by the dataset revision the loader pins)."""
    source = (calibration or {}).get("source")
    if not source:
        return None
    path = Path(source)
    if not path.is_file():
        return f"hub:{source}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def settings_digest(config: Mapping[str, Any]) -> str:
    """The hash of a recorded configuration without its ``CODE_FIELDS``: equal for the same settings."""
    return json_digest({k: v for k, v in config.items() if k not in RunIdentity.CODE_FIELDS})


def same_settings(stored: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether two recorded configurations differ at most in the code or the calibration text."""
    return settings_digest(stored) == settings_digest(config)


def finished_run(study_dir: Path, digest: str) -> Path | None:
    """The newest finished run folder of this configuration, if any."""
    for folder in sorted(study_dir.glob(f"*-{digest[:8]}"), reverse=True):
        try:
            if json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("config_hash") == digest:
                return folder
        except (OSError, ValueError):
            continue
    return None


def run_of_other_code(study_dir: Path, config: Mapping[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The newest finished run with these settings, model and items but another prunelab version or
    commit (or calibration text): its folder and the code it recorded."""
    wanted = settings_digest(config)
    for manifest_path in sorted(study_dir.glob("*/manifest.json"), reverse=True):
        try:
            stored = json.loads(manifest_path.read_text(encoding="utf-8")).get("config") or {}
        except (OSError, ValueError):
            continue
        if settings_digest(stored) == wanted:
            return manifest_path.parent, stored.get("code") or {}
    return None
