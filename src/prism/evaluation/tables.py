"""The report's text: cells with their intervals, Markdown tables, the main table (a column per headline metric
of every benchmark the results hold) and the detail tables."""

from __future__ import annotations

from prism.evaluation.config import REFUSAL_BENCHES
from prism.evaluation.data import MMLU_DOMAINS, MT_BENCH_CATEGORIES
from prism.evaluation.results import NAMES, Results

DOMAINS = tuple(MMLU_DOMAINS)


def cell(entry: dict | None, metric: str, percent: bool = True) -> str:
    """A metric with its 95% interval in brackets ("–" when missing); proportions in %."""
    if not entry or entry.get(metric) is None:
        return "–"
    value, ci = entry[metric], entry.get(f"{metric}_ci")
    scale = 100 if percent else 1
    text = f"{value * scale:.1f}"
    if ci and None not in ci:
        text += f" [{ci[0] * scale:.1f}, {ci[1] * scale:.1f}]"
    return text


def rate(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def results_table(results: Results) -> str:
    """The main table: one row per system, a column per headline metric of each benchmark evaluated (rates in
    %, MT-Bench on 1-10, 95% CIs in brackets), and the share each benchmark routed to an adapter."""
    headlines, benches = results.headlines(), results.benches
    header = ["system", *(h.label for h in headlines), f"routed to an adapter ({'/'.join(benches)})"]
    rows = [[system, *(cell(results.entry(system, h.bench), h.metric, h.percent) for h in headlines),
             "/".join(rate(results.routing_rate(system, b)) for b in benches)] for system in results.systems]
    return markdown_table(header, rows)


def _versus(paired: dict | None) -> str:
    if not paired:
        return "–"
    interval = paired.get("delta_ci")
    bracket = f" [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]" if interval else ""
    return f"{100 * paired['delta']:+.1f}{bracket}, p={paired['p_value']:.3f}"


def detail_tables(results: Results) -> str:
    parts = []
    systems, benches = results.systems, set(results.benches)
    if "mtbench" in benches:
        rows = [[s, *(cell((results.entry(s, "mtbench").get("categories") or {}).get(c), "score", percent=False)
                      for c in MT_BENCH_CATEGORIES)] for s in systems]
        parts.append("### MT-Bench per category (1-10, 95% CI)\n\n" + markdown_table(["system", *MT_BENCH_CATEGORIES],
                                                                                     rows))
        header = ["system", "win rate, turn 1", "win rate, turn 2", "win rate, both", "win / tie / loss",
                  "verdicts unparseable"]
        rows = [[s, *(cell(mt, f"winrate_vs_base{t}") for t in ("_turn1", "_turn2", "")),
                 " / ".join(str((mt.get("pairs") or {}).get(o, 0)) for o in ("win", "tie", "loss")),
                 str(mt.get("pairs_unparseable", 0))]
                for s in systems if (mt := results.entry(s, "mtbench")).get("pairs")]
        if rows:
            parts.append("### MT-Bench pairwise against base (%, wins count 1 and ties 1/2; a win needs both slot "
                         "orders)\n\n" + markdown_table(header, rows))
    if benches & {"mmlu", "arc"}:
        header = ["system", *(f"MMLU {d}" for d in DOMAINS), "MMLU vs base (Δ points [95% CI], McNemar p)", "ARC",
                  "ARC vs base"]
        rows = []
        for s in systems:
            mmlu, arc = results.entry(s, "mmlu"), results.entry(s, "arc")
            rows.append([s, *(cell((mmlu.get("domains") or {}).get(d), "accuracy") for d in DOMAINS),
                         _versus(mmlu.get("vs_base")), cell(arc, "accuracy"), _versus(arc.get("vs_base"))])
        parts.append("### Knowledge: MMLU per domain and ARC (% correct, 95% CI)\n\n" + markdown_table(header, rows))
    header = ["system", "harmful: judge", "harmful: keywords", "benign: judge", "benign: keywords", "unparseable"]
    for bench in [b for b in REFUSAL_BENCHES if b in benches]:
        rows = []
        for s in systems:
            if entry := results.entry(s, bench):
                rows.append([s, *(cell(entry, f"refusal_{kind}{how}") for kind in ("harmful", "benign")
                                  for how in ("", "_keyword")),
                             str(entry.get("refusal_harmful_unparseable", 0) + entry.get("refusal_benign_unparseable",
                                                                                        0))])
        parts.append(f"### {NAMES[bench]} refusal rates (%, 95% Wilson CI)\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts)
