"""Prompts out of a log: a `prism serve --request-log FILE --log-prompts` file, OpenAI-format chat records
(`messages`: the last user turn is the prompt, as the gate reads it), a JSONL or CSV file with a prompt column,
or plain text with one prompt per line. Records without a prompt, and failed requests, are counted and
skipped; personal data (emails, phone and other long numbers) is masked as the prompts are read."""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism.config import DEFAULT_SEED
from prism.errors import PrismError

PROMPT_FIELDS = ("prompt", "query", "question", "text", "goal", "content", "input")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
NUMBER = re.compile(r"\+?\(?\d[\d ().-]{6,}\d")  # a phone number, a card or account number, an ID
NUMBER_DIGITS = 9  # what a masked number has at least: dates and years stay


@dataclass
class LoggedPrompt:
    text: str
    label: str | None = None  # the log's own intent label, when it has one (to score the clusters)


@dataclass
class PromptLog:
    prompts: list[LoggedPrompt]
    records: int = 0  # records read
    skipped: dict[str, int] = field(default_factory=dict)  # why records gave no prompt -> how many
    sampled_from: int = 0  # prompts found before --max-prompts sampled them


def scrub(text: str) -> str:
    """Emails and numbers of 9 digits or more masked (phone, card, account and ID numbers)."""
    text = EMAIL.sub("[email]", text)
    return NUMBER.sub(lambda m: "[number]" if sum(c.isdigit() for c in m.group()) >= NUMBER_DIGITS else m.group(),
                      text)


def read_prompts(path: str | Path, *, max_prompts: int | None = None, scrub_pii: bool = True,
                 seed: int = DEFAULT_SEED) -> PromptLog:
    """The log's prompts, at most `max_prompts` of them (a uniform sample, so memory holds that many whatever
    the log's size)."""
    path = Path(path)
    if not path.is_file():
        raise PrismError(f"no log file at {path}: pass a --request-log file, or a JSONL, CSV or text file of prompts")
    log = PromptLog(prompts=[])
    rng = random.Random(seed)
    for item in _records(path, log):
        if isinstance(item, str):  # a reason to skip
            log.skipped[item] = log.skipped.get(item, 0) + 1
            continue
        prompt = LoggedPrompt(scrub(item.text) if scrub_pii else item.text, item.label)
        log.sampled_from += 1
        if max_prompts is None or len(log.prompts) < max_prompts:
            log.prompts.append(prompt)
        else:  # reservoir sampling
            slot = rng.randrange(log.sampled_from)
            if slot < max_prompts:
                log.prompts[slot] = prompt
    if not log.prompts:
        why = ", ".join(f"{n} {reason}" for reason, n in log.skipped.items()) or "the file is empty"
        raise PrismError(f"{path} holds no prompt ({log.records} records: {why}); prism discover reads a "
                         "--request-log written with --log-prompts, chat records with `messages`, JSONL or CSV with "
                         f"a column named one of {', '.join(PROMPT_FIELDS)}, or text with one prompt per line")
    return log


def _records(path: Path, log: PromptLog) -> Iterator[LoggedPrompt | str]:
    with path.open("rb") as handle:
        head = handle.read(4096)
    if b"\x00" in head:
        raise PrismError(f"{path} is binary, not a log: give a JSONL, CSV or text file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not only a character cut at the 4096-byte boundary
            raise PrismError(f"{path} is not UTF-8 text (byte {exc.start}): give a JSONL, CSV or text file") from None
    text_head = head.decode("utf-8", errors="ignore").lstrip()
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        if path.suffix.lower() == ".csv":
            yield from _csv_records(handle, path, log)
        elif path.suffix.lower() in (".jsonl", ".json", ".ndjson") or text_head.startswith("{"):
            yield from _json_records(handle, log)
        else:
            for line in handle:
                log.records += 1
                yield LoggedPrompt(line.strip()) if line.strip() else "blank lines"


def _json_records(handle: io.TextIOBase, log: PromptLog) -> Iterator[LoggedPrompt | str]:
    for line in handle:
        if not line.strip():
            continue
        log.records += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            yield "lines that are not JSON"
            continue
        if not isinstance(record, dict):
            yield "records that are not JSON objects"
            continue
        if _failed(record):
            yield "failed requests"
            continue
        text = _prompt_of(record)
        yield LoggedPrompt(text, _label(record)) if text else "records without a prompt"


def _csv_records(handle: io.TextIOBase, path: Path, log: PromptLog) -> Iterator[LoggedPrompt | str]:
    reader = csv.DictReader(handle)
    columns = {name.strip().lower(): name for name in reader.fieldnames or []}
    column = next((columns[f] for f in PROMPT_FIELDS if f in columns), None)
    if column is None:
        raise PrismError(f"{path} has no prompt column (its columns: {', '.join(reader.fieldnames or []) or 'none'}): "
                         f"name it one of {', '.join(PROMPT_FIELDS)}")
    label = columns.get("label")
    for row in reader:
        log.records += 1
        text = (row.get(column) or "").strip()
        yield LoggedPrompt(text, (row.get(label) or None) if label else None) if text else "rows without a prompt"


def _failed(record: dict[str, Any]) -> bool:
    status = record.get("status")
    return (isinstance(status, int) and status >= 400) or (isinstance(status, str) and status not in ("ok", "200"))


def _prompt_of(record: dict[str, Any]) -> str | None:
    messages = record.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        text = users[-1] if users else None
        if isinstance(text, list):  # OpenAI content parts
            text = " ".join(part.get("text", "") for part in text if isinstance(part, dict))
        return text.strip() if isinstance(text, str) and text.strip() else None
    for name in PROMPT_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _label(record: dict[str, Any]) -> str | None:
    label = record.get("label")
    return None if label is None else str(label)
