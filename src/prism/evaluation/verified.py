"""`prism eval --bench verified`: held-out queries of the run's own domains, answered by every system and scored by
the run's verifiers (or `--verifier`). The queries are written by the bootstrap's own query stage with a seed of
their own and kept only when they are no near-duplicate of a bootstrap query, or come from a user file
(`--data verified=FILE`, JSONL of {"domain", "query"}). A system's pass rate is the mean verifier score."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from prism.config import BootstrapConfig, with_new_defaults
from prism.errors import PrismError
from prism.evaluation.config import ROUTING
from prism.evaluation.context import Evaluation, messages_for
from prism.evaluation.data import per_group
from prism.evaluation.results import Results
from prism.evaluation.tables import cell, markdown_table, rate
from prism.lm.decoding import SamplingParams
from prism.runs import RunDir
from prism.stages import judge_verifier, queries
from prism.stages.context import StageContext, derive_seed
from prism.verifiers import load_verifier, verifier_specs

log = logging.getLogger("prism")
BENCH = "verified"
QUERIES_DIR = "verified_queries"  # in RUN/eval: the held-out query stage's own small run directory


def run_domains(ev: Evaluation) -> list[str]:
    return [p["domain"] for p in ev.run.read("personas")]


def domain_specs(ev: Evaluation) -> dict[str, str]:
    """Each run domain's verifier: `--verifier` for all when given, else the run's own."""
    config = with_new_defaults(ev.run.manifest()["config"])
    if ev.config.verifier:
        return dict.fromkeys(run_domains(ev), ev.config.verifier)
    if config["judge"] != "verifier":
        raise PrismError(f"{ev.run.path} was not bootstrapped with --judge verifier, so it has no verifiers to score "
                         "the verified benchmark with: pass --verifier SPEC (e.g. max-words:25)")
    return verifier_specs(run_domains(ev), config["verifier"], config["verifiers"])


def user_queries(path: str | Path, domains: list[str]) -> list[dict[str, str]]:
    """Held-out queries from a JSONL file of {"domain", "query"}; each domain must be one of the run's."""
    by_name = {d.lower(): d for d in domains}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PrismError(f"cannot read the verified queries file {path}: {exc}") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrismError(f"{path}:{number}: not JSON ({exc.msg}); expected {{\"domain\": ..., \"query\": ...}}"
                             ) from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("domain", "query")):
            raise PrismError(f"{path}:{number}: each line needs non-empty \"domain\" and \"query\" strings")
        domain = by_name.get(row["domain"].strip().lower())
        if domain is None:
            raise PrismError(f"{path}:{number}: the domain {row['domain']!r} is not one of the run's "
                             f"({', '.join(domains)})")
        digest = hashlib.sha256(f"{domain}\n{row['query']}".encode()).hexdigest()[:12]
        items.append({"id": f"file:{digest}", "domain": domain, "query": row["query"].strip()})
    if not items:
        raise PrismError(f"{path} holds no queries")
    return items


def generated_queries(ev: Evaluation, per_domain: int) -> list[dict[str, str]]:
    """Held-out queries written like the bootstrap's (same personas and prompts, a seed of their own), minus
    any near-duplicate of a bootstrap query; cached in RUN/eval/verified_queries/."""
    recorded = with_new_defaults(ev.run.manifest()["config"])
    store = RunDir(ev.store.path / QUERIES_DIR)
    personas = ev.run.read("personas")
    if not store.read("personas"):
        store.append("personas", personas)
    config = BootstrapConfig(**{**recorded, "personas_file": None, "domains": [p["domain"] for p in personas],
                                "seed": derive_seed(recorded["seed"], "heldout"), "queries_per_persona": per_domain})
    with ev.model.adapter.disable_adapter() if ev.model.adapter is not None else nullcontext():
        queries.run(StageContext(run=store, config=config, lm=ev.model.lm))
    seen = queries.NearDuplicateFilter(config.query_dedup_rouge_l,
                                       (q["query"] for q in queries.kept_queries(ev.run.read("queries"))))
    held = [q for q in queries.kept_queries(store.read("queries")) if not seen.is_duplicate(q["query"])]
    return [{"id": f"heldout:{q['id']}", "domain": q["domain"], "query": q["query"]} for q in held]


def items_of(ev: Evaluation) -> list[dict[str, str]]:
    limit = ev.config.limit_for(BENCH)
    source = ev.config.data.get(BENCH)
    if source:
        items = user_queries(source, run_domains(ev))
    else:
        items = generated_queries(ev, limit or with_new_defaults(ev.run.manifest()["config"])["queries_per_persona"])
    items = per_group(items, "domain", limit)
    if not items:
        raise PrismError("no held-out query is left after dropping near-duplicates of the bootstrap's: pass a file "
                         "with --data verified=FILE (JSONL of {\"domain\", \"query\"})")
    return items


def run(ev: Evaluation, bench: str = BENCH) -> None:
    """Every system's answers to the held-out queries, then each answer's score by its domain's verifier."""
    items = items_of(ev)
    specs = domain_specs(ev)
    # the items this eval covers are (verifier, query) pairs: scores of another verifier are not counted
    ev.items[BENCH] = {f"{specs[it['domain']]}|{it['id']}" for it in items}
    max_tokens = ev.config.verified_max_tokens or with_new_defaults(ev.run.manifest()["config"])["answer_max_tokens"]
    params = SamplingParams(max_tokens=max_tokens)
    jobs, extra = {}, {}
    keys = {system: {f"{ev.cache_name(system)}:{it['id']}": it for it in items} for system in ev.config.systems}
    pending = set(ev.pending(f"{BENCH}_answers", (key for mine in keys.values() for key in mine)))
    for system, mine in keys.items():
        todo = [(key, it) for key, it in mine.items() if key in pending]
        conversations = [messages_for(system, it["query"], ev.persona_for(it["domain"])) for _, it in todo]
        for (key, it), request in zip(todo, ev.requests(system, conversations, params)):
            jobs[key] = request
            extra[key] = {"system": system, "id": it["id"], "domain": it["domain"], "query": it["query"]}
    ev.generate(f"{BENCH}_answers", jobs, extra, "verified answers")
    score_answers(ev, {it["id"]: it for it in items}, specs)


def score_answers(ev: Evaluation, items: dict[str, dict], specs: dict[str, str]) -> None:
    verifiers = {spec: load_verifier(spec) for spec in set(specs.values())}
    answers = [r for r in ev.store.read(f"{BENCH}_answers") if r["id"] in items]
    wanted = {f"{specs[r['domain']]}|{r['key']}": r for r in answers}
    scored: list[dict[str, Any]] = []
    try:
        for key in ev.pending(f"{BENCH}_scores", wanted):
            answer, spec = wanted[key], specs[wanted[key]["domain"]]
            score = judge_verifier.score(verifiers[spec], items[answer["id"]], answer["text"], answer["system"])
            scored.append({"key": key, "item": f"{spec}|{answer['id']}", "system": answer["system"],
                           "id": answer["id"], "domain": answer["domain"], "verifier": spec, "score": score,
                           **{k: answer[k] for k in ("route", "gate_probability", "persona") if k in answer}})
    finally:
        ev.store.append(f"{BENCH}_scores", scored)


def verified_section(results: Results) -> list[str]:
    """The report's table: per domain, each system's pass rate with its interval and the gated systems' shares
    routed to an adapter."""
    systems = [s for s in results.systems if results.entry(s, BENCH)]
    if not systems:
        return []
    gated = [s for s in systems if s in ROUTING]
    rows = []
    for domain in [*dict.fromkeys(d for s in systems for d in results.entry(s, BENCH)["domains"]), None]:
        entries = {s: results.entry(s, BENCH) if domain is None else results.entry(s, BENCH)["domains"].get(domain)
                   for s in systems}
        rows.append([domain or "all", *(cell(entries[s], "pass_rate") for s in systems),
                     *(rate((entries[s] or {}).get("routing_rate")) for s in gated)])
    table = markdown_table(["domain", *systems, *(f"{s} routed" for s in gated)], rows)
    return ["## Verified: held-out queries scored by the run's verifiers\n\nPass rate (mean verifier score) in %, "
            "95% interval in brackets (Wilson, or bootstrap for scores between 0 and 1); routed: the share the gate "
            f"sent to an adapter.\n\n{table}"]


def verified_plot(figures: Any, results: Results) -> None:
    systems = [s for s in figures.systems if results.entry(s, BENCH)]
    if not systems:
        return
    domains = list(dict.fromkeys(d for s in systems for d in results.entry(s, BENCH)["domains"]))
    fig, ax = figures.new(max(6, 2.2 * len(domains)), 4)
    for i, system in enumerate(systems):
        entries = [results.entry(system, BENCH)["domains"].get(d) or {} for d in domains]
        figures.bars(ax, i, len(domains), [100 * (e.get("pass_rate") or 0) for e in entries],
                     [e.get("pass_rate_ci") for e in entries], 100, system)
    figures.group_ticks(ax, domains)
    ax.set_ylim(0, 100)
    ax.set_ylabel("verifier pass rate (%, 95% CI)")
    ax.legend(fontsize=8)
    figures.save(fig, "verified", "Verified: pass rate per domain on held-out queries")
