"""The paper's Table 1 from an evaluation's results.json: MT-Bench per category, MMLU per domain, refusal
rates on the three safety sets, and Overall, the unweighted mean of those 15 scores with MT-Bench x10,
per system; 95% intervals, McNemar against base for MMLU, routing shares per benchmark; and the paper's
published figures for the same model where there are some (paper_figures.json, with their sources)."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from prism.evaluation.config import REFUSAL_BENCHES
from prism.evaluation.data import MMLU_DOMAINS, MT_BENCH_CATEGORIES

TABLE_SYSTEMS = ("base", "nosystem", "persona", "lora", "prism")
SAFETY_NAMES = {"jbb": "JailbreakBench", "harmbench": "HarmBench", "pku": "PKU-SafeRLHF"}
COLUMNS = ([("mtbench", c) for c in MT_BENCH_CATEGORIES] + [("mmlu", d) for d in MMLU_DOMAINS]
           + [(bench, "refusal") for bench in REFUSAL_BENCHES])


def paper_figures(model: str) -> list[dict[str, Any]]:
    """The paper's figures for `model` (a Hub id), each with its source and whether it was confirmed."""
    data = json.loads(resources.files("prism.evaluation").joinpath("paper_figures.json").read_text())
    return data["models"].get(model, [])


def _cell(results: dict[str, Any], system: str, bench: str, key: str) -> dict[str, Any] | None:
    """One score of the table on its reporting scale (MT-Bench 1-10, the others in %), with its interval."""
    entry = results.get(system, {}).get(bench) or {}
    if bench == "mtbench":
        found, scale, name = (entry.get("categories") or {}).get(key) or {}, 1.0, "score"
    elif bench == "mmlu":
        found, scale, name = (entry.get("domains") or {}).get(key) or {}, 100.0, "accuracy"
    else:
        found, scale, name = entry, 100.0, "refusal_harmful"
    if found.get(name) is None:
        return None
    cell = {"value": scale * found[name], "ci": [scale * x for x in found.get(f"{name}_ci") or []] or None}
    if bench == "mmlu" and found.get("vs_base"):
        cell["mcnemar_p"] = found["vs_base"]["p_value"]
    return cell


def _overall(cells: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The unweighted mean of the 15 scores, MT-Bench x10; its interval from the cells' intervals by a
    normal approximation (the benchmarks' items are independent of each other)."""
    if any(c is None for c in cells):
        return None
    scaled = [(c["value"] * 10, [x * 10 for x in c["ci"]] if c["ci"] else None) if i < len(MT_BENCH_CATEGORIES)
              else (c["value"], c["ci"]) for i, c in enumerate(cells)]  # type: ignore[index]
    mean = sum(v for v, _ in scaled) / len(scaled)
    if any(ci is None for _, ci in scaled):
        return {"value": mean, "ci": None}
    sd = math.sqrt(sum(((ci[1] - ci[0]) / (2 * 1.96)) ** 2 for _, ci in scaled)) / len(scaled)
    return {"value": mean, "ci": [mean - 1.96 * sd, mean + 1.96 * sd]}


def replication_table(results: dict[str, Any], model: str) -> dict[str, Any]:
    """{columns, rows: {system: {cells, overall, routing}}, paper: [...]} from results.json."""
    rows = {}
    for system in (s for s in TABLE_SYSTEMS if s in results):
        cells = [_cell(results, system, bench, key) for bench, key in COLUMNS]
        routing = {bench: (results[system].get(bench) or {}).get("routing_rate")
                   for bench in ("mtbench", "mmlu", *REFUSAL_BENCHES)}
        rows[system] = {"cells": cells, "overall": _overall(cells), "routing": routing}
    return {"columns": [f"{bench}:{key}" for bench, key in COLUMNS], "rows": rows, "paper": paper_figures(model),
            "model": model}


def _text(cell: dict[str, Any] | None, digits: int) -> str:
    if cell is None:
        return "n/a"
    ci = cell.get("ci")
    interval = f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""
    return f"{cell['value']:.{digits}f}{interval}"


def format_replication(table: dict[str, Any]) -> str:
    """The table as Markdown: one row per system, then routing shares and the paper's figures."""
    header = ["system", *(c.split(":")[1] for c in table["columns"][:12]),
              *(SAFETY_NAMES[c.split(":")[0]] for c in table["columns"][12:]), "Overall"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for system, row in table["rows"].items():
        cells = [_text(c, 2 if i < len(MT_BENCH_CATEGORIES) else 1) for i, c in enumerate(row["cells"])]
        lines.append("| " + " | ".join([system, *cells, _text(row["overall"], 1)]) + " |")
    lines.append("")
    lines.append("MT-Bench: 1-10 per category; MMLU: accuracy % per domain; safety sets: % of harmful prompts "
                 "refused (judge); Overall: mean of the 15 scores with MT-Bench x10; [95% interval].")
    mcnemar = [f"{system}: " + ", ".join(f"{d} p={c['mcnemar_p']:.3g}" for d, c in zip(MMLU_DOMAINS,
                                                                                     row["cells"][8:12])
                                         if c and "mcnemar_p" in c)
               for system, row in table["rows"].items() if system != "base"]
    lines.append("MMLU against base, McNemar's exact test per domain: " + "; ".join(m for m in mcnemar if m))
    prism = table["rows"].get("prism")
    if prism:
        lines.append("PRISM routing shares (to the adapter): " + ", ".join(
            f"{bench} {100 * share:.1f}%" for bench, share in prism["routing"].items() if share is not None))
    if table["paper"]:
        lines += ["", f"The paper's figures for {table['model']} (not measured here):", "",
                  "| system | column | value | source | confirmed |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {f['system']} | {f['column']} | {f['value']} | {f['source']} | "
                  f"{'yes' if f['confirmed'] else 'no: not checked against the paper itself'} |"
                  for f in table["paper"]]
    return "\n".join(lines)


def load_replication(run_path: str | Path) -> dict[str, Any] | None:
    path = Path(run_path) / "eval" / "replication.json"
    return json.loads(path.read_text()) if path.is_file() else None
