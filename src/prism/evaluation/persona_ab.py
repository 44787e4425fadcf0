"""`prism ab`: does this persona help on my own tasks? The bootstrap's answer and verify stages, run on the
user's queries and persona: each query answered with and without the persona, judged in both orders.

The A/B directory is a small run directory (personas, queries, answers, judgments, labels), so an
interrupted A/B test resumes like a bootstrap.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism.config import JUDGE_FIELDS, BootstrapConfig, option
from prism.errors import PrismError
from prism.evaluation.config import EvalConfig
from prism.evaluation.stats import wilson_interval
from prism.lm.models import load_model
from prism.runs import FILES, RunDir, set_aside, write_json_atomic
from prism.stages import answers, verify
from prism.stages.context import StageContext
from prism.stages.records import Label, read_judgments, read_labels

log = logging.getLogger("prism")


@dataclass
class ABConfig:
    """`prism ab` besides the bootstrap options it shares (model, judge, verifier, seed, device, ...)."""
    persona: str = option("a text file holding the persona (system prompt)", default="")
    queries: str = option("JSONL, one {\"query\": ..., \"category\": ...} per line", default="")
    out: str | None = option("where answers and verdicts go (default runs/ab-<persona file name>); re-running "
                             "resumes", default=None)
    max_tokens: int = option("answer length", default=256)
    batch_size: int = option("requests generated or scored together", default=EvalConfig.batch_size)

    def read_persona(self) -> str:
        try:
            persona = Path(self.persona).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise PrismError(f"cannot read the persona file {self.persona}: {exc}") from None
        if not persona:
            raise PrismError(f"the persona file {self.persona} is empty")
        return persona

    def output(self) -> str:
        return self.out or f"runs/ab-{Path(self.persona).stem}"


# the bootstrap options `prism ab` takes as flags
SHARED_OPTIONS = ("model", "judge", "verifier", "pointwise_margin", "judge_calibration", "seed", "device")
PERSONA_ID = "user-persona"
JUDGE_SETTINGS = "judge_settings.json"  # the judge the verdicts in this A/B directory came from


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
    """Answer with and without the persona, judge each pair with the config's judge, and summarize per category;
    results in `out`/ab_results.json."""
    run = RunDir(out)
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.read("personas"):
        run.append("personas", [{"id": PERSONA_ID, "domain": "user", "persona": persona, "source": "user"}])
    elif run.read("personas")[0]["persona"] != persona:
        raise PrismError(f"{run.path} holds an A/B test of another persona: choose another --out")
    if not run.read("queries"):
        run.append("queries", [{"id": f"q{i}", "persona_id": PERSONA_ID, "domain": q["category"],
                                "query": q["query"], "status": "kept"} for i, q in enumerate(queries)])
    keep_judgments_of(run, config)
    lm = load_model(config.model, device=config.device, trust_remote_code=config.trust_remote_code)
    ctx = StageContext(run=run, config=config, lm=lm)
    answers.run(ctx)
    verify.run(ctx)
    labels = read_labels(run)
    results = {"categories": summarize_ab(labels),
               "judge": verify.judge_quality(read_judgments(run), labels, config.to_dict())}
    write_json_atomic(run.path / "ab_results.json", results)
    plot_ab(results["categories"], run.path / "ab_results.png")
    return results


def keep_judgments_of(run: RunDir, config: BootstrapConfig) -> None:
    """An A/B directory judged before with other judge settings keeps its answers; its verdicts are set aside."""
    settings = {k: v for k, v in config.identity().items() if k in JUDGE_FIELDS}
    path = run.path / JUDGE_SETTINGS
    if path.is_file() and json.loads(path.read_text()) != settings:
        aside = set_aside(run.path, [FILES["judgments"], FILES["labels"], "ab_results.json", "ab_results.png"])
        log.warning("%s was judged with other settings: its answers are kept and judged again (the old verdicts are "
                    "in %s)", run.path, aside)
    write_json_atomic(path, settings)


def summarize_ab(labels: list[Label]) -> dict[str, Any]:
    """Per category and overall: persona win / loss / tie rates (by the judge's outcome of each query: for the
    pairwise judge a win or loss needs both orders) with Wilson CIs."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(label.domain, []).append(label.outcome or ("win" if label.label else "tie"))
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
    lines += verify.format_judge_quality(results["judge"])
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
