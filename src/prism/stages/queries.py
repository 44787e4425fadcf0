"""Stage 2: N realistic queries per persona, sampled, cleaned and near-duplicate filtered, and/or real ones from
a file (`--queries`, e.g. `prism discover`'s queries.jsonl), filtered the same way (`--queries-mix`)."""

from __future__ import annotations

import hashlib
import json
import math
import random
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
# Self-instruct's few-shot form: the model continues a numbered list that starts with a domain's example queries,
# so it writes queries that say which domain they are about (the gate can only route on the query's text). Measured
# against examples listed in the request and the model asked for "one new question" (benchmarks/known_answer.py's
# three generated domains, 72 queries, the domain probe on the gate's feature, docs/results.md): 0.694 -> 0.778 at
# seed 0 and 0.556 -> 0.792 at seed 1.
QUERY_REQUEST_WITH_EXAMPLES = ("Here is an expert: {persona}\n\n"
                               "List questions users ask this expert about {domain}, one per line.")
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


def query_status(query: str, min_chars: int, dedup: NearDuplicateFilter, kept_for_persona: int, wanted: int,
                 examples: NearDuplicateFilter | None = None) -> str:
    if len(query) <= min_chars:
        return "too_short"
    if examples is not None and examples.is_duplicate(query):
        return "example_copy"  # an example shown to the model (or one very like it) is never a query of the run
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
    examples, examples_info = domain_examples(cfg.domain_examples, cfg.examples_file)
    copies = NearDuplicateFilter(cfg.query_dedup_rouge_l, (q for shown in examples.values() for q in shown))
    info: dict[str, Any] = {}
    if examples:
        info["examples"] = examples_info
    if "real" in cfg.query_sources():
        info["real"] = _real_queries(ctx, personas, records, dedup, copies)
    if "synthetic" in cfg.query_sources():
        _synthetic_queries(ctx, personas, records, dedup, examples, copies)
    info["kept"] = dict(Counter(source_of(r) for r in records if r["status"] == "kept"))
    return info


def domain_examples(given: dict[str, list[str]], path: str | None) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Each domain's example queries (lower-cased domain -> queries): the config's, then the --examples file's;
    and what the manifest records of them (counts per domain, the file and its digest)."""
    examples: dict[str, list[str]] = {}
    for domain, queries in given.items():
        examples.setdefault(domain.lower(), []).extend(queries)
    info: dict[str, Any] = {}
    if path:
        for row in read_real_queries(path, flag="--examples"):
            examples.setdefault(row["domain"].lower(), []).append(row["query"])
        info = {"file": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    examples = {d: list(dict.fromkeys(q for q in queries if q)) for d, queries in examples.items()}
    return examples, {"per_domain": {d: len(q) for d, q in examples.items()}, **info}


def shown_examples(examples: list[str], count: int, seed: int) -> list[str]:
    """The examples one query prompt shows: `count` of the domain's, drawn from the query's own seed (a resumed
    run shows the same), in a random order so no example always leads."""
    return random.Random(seed).sample(examples, min(count, len(examples)))


def source_of(record: dict[str, Any]) -> str:
    return record.get("source", "synthetic")  # records made before real queries existed are generated ones


def read_real_queries(path: str | Path, flag: str = "--queries") -> list[dict[str, str]]:
    """JSONL records with the query (`query`, `prompt` or `text`) and its `domain`."""
    path = Path(path)
    if not path.is_file():
        raise PrismError(f"{flag} {path}: no such file (a JSONL of {{\"query\": ..., \"domain\": ...}}, e.g. "
                         "`prism discover`'s queries.jsonl)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise PrismError(f"{flag} {path}, line {number}: not JSON") from None
        text = next((record.get(k) for k in ("query", "prompt", "text") if isinstance(record, dict)
                     and isinstance(record.get(k), str)), None)
        if not text or not isinstance(record.get("domain"), str):
            raise PrismError(f"{flag} {path}, line {number}: needs a \"query\" and its \"domain\"")
        rows.append({"query": text.strip(), "domain": record["domain"]})
    return rows


def _real_queries(ctx: StageContext, personas: list[dict], records: list[dict],
                  dedup: NearDuplicateFilter, copies: NearDuplicateFilter) -> dict[str, Any]:
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
        status = query_status(row["query"], cfg.query_min_chars, dedup, kept[persona["id"]], cfg.queries_per_persona,
                              copies)
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


def _synthetic_queries(ctx: StageContext, personas: list[dict], records: list[dict], dedup: NearDuplicateFilter,
                       examples: dict[str, list[str]], copies: NearDuplicateFilter) -> None:
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
        shots = [shown_examples(examples.get(p["domain"].lower(), []), cfg.query_examples_shown,
                                derive_seed(cfg.seed, "query-examples", qid)) for p, qid in pending]
        prompts = [query_prompt(p, shown) for (p, _), shown in zip(pending, shots)]
        for indices, outputs in ctx.generator.generate(
            prompts, max_new_tokens=cfg.query_max_tokens, temperature=cfg.query_temperature, top_p=cfg.query_top_p,
            seeds=[derive_seed(cfg.seed, "queries", qid) for _, qid in pending], batch_size=cfg.batch_size,
            desc=f"queries (round {round_})",
            first_line_only=True,
        ):
            new = []
            for i, out in zip(indices, outputs):
                persona, qid = pending[i]
                query = clean_query(out.text)
                status = query_status(query, cfg.query_min_chars, dedup, kept_count[persona["id"]],
                                      cfg.queries_per_persona, copies)
                if status == "kept":
                    dedup.add(query)
                    kept_count[persona["id"]] += 1
                new.append({"id": qid, "persona_id": persona["id"], "domain": persona["domain"], "round": round_,
                            "query": query, "status": status, "raw": out.text, "source": "synthetic",
                            **({"examples_shown": shots[i]} if shots[i] else {})})
            run_dir.append("queries", new)
            records += new
            generated += new
            done_ids.update(r["id"] for r in new)


def query_prompt(persona: dict[str, Any], examples: list[str]) -> Prompt:
    """The prompt that asks for one query of `persona`'s domain, few-shot when the domain has examples."""
    if not examples:
        return Prompt(QUERY_REQUEST.format(persona=persona["persona"], domain=persona["domain"]),
                      assistant_prefix=QUERY_PREFIX)
    listed = "".join(f"{i}. {example}\n" for i, example in enumerate(examples, start=1))
    return Prompt(QUERY_REQUEST_WITH_EXAMPLES.format(persona=persona["persona"], domain=persona["domain"]),
                  assistant_prefix=f"{listed}{len(examples) + 1}.")


def kept_queries(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "kept"]
