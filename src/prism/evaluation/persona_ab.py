"""`prism ab`: does this persona help on my own tasks? The bootstrap's answer and verify stages, run on the
user's queries and persona: each query answered with and without the persona, judged in both orders.

The A/B directory is a small run directory (personas, queries, answers, judgments, labels), so an
interrupted A/B test resumes like a bootstrap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prism.config import BootstrapConfig
from prism.errors import PrismError
from prism.evaluation.stats import wilson_interval
from prism.lm.models import load_model
from prism.runs import RunDir, write_json_atomic
from prism.stages import answers, verify
from prism.stages.context import StageContext

PERSONA_ID = "user-persona"


def read_queries(path: str | Path) -> list[dict[str, str]]:
    """JSONL with `query` and an optional `category` per line."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PrismError(f"cannot read the queries file {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrismError(f"{path}:{number}: not JSON ({exc.msg}); expected {{\"query\": ..., "
                             "\"category\": ...}") from None
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not row["query"].strip():
            raise PrismError(f"{path}:{number}: each line needs a non-empty \"query\" string")
        rows.append({"query": row["query"].strip(), "category": str(row.get("category") or "all")})
    if not rows:
        raise PrismError(f"{path} holds no queries")
    return rows


def persona_ab(persona: str, queries: list[dict[str, str]], out: str | Path, config: BootstrapConfig
               ) -> dict[str, Any]:
    """Answer, judge both orders, and summarize per category; results in `out`/ab_results.json."""
    run = RunDir(out)
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.read("personas"):
        run.append("personas", [{"id": PERSONA_ID, "domain": "user", "persona": persona, "source": "user"}])
    elif run.read("personas")[0]["persona"] != persona:
        raise PrismError(f"{run.path} holds an A/B test of another persona: choose another --out")
    if not run.read("queries"):
        run.append("queries", [{"id": f"q{i}", "persona_id": PERSONA_ID, "domain": q["category"],
                                "query": q["query"], "status": "kept"} for i, q in enumerate(queries)])
    lm = load_model(config.model, device=config.device, trust_remote_code=config.trust_remote_code)
    ctx = StageContext(run=run, config=config, lm=lm)
    answers.run(ctx)
    verify.run(ctx)
    results = {"categories": summarize_ab(run.read("labels")),
               "judge": verify.judge_quality(run.read("judgments"), config.judge_calibration)}
    write_json_atomic(run.path / "ab_results.json", results)
    plot_ab(results["categories"], run.path / "ab_results.png")
    return results


def outcome(label: dict[str, Any]) -> str:
    """'win' or 'loss' when the same answer won both orders, else 'tie'."""
    winners = {verify.winner(order, label["verdicts"][order]["calibrated"]) for order in verify.ORDERS}
    if winners == {"persona"}:
        return "win"
    return "loss" if winners == {"plain"} else "tie"


def summarize_ab(labels: list[dict[str, Any]]) -> dict[str, Any]:
    """Per category and overall: persona win / loss / tie rates (both orders must agree) with Wilson CIs."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(label["domain"], []).append(outcome(label))
    groups["overall"] = [o for outcomes in list(groups.values()) for o in outcomes]
    summary = {}
    for category, outcomes in groups.items():
        n = len(outcomes)
        summary[category] = {"n": n, **{
            f"{kind}_rate": outcomes.count(kind) / n for kind in ("win", "loss", "tie")}, **{
            f"{kind}_rate_ci": list(wilson_interval(outcomes.count(kind), n)) for kind in ("win", "loss", "tie")}}
    return summary


def format_ab(results: dict[str, Any]) -> str:
    """The per-category table, then the judge's quality, and a plain warning when it is position-bound
    (then "tie 100%" means the judge could not judge, not that the persona changes nothing)."""
    lines = [f"{'category':<24} {'n':>4}  {'persona wins':>22}  {'persona loses':>22}  {'tie':>22}"]
    for category, row in results["categories"].items():
        cells = [f"{100 * row[f'{k}_rate']:5.1f}% [{100 * row[f'{k}_rate_ci'][0]:4.1f}, "
                 f"{100 * row[f'{k}_rate_ci'][1]:5.1f}]" for k in ("win", "loss", "tie")]
        lines.append(f"{category:<24} {row['n']:>4}  " + "  ".join(f"{c:>22}" for c in cells))
    lines.append(verify.format_judge_quality(results["judge"]))
    warning = verify.judge_warning(results["judge"])
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def plot_ab(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(results)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(categories)), 3.5))
    bottom = [0.0] * len(categories)
    for kind, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
        values = [100 * results[c][f"{kind}_rate"] for c in categories]
        ax.bar(categories, values, bottom=bottom, color=color, label=f"persona {kind}" if kind != "tie" else "tie")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("% of queries (both orders agree)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
