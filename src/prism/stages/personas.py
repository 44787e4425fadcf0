"""Stage 1: one expert persona per domain, written by the model (or read from the user's file)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from prism.engines.base import Prompt
from prism.errors import PrismError
from prism.stages.context import StageContext, derive_seed

log = logging.getLogger("prism")

PERSONA_REQUEST = (
    "Write a system prompt that turns an AI assistant into a world-class expert in {domain}. "
    "Describe the expert's background and how they answer, in 2-3 sentences."
)
# Starting the reply for the model keeps small models on task: they continue a second-person description.
PERSONA_PREFIX = "You are"
MIN_CHARS, MAX_CHARS = 40, 1500


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "domain"


def clean_persona(continuation: str) -> str:
    """The generated continuation after 'You are', cut to its first paragraph and whole sentences."""
    text = (PERSONA_PREFIX + " " + continuation.strip()).strip()
    text = re.split(r"\n\s*\n", text)[0]
    text = re.sub(r"\s+", " ", text).strip().strip('"')
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS]
    sentences = re.findall(r".*?[.!?](?:\s|$)", text)
    if sentences:  # drop a sentence cut off by the token limit
        text = "".join(sentences).strip()
    return text


def persona_problem(text: str) -> str | None:
    """Why a persona is unusable, or None when it is fine."""
    if len(text) < MIN_CHARS:
        return f"too short ({len(text)} chars)"
    if len(text) > MAX_CHARS:
        return f"too long ({len(text)} chars)"
    words = text.lower().split()
    if len(set(words)) < 0.4 * len(words):
        return "repetitive"
    return None


def fallback_persona(domain: str) -> str:
    return (
        f"You are a world-class expert in {domain}. You answer precisely and concretely, structure your answers "
        "clearly, and say so when something is outside what you know."
    )


def load_personas_file(path: str | Path) -> list[dict[str, str]]:
    """User-written personas: a JSON/YAML mapping {domain: persona}, or a JSON list / JSONL of
    {"domain": ..., "persona": ...} objects."""
    path = Path(path)
    if not path.is_file():
        raise PrismError(f"personas file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = yaml.safe_load(text)  # YAML is a superset of JSON
    except (ValueError, yaml.YAMLError) as exc:
        raise PrismError(f"personas file {path} cannot be parsed: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict):
        data = [{"domain": k, "persona": v} for k, v in data.items()]
    if not isinstance(data, list) or not data:
        raise PrismError(f"personas file {path} must hold a mapping domain: persona or a list of objects")
    personas = []
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict) or not str(item.get("domain", "")).strip() or not str(
            item.get("persona", "")
        ).strip():
            raise PrismError(f"personas file {path}, entry {number}: needs non-empty 'domain' and 'persona'")
        personas.append({"domain": str(item["domain"]).strip(), "persona": str(item["persona"]).strip()})
    if len({p["domain"].lower() for p in personas}) != len(personas):
        raise PrismError(f"personas file {path} names a domain twice")
    return personas


def run(ctx: StageContext) -> None:
    cfg, run_dir = ctx.config, ctx.run
    done = {r["domain"] for r in run_dir.read("personas")}
    if cfg.personas_file:
        items = load_personas_file(cfg.personas_file)
        run_dir.append("personas", [
            {"id": slug(p["domain"]), "domain": p["domain"], "persona": p["persona"], "source": "user"}
            for p in items if p["domain"] not in done
        ])
        return
    given = {d.lower(): text for d, text in cfg.domain_personas.items()}
    run_dir.append("personas", [{"id": slug(d), "domain": d, "persona": given[d.lower()].strip(), "source": "config"}
                                for d in cfg.domains if d not in done and d.lower() in given])
    pending = [d for d in cfg.domains if d not in done and d.lower() not in given]
    for attempt in range(cfg.persona_attempts):
        if not pending:
            return
        prompts = [Prompt(PERSONA_REQUEST.format(domain=d), assistant_prefix=PERSONA_PREFIX) for d in pending]
        still_pending = set()
        for indices, outputs in ctx.generator.generate(
            prompts, max_new_tokens=cfg.persona_max_tokens, temperature=0.7,
            seeds=[derive_seed(cfg.seed, "personas", domain, attempt) for domain in pending], batch_size=cfg.batch_size,
            desc=f"personas (try {attempt + 1})",
        ):
            records = []
            for i, out in zip(indices, outputs):
                persona = clean_persona(out.text)
                problem = persona_problem(persona)
                if problem:
                    still_pending.add(pending[i])
                    log.info("persona for %r unusable (%s), retrying", pending[i], problem)
                    continue
                records.append({"id": slug(pending[i]), "domain": pending[i], "persona": persona,
                                "source": "generated", "attempt": attempt, "raw": out.text})
            run_dir.append("personas", records)
        pending = [d for d in pending if d in still_pending]
    if pending:
        log.warning("no usable persona after %d tries for %s: using a template persona", cfg.persona_attempts,
                    ", ".join(pending))
        run_dir.append("personas", [
            {"id": slug(d), "domain": d, "persona": fallback_persona(d), "source": "fallback"} for d in pending
        ])
