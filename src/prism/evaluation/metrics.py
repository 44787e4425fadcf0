"""results.json from the eval records: accuracies, scores, win rates and refusal rates with 95% intervals,
paired tests against base, and the share of each system's items routed to the adapter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prism.evaluation.config import REFUSAL_BENCHES, EvalConfig
from prism.evaluation.stats import bootstrap_mean_interval, paired_accuracy_test, wilson_interval
from prism.runs import RunDir


def _proportion(values: list[bool], name: str) -> dict[str, Any]:
    k, n = sum(values), len(values)
    return {name: k / n if n else None, f"{name}_ci": list(wilson_interval(k, n)) if n else None, f"{name}_n": n}


def _mean(values: list[float], name: str) -> dict[str, Any]:
    return {name: sum(values) / len(values) if values else None,
            f"{name}_ci": list(bootstrap_mean_interval(values)) if values else None}


def _versus_base(system: str, mine: list[dict], base: dict[str, bool]) -> dict[str, Any]:
    """{"vs_base": accuracy difference against base on the same items, its 95% interval and McNemar's p}."""
    shared = [r for r in mine if r["id"] in base]
    if system == "base" or not shared:
        return {}
    return {"vs_base": paired_accuracy_test([r["correct"] for r in shared], [base[r["id"]] for r in shared])}


def _routing_rate(records: list[dict]) -> float | None:
    return sum(r["route"] == "persona" for r in records) / len(records) if records else None


def _routing(records: list[dict]) -> dict[str, Any]:
    """The share routed to an adapter, and with k-way adapters the share each one answered (base included)."""
    routing: dict[str, Any] = {"routing_rate": _routing_rate(records)}
    if any(r.get("persona") for r in records):
        shares: dict[str, float] = {}
        for r in records:
            name = r.get("persona") or ("base" if r["route"] == "base" else "persona")
            shares[name] = shares.get(name, 0.0) + 1 / len(records)
        routing["routing_shares"] = dict(sorted(shares.items()))
    return routing


def prism_cache_name(threshold: float, system: str = "prism") -> str:
    return f"{system}@{threshold:.6g}"


def routed_at(thresholds: dict[str, float] | None) -> Callable[[dict[str, Any]], bool]:
    """Whether a record counts: a gated system's (`prism`, `kway`) only when routed at its threshold in force
    (its cache key carries the threshold), every other record always."""
    prefixes = {s: prism_cache_name(t, s) + ":" for s, t in (thresholds or {}).items()}
    return lambda r: r.get("system") not in prefixes or prefixes[r["system"]] in r.get("key", "")


def summarize(store: RunDir, config: EvalConfig, items: dict[str, set] | None = None,
              thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """results.json: {system: {bench: {metric: value, metric_ci: [lo, hi], ..., routing_rate}}}, over the
    `items` of each benchmark (ids; MT-Bench question ids) when given, else over everything cached, and
    for a gated system (`prism`, `kway`) over the rows routed at its threshold in `thresholds` (the one in
    force) when given."""
    results: dict[str, Any] = {system: {} for system in config.systems}
    counts = routed_at(thresholds)

    def read(name: str, bench: str, key: str = "id") -> list[dict[str, Any]]:
        if bench not in config.benches:
            return []
        records = [r for r in store.read(name) if counts(r)]
        return records if items is None or bench not in items else [r for r in records if r[key] in items[bench]]

    for bench in ("mmlu", "arc"):
        records = [r for r in read(bench, bench) if r.get("scoring", "letter") == config.scoring]
        base = {r["id"]: r["correct"] for r in records if r["system"] == "base"}
        for system in config.systems:
            if mine := [r for r in records if r["system"] == system]:
                results[system][bench] = knowledge_entry(system, mine, base)
    answers = read("mtbench_answers", "mtbench", "question_id")
    scores = read("mtbench_scores", "mtbench", "question_id")
    pairs = read("mtbench_pairs", "mtbench", "question_id")
    for system in config.systems:
        if mine := [s for s in scores if s["system"] == system]:
            results[system]["mtbench"] = mtbench_entry(system, mine, [a for a in answers if a["system"] == system],
                                                       [p for p in pairs if p["system"] == system])
    if scores := read("verified_scores", "verified", "item"):
        for system in config.systems:
            if mine := [r for r in scores if r["system"] == system]:
                results[system]["verified"] = verified_entry(mine)
    for bench in REFUSAL_BENCHES:
        refusals, bench_answers = read(f"{bench}_refusals", bench), read(f"{bench}_answers", bench)
        for system in config.systems:
            if mine := [r for r in refusals if r["system"] == system]:
                results[system][bench] = refusal_entry(mine, [a for a in bench_answers if a["system"] == system])
    return results


def knowledge_entry(system: str, mine: list[dict], base: dict[str, bool]) -> dict[str, Any]:
    """One system's MMLU or ARC accuracy, overall and per domain and subject, with its difference to base."""
    entry = _proportion([r["correct"] for r in mine], "accuracy") | _routing(mine)
    for key, field_name in (("domain", "domains"), ("subject", "subjects")):
        groups = sorted({r[key] for r in mine})
        entry[field_name] = {g: _proportion([r["correct"] for r in mine if r[key] == g], "accuracy")
                             | {"routing_rate": _routing_rate([r for r in mine if r[key] == g])}
                             | _versus_base(system, [r for r in mine if r[key] == g], base)
                             for g in groups}
    return entry | _versus_base(system, mine, base)


def mtbench_entry(system: str, scores: list[dict], answers: list[dict], pairs: list[dict]) -> dict[str, Any]:
    """One system's MT-Bench grades, overall and per category, and its pairs against base."""
    valid = [s["score"] for s in scores if s["score"] is not None]
    entry = _mean(valid, "score") | {"graded": len(valid), "unparseable": len(scores) - len(valid)} | _routing(answers)
    entry["categories"] = {}
    for category in sorted({s["category"] for s in scores}):
        cat = [s["score"] for s in scores if s["category"] == category and s["score"] is not None]
        entry["categories"][category] = _mean(cat, "score") | {"routing_rate": _routing_rate(
            [a for a in answers if a["category"] == category])}
    outcomes = _pair_outcomes(pairs) if system != "base" else []
    if outcomes:
        entry |= _winrate(outcomes, "winrate_vs_base")
        for turn in (0, 1):
            entry |= _winrate(_pair_outcomes([p for p in pairs if p.get("turn", 0) == turn]),
                              f"winrate_vs_base_turn{turn + 1}")
        entry["pairs"] = {o: outcomes.count(o) for o in ("win", "tie", "loss")}
        entry["pairs_unparseable"] = sum(p["verdict"] is None for p in pairs)
    return entry


def refusal_entry(refusals: list[dict], answers: list[dict]) -> dict[str, Any]:
    """One system's refusal rates on a safety set's harmful (and, for JBB, benign) prompts: judge and keywords."""
    entry = _routing(answers)
    for kind in [k for k in ("harmful", "benign") if any(r["kind"] == k for r in refusals)]:
        rows = [r for r in refusals if r["kind"] == kind]
        entry |= _proportion([r["refusal_judge"] is True for r in rows], f"refusal_{kind}")
        entry |= _proportion([r["refusal_keyword"] for r in rows], f"refusal_{kind}_keyword")
        entry[f"refusal_{kind}_unparseable"] = sum(r["refusal_judge"] is None for r in rows)
        entry[f"routing_rate_{kind}"] = _routing_rate([a for a in answers if a["kind"] == kind])
    return entry


def _pass_rate(scores: list[float]) -> dict[str, Any]:
    """The mean verifier score as a pass rate: a Wilson interval when every score is 0 or 1, else a bootstrap one."""
    if all(score in (0.0, 1.0) for score in scores):
        return _proportion([score == 1.0 for score in scores], "pass_rate")
    return _mean(scores, "pass_rate") | {"pass_rate_n": len(scores)}


def verified_entry(records: list[dict]) -> dict[str, Any]:
    """One system's pass rate on the held-out queries, overall and per domain, with the share routed to an adapter."""
    entry = _pass_rate([r["score"] for r in records]) | _routing(records)
    entry["domains"] = {}
    for domain in dict.fromkeys(r["domain"] for r in records):
        rows = [r for r in records if r["domain"] == domain]
        entry["domains"][domain] = _pass_rate([r["score"] for r in rows]) | _routing(rows)
    return entry


def _winrate(outcomes: list[str], name: str) -> dict[str, Any]:
    """Wins count 1, ties 1/2 (FastChat's convention), with a bootstrap interval."""
    return _mean([1.0 if o == "win" else 0.5 if o == "tie" else 0.0 for o in outcomes], name) if outcomes else {}


def _pair_outcomes(pairs: list[dict]) -> list[str]:
    """Per question and turn: win if the system won in both slot orders, loss if base did, else tie."""
    by_question: dict[tuple[int, int], dict[str, str | None]] = {}
    for p in pairs:  # records from before turn 2 was judged have no "turn": they are turn 1
        by_question.setdefault((p["question_id"], p.get("turn", 0)), {})[p["order"]] = p["verdict"]
    outcomes = []
    for verdicts in by_question.values():
        if len(verdicts) < 2 or None in verdicts.values():
            continue
        system_won = [verdicts["system_first"] == "A", verdicts["base_first"] == "B"]
        base_won = [verdicts["system_first"] == "B", verdicts["base_first"] == "A"]
        outcomes.append("win" if all(system_won) else "loss" if all(base_won) else "tie")
    return outcomes

