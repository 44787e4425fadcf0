"""Stage 2: N realistic queries per persona, sampled, cleaned and near-duplicate filtered, and/or real ones from
a file (`--queries`, e.g. `prism discover`'s queries.jsonl), filtered the same way (`--queries-mix`)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rouge_score import rouge_scorer

from prism.engines.base import Prompt
from prism.errors import PrismError
from prism.stages.context import StageContext, derive_seed

QUERY_REQUEST = (
    "Here is an expert: {persona}\n\n"
    "Write one realistic, specific question about {domain} that a user might ask this expert. "
    "Reply with the question only."
)
# Starting the reply for the model keeps small models on task: without it the embedded 135M model wrote lead-ins
# and persona talk ("I'm a terse expert, ...") for most queries; with it, mostly questions.
QUERY_PREFIX = "Question:"
_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•#]+|q\d*\s*[:.]|question\s*\d*\s*[:.]|user\s*:)\s*", re.I)
_QUOTED = re.compile(r"[\"“]([^\"”]{10,})[\"”]")


def clean_query(raw: str) -> str:
    """First real line of the output, numbering, lead-ins and quotes removed."""
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    lines = [line for line in lines if not line.endswith(":")]  # "A user might ask:" lead-ins
    if not lines:
        return ""
    line = _NUMBERING.sub("", lines[0]).strip()
    quoted = _QUOTED.search(line)
    if quoted:  # 'A user might ask: "How do I ...?"' -> the quoted question
        line = quoted.group(1)
    return line.strip().strip("\"'*“” ").strip()


class NearDuplicateFilter:
    """Self-Instruct's rule: drop a text whose ROUGE-L F1 with any kept text reaches the threshold."""

    def __init__(self, threshold: float, kept: Iterable[str] = ()):
        self.threshold = threshold
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.kept = list(kept)

    def is_duplicate(self, text: str) -> bool:
        return any(self.scorer.score(old, text)["rougeL"].fmeasure >= self.threshold for old in self.kept)

    def add(self, text: str) -> None:
        self.kept.append(text)


def query_status(query: str, min_chars: int, dedup: NearDuplicateFilter, kept_for_persona: int, wanted: int) -> str:
    if len(query) <= min_chars:
        return "too_short"
    if dedup.is_duplicate(query):
        return "duplicate"
    if kept_for_persona >= wanted:
        return "surplus"
    return "kept"


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, run_dir = ctx.config, ctx.run
    personas = run_dir.read("personas")
    records = run_dir.read("queries")
    dedup = NearDuplicateFilter(cfg.query_dedup_rouge_l, (r["query"] for r in records if r["status"] == "kept"))
    info: dict[str, Any] = {}
    if "real" in cfg.query_sources():
        info["real"] = _real_queries(ctx, personas, records, dedup)
    if "synthetic" in cfg.query_sources():
        _synthetic_queries(ctx, personas, records, dedup)
    info["kept"] = dict(Counter(source_of(r) for r in records if r["status"] == "kept"))
    return info


def source_of(record: dict[str, Any]) -> str:
    return record.get("source", "synthetic")  # records made before real queries existed are generated ones


def read_real_queries(path: str | Path) -> list[dict[str, str]]:
    """JSONL records with the query (`query`, `prompt` or `text`) and its `domain`."""
    path = Path(path)
    if not path.is_file():
        raise PrismError(f"--queries {path}: no such file (a JSONL of {{\"query\": ..., \"domain\": ...}}, e.g. "
                         "`prism discover`'s queries.jsonl)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise PrismError(f"--queries {path}, line {number}: not JSON") from None
        text = next((record.get(k) for k in ("query", "prompt", "text") if isinstance(record, dict)
                     and isinstance(record.get(k), str)), None)
        if not text or not isinstance(record.get("domain"), str):
            raise PrismError(f"--queries {path}, line {number}: needs a \"query\" and its \"domain\"")
        rows.append({"query": text.strip(), "domain": record["domain"]})
    return rows


def _real_queries(ctx: StageContext, personas: list[dict], records: list[dict],
                  dedup: NearDuplicateFilter) -> dict[str, Any]:
    """The file's queries of the run's domains, in file order, up to queries_per_persona kept per persona (the
    rest 'surplus'), each through the same length and near-duplicate filter as generated ones."""
    cfg = ctx.config
    path = Path(cfg.queries_file)  # type: ignore[arg-type]  # query_sources() says there is one
    rows = read_real_queries(path)
    persona_of = {}
    for persona in personas:
        persona_of.setdefault(persona["domain"].lower(), persona)
    done = {r["id"] for r in records}
    kept = Counter(r["persona_id"] for r in records if r["status"] == "kept" and source_of(r) == "real")
    new, outside = [], Counter()
    for index, row in enumerate(rows):
        persona = persona_of.get(row["domain"].lower())
        if persona is None:
            outside[row["domain"]] += 1
            continue
        qid = f"{persona['id']}/real/{index}"
        if qid in done:
            continue
        status = query_status(row["query"], cfg.query_min_chars, dedup, kept[persona["id"]], cfg.queries_per_persona)
        if status == "kept":
            dedup.add(row["query"])
            kept[persona["id"]] += 1
        new.append({"id": qid, "persona_id": persona["id"], "domain": persona["domain"], "round": 0,
                    "query": row["query"], "status": status, "raw": row["query"], "source": "real"})
    ctx.run.append("queries", new)
    records += new
    return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "rows": len(rows),
            "outside_domains": dict(outside),
            "statuses": dict(Counter(r["status"] for r in records if source_of(r) == "real"))}


def _synthetic_queries(ctx: StageContext, personas: list[dict], records: list[dict],
                       dedup: NearDuplicateFilter) -> None:
    cfg, run_dir = ctx.config, ctx.run
    done_ids = {r["id"] for r in records}
    generated = [r for r in records if source_of(r) == "synthetic"]
    kept_count = Counter(r["persona_id"] for r in generated if r["status"] == "kept")
    for round_ in range(cfg.query_rounds):
        # What this round asks for depends only on earlier rounds, so a resumed round asks the same.
        kept_before = Counter(r["persona_id"] for r in generated if r["status"] == "kept" and r["round"] < round_)
        requests = []
        for persona in personas:
            need = cfg.queries_per_persona - kept_before[persona["id"]]
            # Oversample a little: some lines are unusable or near-duplicates.
            count = need + max(1, math.ceil(0.2 * need)) if need > 0 else 0
            requests += [(persona, f"{persona['id']}/r{round_}/{k}") for k in range(count)]
        if not requests:
            break
        pending = [(p, qid) for p, qid in requests if qid not in done_ids]
        prompts = [Prompt(QUERY_REQUEST.format(persona=p["persona"], domain=p["domain"]), assistant_prefix=QUERY_PREFIX)
                   for p, _ in pending]
        for indices, outputs in ctx.generator.generate(
            prompts, max_new_tokens=cfg.query_max_tokens, temperature=cfg.query_temperature,
            seeds=[derive_seed(cfg.seed, "queries", qid) for _, qid in pending], batch_size=cfg.batch_size,
            desc=f"queries (round {round_})",
            first_line_only=True,
        ):
            new = []
            for i, out in zip(indices, outputs):
                persona, qid = pending[i]
                query = clean_query(out.text)
                status = query_status(query, cfg.query_min_chars, dedup, kept_count[persona["id"]],
                                      cfg.queries_per_persona)
                if status == "kept":
                    dedup.add(query)
                    kept_count[persona["id"]] += 1
                new.append({"id": qid, "persona_id": persona["id"], "domain": persona["domain"], "round": round_,
                            "query": query, "status": status, "raw": out.text, "source": "synthetic"})
            run_dir.append("queries", new)
            records += new
            generated += new
            done_ids.update(r["id"] for r in new)


def kept_queries(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "kept"]
