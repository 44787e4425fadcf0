"""results.json, the summary `prism eval` writes, and its one reader (`Results`).

The file is {system: {bench: entry}}. An entry holds each metric as `name` (the value), `name_ci` ([low, high],
95%) and, for a rate, `name_n` (its items), beside `routing_rate` (the share of the bench's items routed to an
adapter) and, on k-way runs, `routing_shares`. Knowledge entries add `domains`, `subjects` and `vs_base` (the
paired difference against base); MT-Bench adds `categories` and the win rates against base; refusal entries
add the keyword figures; verified adds `domains`. `HEADLINES` says which metric of each benchmark the main
table and the report show, and how.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism.errors import PrismError
from prism.evaluation.config import BENCHES
from prism.runs import EVAL_DIR

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class Metric:
    value: float | None
    ci: list[float] | None
    n: int | None


@dataclass(frozen=True)
class Headline:
    """A column of the main table: a benchmark's metric, a rate (shown in %) or a score on its own scale."""
    bench: str
    metric: str
    label: str
    percent: bool = True


HEADLINES = (
    Headline("mtbench", "score", "MT-Bench (1-10)", percent=False),
    Headline("mtbench", "winrate_vs_base", "MT-Bench win rate vs base %"),
    Headline("mmlu", "accuracy", "MMLU %"),
    Headline("arc", "accuracy", "ARC %"),
    Headline("jbb", "refusal_harmful", "JBB refusal harmful %"),
    Headline("jbb", "refusal_benign", "JBB refusal benign %"),
    Headline("harmbench", "refusal_harmful", "HarmBench refusal %"),
    Headline("pku", "refusal_harmful", "PKU-SafeRLHF refusal %"),
    Headline("verified", "pass_rate", "verified pass rate %"),
)
NAMES = {"mmlu": "MMLU", "arc": "ARC", "mtbench": "MT-Bench", "jbb": "JailbreakBench", "harmbench": "HarmBench",
         "pku": "PKU-SafeRLHF", "verified": "verified"}


class Results:
    def __init__(self, data: dict[str, Any]):
        self.data = data

    @classmethod
    def load(cls, run_path: str | Path) -> Results:
        path = Path(run_path) / EVAL_DIR / RESULTS_FILE
        if not path.is_file():
            raise PrismError(f"{path} does not exist: run `prism eval {run_path}` first")
        try:
            return cls(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise PrismError(f"{path} is not valid JSON ({exc.msg}): run `prism eval {run_path}` again") from None

    @property
    def systems(self) -> list[str]:
        return list(self.data)

    @property
    def benches(self) -> list[str]:
        """The benchmarks some system has results for, in the order of `config.BENCHES`."""
        return [b for b in BENCHES if any(self.entry(s, b) for s in self.systems)]

    def entry(self, system: str, bench: str) -> dict[str, Any]:
        return (self.data.get(system) or {}).get(bench) or {}

    def metric(self, system: str, bench: str, name: str) -> Metric:
        entry = self.entry(system, bench)
        return Metric(entry.get(name), entry.get(f"{name}_ci"), entry.get(f"{name}_n"))

    def routing_rate(self, system: str, bench: str) -> float | None:
        return self.entry(system, bench).get("routing_rate")

    def headlines(self) -> list[Headline]:
        """The main table's columns the results have."""
        return [h for h in HEADLINES if any(self.metric(s, h.bench, h.metric).value is not None for s in self.systems)]
