"""Stage 2: N realistic queries per persona, sampled, cleaned and near-duplicate filtered."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from rouge_score import rouge_scorer

from prism.engines.base import Prompt
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


def run(ctx: StageContext) -> None:
    cfg, run_dir = ctx.config, ctx.run
    personas = run_dir.read("personas")
    records = run_dir.read("queries")
    done_ids = {r["id"] for r in records}
    kept_count = Counter(r["persona_id"] for r in records if r["status"] == "kept")
    dedup = NearDuplicateFilter(cfg.query_dedup_rouge_l, (r["query"] for r in records if r["status"] == "kept"))
    for round_ in range(cfg.query_rounds):
        # What this round asks for depends only on earlier rounds, so a resumed round asks the same.
        kept_before = Counter(r["persona_id"] for r in records if r["status"] == "kept" and r["round"] < round_)
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
                            "query": query, "status": status, "raw": out.text})
            run_dir.append("queries", new)
            records += new
            done_ids.update(r["id"] for r in new)


def kept_queries(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "kept"]
