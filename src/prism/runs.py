"""The run directory: a manifest plus one append-only JSONL per stage, the single source of truth."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prism.errors import PrismError

# The gate comes last: it may learn from the adapter's own outcomes (gate_labels "adapter"), judged after distill.
STAGES = ["personas", "queries", "answers", "verify", "distill", "adapter_outcomes", "gate"]
FINISHED = ("done", "skipped")  # a stage's statuses that need no more work


# Stage outputs; verify writes per-order judgments, then one label per query.
FILES = {
    "personas": "personas.jsonl",
    "queries": "queries.jsonl",
    "answers": "answers.jsonl",
    "judgments": "judgments.jsonl",
    "labels": "labels.jsonl",
    "negatives": "negatives.jsonl",
    "adapter_answers": "adapter_answers.jsonl",  # adapter_outcomes: the adapter's own answers,
    "adapter_judgments": "adapter_judgments.jsonl",  # each judged against the plain answer,
    "adapter_labels": "adapter_labels.jsonl",  # and one label per query (persona_answer: the adapter's)
    "distill_log": "distill_log.jsonl",
}
MANIFEST = "manifest.json"
# The folders beside the records: the gate, the adapter (PEFT format, whose file names are PEFT's), the llama.cpp
# export and the evaluation.
GATE_DIR = "gate"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_DIR = "gguf"
EVAL_DIR = "eval"
# A k-way run (routing "kway") keeps the binary gate and adapter where a binary run has them, and adds a gate
# over base and each kept persona plus one PEFT adapter per kept persona (PEFT's multi-adapter layout).
KWAY_DIR = "kway"
KWAY_GATE = f"{KWAY_DIR}/gate"
KWAY_ADAPTERS = f"{KWAY_DIR}/adapters"


def gate_dir(routing: str) -> str:
    """The run-relative directory of a routing's gate ("binary" or "kway")."""
    return KWAY_GATE if routing == "kway" else GATE_DIR


def adapter_dir(run_path: Path, persona: str | None = None) -> Path:
    """The PEFT directory of the run's binary adapter, or of a k-way persona's adapter."""
    return run_path / (ADAPTER_DIR if persona is None else f"{KWAY_ADAPTERS}/{persona}")


def has_adapter_weights(directory: Path) -> bool:
    return (directory / ADAPTER_WEIGHTS).is_file()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- manifest ---------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise PrismError(f"{self.path} is not a PRISM run directory (no {MANIFEST})")
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise PrismError(f"{self.manifest_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest_path, manifest)

    def update_stage(self, stage: str, **info: Any) -> None:
        manifest = self.manifest()
        manifest["stages"].setdefault(stage, {}).update(info)
        self.save_manifest(manifest)

    def stage_status(self, stage: str) -> str:
        return self.manifest()["stages"].get(stage, {}).get("status", "pending")

    # -- records ----------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / FILES.get(name, f"{name}.jsonl")  # other names: eval caches and the like

    def read(self, name: str) -> list[dict[str, Any]]:
        """All records of a stage file. A torn last line (a run killed mid-write) is skipped, since its
        record was never complete; a corrupt line elsewhere is an error that names the line."""
        path = self.file(name)
        if not path.is_file():
            return []
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                is_torn_tail = number == len(lines) and not raw.endswith(b"\n")
                if is_torn_tail:
                    break
                raise PrismError(
                    f"{path}:{number} is not a valid JSON record ({exc}); fix or delete that line and re-run "
                    "to resume (the other records are kept)"
                ) from None
            records.append(record)
        return records

    def append(self, name: str, records: Iterable[dict[str, Any]]) -> None:
        """Append and flush to disk at once: what was produced survives a kill."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail(self.file(name))
        with self.file(name).open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    @staticmethod
    def _drop_torn_tail(path: Path) -> None:
        if not path.is_file():
            return
        raw = path.read_bytes()
        if not raw or raw.endswith(b"\n"):
            return
        tail = raw[raw.rfind(b"\n") + 1 :]
        try:
            json.loads(tail)
        except ValueError:  # incomplete record: read() skipped it, so remove it
            with path.open("r+b") as fh:
                fh.truncate(len(raw) - len(tail))
        else:  # complete record that only lost its newline: read() counted it, so keep it
            with path.open("ab") as fh:
                fh.write(b"\n")

    def rewrite(self, name: str, records: Iterable[dict[str, Any]]) -> None:
        path = self.file(name)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)


def move_aside(path: Path) -> Path:
    """Rename `path` to `<name>.replaced-<time>` (with a counter when that exists) instead of deleting it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.replaced-{stamp}")
    count = 1
    while aside.exists():
        count += 1
        aside = path.with_name(f"{path.name}.replaced-{stamp}-{count}")
    path.rename(aside)
    return aside


# What the verify stage and the stages after it write: a run that changes its judge sets these aside.
ADAPTER_OUTCOMES = (FILES["adapter_answers"], FILES["adapter_judgments"], FILES["adapter_labels"])
JUDGED_OUTPUTS = (FILES["judgments"], FILES["labels"], FILES["distill_log"], GATE_DIR, ADAPTER_DIR, KWAY_DIR,
                  EXPORT_DIR, EVAL_DIR, *ADAPTER_OUTCOMES)


def set_aside(root: Path, names: Iterable[str]) -> Path | None:
    """Move the named files and folders of `root` that exist into one new folder `root/replaced-<time>/`
    (nothing is deleted); the folder, or None when none of them existed."""
    present = [name for name in names if (root / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, count = root / f"replaced-{stamp}", 1
    while folder.exists():
        count += 1
        folder = root / f"replaced-{stamp}-{count}"
    folder.mkdir()
    for name in present:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)  # a nested name (kway/gate) keeps its path
        (root / name).rename(folder / name)
    return folder


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

