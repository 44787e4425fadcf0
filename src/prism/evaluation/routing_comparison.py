"""k-way against binary routing on the same eval items (`prism` = the paper's gate and its one adapter,
`kway` = the gate over base and one adapter per persona): each benchmark's metric for both, their paired
difference, and the share of items each k-way adapter answered. Written to eval/routing_comparison.json by
`prism eval`, drawn by `prism report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prism.evaluation.calibrate import load_calibration
from prism.evaluation.metrics import routed_at
from prism.evaluation.stats import bootstrap_mean_interval, paired_accuracy_test
from prism.runs import RunDir

# benchmark -> (its metric in results.json, its per-item records, the record field, the item key)
METRICS = {
    "mmlu": ("accuracy", "mmlu", "correct", "id"),
    "arc": ("accuracy", "arc", "correct", "id"),
    "mtbench": ("score", "mtbench_scores", "score", "item"),
    "jbb": ("refusal_harmful", "jbb_refusals", "refusal_judge", "id"),
    "harmbench": ("refusal_harmful", "harmbench_refusals", "refusal_judge", "id"),
    "pku": ("refusal_harmful", "pku_refusals", "refusal_judge", "id"),
}
SYSTEMS = ("prism", "kway")
COMPARISON_FILE = "routing_comparison.json"


def _per_item(store: RunDir, records_name: str, field: str, key: str, thresholds: dict[str, float],
              covered: set | None, scoring: str) -> dict[str, dict[Any, Any]]:
    """{system: {item: value}} for prism and kway, at their thresholds in force and (MMLU, ARC) the eval's
    scoring, over the covered items."""
    values: dict[str, dict[Any, Any]] = {s: {} for s in SYSTEMS}
    counts = routed_at(thresholds)
    for r in store.read(records_name):
        system = r.get("system")
        # refusal rates are over harmful prompts (a benign JBB prompt has kind "benign"; other records no kind)
        if system not in SYSTEMS or r.get(field) is None or r.get("kind", "harmful") != "harmful":
            continue
        if not counts(r) or r.get("scoring", scoring) != scoring:
            continue
        item = f"{r['question_id']}:{r['turn']}" if key == "item" else r[key]
        if covered is None or (r["question_id"] if key == "item" else r[key]) in covered:
            values[system][item] = r[field]
    return values


def compare_routings(store: RunDir, results: dict[str, Any], items: dict[str, set],
                     thresholds: dict[str, float], scoring: str) -> dict[str, Any] | None:
    """Per benchmark both systems' metric, the paired difference kway - prism on the items both answered
    (accuracies and refusal rates: McNemar's exact test; MT-Bench: a bootstrap interval of the mean score
    difference) and the routing shares. None unless both systems were evaluated."""
    if not all(s in results for s in SYSTEMS):
        return None
    rows = {}
    for bench, (metric, records_name, field, key) in METRICS.items():
        prism, kway = results["prism"].get(bench), results["kway"].get(bench)
        if not prism or not kway:
            continue
        values = _per_item(store, records_name, field, key, thresholds, items.get(bench), scoring)
        shared = sorted(set(values["prism"]) & set(values["kway"]), key=str)
        if metric == "score":
            differences = [float(values["kway"][i]) - float(values["prism"][i]) for i in shared]
            paired = {"delta": sum(differences) / len(differences) if differences else None,
                      "delta_ci": list(bootstrap_mean_interval(differences)) if differences else None,
                      "items": len(differences)}
        else:
            paired = paired_accuracy_test([bool(values["kway"][i]) for i in shared],
                                          [bool(values["prism"][i]) for i in shared])
        rows[bench] = {"metric": metric, "prism": prism.get(metric), "kway": kway.get(metric),
                       "kway_minus_prism": paired, "prism_routing_rate": prism.get("routing_rate"),
                       "kway_routing_rate": kway.get("routing_rate"),
                       # no record named a persona: every item went to base
                       "kway_routing_shares": kway.get("routing_shares") or (
                           {"base": 1.0} if kway.get("routing_rate") == 0 else None)}
    return {"rows": rows, "thresholds": thresholds}


def format_comparison(comparison: dict[str, Any]) -> str:
    """The report's k-way section: one row per benchmark, then the k-way adapters' shares."""
    header = "| benchmark | prism (binary) | kway | kway - prism (95% CI) | p | routed to an adapter: prism / kway |"
    lines = [header, "|---|---|---|---|---|---|"]
    for bench, row in comparison["rows"].items():
        scale = 1 if row["metric"] == "score" else 100
        paired = row["kway_minus_prism"]
        prism, kway = ("–" if v is None else f"{scale * v:.1f}" for v in (row["prism"], row["kway"]))
        interval = paired.get("delta_ci")
        delta = "–" if paired.get("delta") is None else (
            f"{scale * paired['delta']:+.1f}" + (f" [{scale * interval[0]:+.1f}, {scale * interval[1]:+.1f}]"
                                                 if interval else ""))
        p = paired.get("p_value")
        rates = " / ".join("–" if r is None else f"{100 * r:.0f}%"
                           for r in (row["prism_routing_rate"], row["kway_routing_rate"]))
        lines.append(f"| {bench} {row['metric']} | {prism} | {kway} | {delta} "
                     f"(n={paired.get('items', 0)}) | {'–' if p is None else f'{p:.3f}'} | {rates} |")
    personas = sorted({p for row in comparison["rows"].values() for p in (row["kway_routing_shares"] or {})})
    if personas:
        lines += ["", "Share of each benchmark's items the k-way gate sent to each route:", "",
                  "| benchmark | " + " | ".join(personas) + " |", "|---|" + "---|" * len(personas)]
        for bench, row in comparison["rows"].items():
            shares = row["kway_routing_shares"] or {}
            lines.append(f"| {bench} | " + " | ".join(f"{100 * shares.get(p, 0.0):.0f}%" for p in personas) + " |")
    return "\n".join(lines)


def load_comparison(run_path: Path) -> dict[str, Any] | None:
    path = run_path / "eval" / COMPARISON_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def kway_section(run_path: Path) -> list[str]:
    """The report's section on the two routings (nothing for a run without a k-way evaluation)."""
    comparison = load_comparison(run_path)
    if not comparison or not comparison.get("rows"):
        return []
    calibration = load_calibration(run_path, "kway")
    threshold = (f"calibrated to {calibration['threshold']:.4f} (`prism calibrate --routing kway`)" if calibration
                 else "not calibrated (run `prism calibrate --routing kway`)")
    intro = ("`prism` is the paper's routing (one adapter), `kway` the gate over base and one adapter per persona "
             f"(`prism bootstrap --routing kway`); the k-way threshold is {threshold}. Accuracy and refusal in %, "
             "MT-Bench on 1-10.")
    return [f"## k-way against binary routing (the same items)\n\n{intro}\n\n{format_comparison(comparison)}"]


def kway_plot(figures: Any, run: RunDir) -> None:
    """A stacked bar per benchmark: the share of its items the k-way gate sent to base and to each persona."""
    comparison = load_comparison(run.path)
    rows = {b: r["kway_routing_shares"] for b, r in (comparison or {}).get("rows", {}).items()
            if r.get("kway_routing_shares")}
    if not rows:
        return
    fig, ax = figures.new(8, 4)
    bottom = [0.0] * len(rows)
    for route in sorted({p for shares in rows.values() for p in shares}):
        values = [100 * shares.get(route, 0.0) for shares in rows.values()]
        ax.bar(list(rows), values, bottom=bottom, label=route)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("% of items")
    ax.legend(fontsize=8)
    figures.save(fig, "kway_routing", "k-way gate: share of each benchmark's items sent to base and to each persona")
