"""The report's text cells and Markdown tables, shared by every section that prints results."""

from __future__ import annotations


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
