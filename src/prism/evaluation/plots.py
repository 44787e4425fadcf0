"""The report's plots, from `Results` and the run's own records: MT-Bench per category, knowledge against base,
the refusal rates of every safety set evaluated, the gate's routing shares, the verified pass rates, the
calibration curves, the distillation loss and the replication's Overall. Each plot draws the intervals of its
table, and a rate keeps its full scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prism.evaluation.calibrate import load_calibration
from prism.evaluation.config import REFUSAL_BENCHES
from prism.evaluation.data import MMLU_DOMAINS, MT_BENCH_CATEGORIES
from prism.evaluation.replication import load_replication
from prism.evaluation.results import NAMES, Results
from prism.runs import RunDir

COLORS = {"base": "tab:blue", "persona": "tab:orange", "lora": "tab:green", "prism": "tab:red", "kway": "tab:purple",
          "kway-lora": "tab:brown", "nosystem": "tab:gray"}  # same in every plot


class Figures:
    """The report's plots: where they go, and the grouped-bar layout (one bar per system) they share."""

    def __init__(self, folder: Path, systems: list[str]):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.folder, self.systems = plt, folder, systems
        self.width = 0.8 / max(1, len(systems))
        self.made: list[tuple[str, Path]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def new(self, width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
        fig, axes = self.plt.subplots(1, columns, figsize=(width, height), squeeze=False)
        return fig, axes[0] if columns > 1 else axes[0][0]

    def save(self, fig: Any, name: str, title: str) -> None:
        path = self.folder / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        self.plt.close(fig)
        self.made.append((title, path))

    def bars(self, ax: Any, i: int, count: int, values: list[float], intervals: list[list[float] | None],
             scale: float, system: str) -> None:
        ax.bar([x + i * self.width for x in range(count)], values, self.width, label=system, color=COLORS.get(system),
               yerr=error_bars(values, intervals, scale), capsize=3, error_kw={"linewidth": 0.8})

    def group_ticks(self, ax: Any, labels: list[str]) -> None:
        ax.set_xticks([x + self.width * (len(self.systems) - 1) / 2 for x in range(len(labels))], labels)


def error_bars(values: list[float], intervals: list[list[float] | None], scale: float) -> list[list[float]]:
    """matplotlib's asymmetric yerr from [low, high] intervals (0 where there is none)."""
    low = [v - scale * i[0] if i else 0.0 for v, i in zip(values, intervals)]
    high = [scale * i[1] - v if i else 0.0 for v, i in zip(values, intervals)]
    return [[max(0.0, x) for x in low], [max(0.0, x) for x in high]]


def mtbench_plot(figures: Figures, results: Results) -> None:
    if "mtbench" not in results.benches:
        return
    fig, ax = figures.new(10, 4)
    for i, system in enumerate(figures.systems):
        cats = results.entry(system, "mtbench").get("categories") or {}
        entries = [cats.get(c) or {} for c in MT_BENCH_CATEGORIES]
        figures.bars(ax, i, len(entries), [e.get("score") or 0 for e in entries],
                     [e.get("score_ci") for e in entries], 1, system)
    figures.group_ticks(ax, list(MT_BENCH_CATEGORIES))
    ax.set_ylim(0, 10)  # the grading scale, whatever the scores
    ax.set_ylabel("MT-Bench score (1-10, 95% CI)")
    ax.legend()
    figures.save(fig, "mtbench_categories", "MT-Bench score per category")


def knowledge_plot(figures: Figures, results: Results) -> None:
    if not (results.entry("base", "mmlu") or results.entry("base", "arc")):
        return
    fig, ax = figures.new(9, 4)
    labels = [*MMLU_DOMAINS, "ARC"]
    for i, system in enumerate(s for s in figures.systems if s != "base"):
        mmlu, arc = results.entry(system, "mmlu"), results.entry(system, "arc")
        versus = [(arc if label == "ARC" else (mmlu.get("domains") or {}).get(label) or {}).get("vs_base") or {}
                  for label in labels]
        figures.bars(ax, i, len(labels), [100 * v["delta"] if v else 0 for v in versus],
                     [v.get("delta_ci") for v in versus], 100, system)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy − base (points, 95% CI)")
    ax.legend()
    figures.save(fig, "knowledge_delta", "MMLU per domain and ARC: accuracy minus base on the same items")


def refusal_plot(figures: Figures, results: Results) -> None:
    """One group of bars per figure of every safety set evaluated: harmful (judge, keywords), and benign where
    the set has it (JailbreakBench)."""
    benches = [b for b in REFUSAL_BENCHES if b in results.benches]
    keys = [(b, f"refusal_{kind}{how}", f"{NAMES[b]} {kind}{' (keywords)' if how else ''}")
            for b in benches for kind in ("harmful", "benign") for how in ("", "_keyword")
            if any(results.metric(s, b, f"refusal_{kind}").value is not None for s in results.systems)]
    if not keys:
        return
    fig, ax = figures.new(max(8, 1.6 * len(keys)), 4)
    everything = []
    for i, system in enumerate(figures.systems):
        metrics = [results.metric(system, b, k) for b, k, _ in keys]
        values = [100 * (m.value or 0) for m in metrics]
        everything += values
        figures.bars(ax, i, len(keys), values, [m.ci for m in metrics], 100, system)
    figures.group_ticks(ax, [t for _, _, t in keys])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(0, 100)  # a rate: the full scale, also when every rate is 0
    if not any(everything):
        ax.text(0.5, 0.6, "no refusals", transform=ax.transAxes, ha="center", fontsize=14, color="dimgray")
    ax.set_ylabel("refusal rate (%, 95% CI)")
    ax.legend(loc="upper right")
    figures.save(fig, "refusals", "Refusal rates (harmful: higher is better; benign: lower)")


def routing_plot(figures: Figures, results: Results) -> None:
    labels, values = [], []
    for bench in results.benches:
        if bench == "mtbench":
            for category, entry in (results.entry("prism", bench).get("categories") or {}).items():
                if entry.get("routing_rate") is not None:
                    labels.append(f"mt:{category}")
                    values.append(100 * entry["routing_rate"])
        elif (share := results.routing_rate("prism", bench)) is not None:
            labels.append(bench)
            values.append(100 * share)
    if not labels:
        return
    fig, ax = figures.new(10, 4)
    ax.bar(labels, values)
    ax.set_ylabel("% of requests sent to the adapter")
    ax.tick_params(axis="x", rotation=45)
    figures.save(fig, "routing", "PRISM gate: share routed to the adapter per benchmark and MT-Bench category")


def calibration_plot(figures: Figures, run: RunDir) -> None:
    calibration = load_calibration(run.path)
    if not (calibration and calibration.get("curves")):
        return
    curves = list(calibration["curves"].values())
    fig, axes = figures.new(5 * len(curves), 4, columns=len(curves))
    for ax, curve in zip(axes if len(curves) > 1 else [axes], curves):
        points = sorted(curve["points"], key=lambda p: p["share"])
        shares = [100 * p["share"] for p in points]
        ax.plot(shares, [p["value"] for p in points], marker=".", label="PRISM gate")
        ax.plot(shares, [p["random"] for p in points], linestyle="--", label="random routing")
        ax.scatter([100 * curve["oracle"]["share"]], [curve["oracle"]["value"]], color="black", label="oracle")
        chosen = calibration["share_routed"].get(curve["metric"])
        if chosen is not None:
            ax.axvline(100 * chosen, color="grey", linewidth=0.8, label="calibrated threshold")
        ax.set_xlabel("% routed to the adapter")
        ax.set_title(curve["metric"])
        ax.legend(fontsize=8)
    figures.save(fig, "routing_curve", "Routing curves: outcome against the share sent to the adapter, as the "
                                       "gate threshold sweeps from never to always")


def distill_plot(figures: Figures, run: RunDir) -> None:
    log = run.read("distill_log")
    if not log:
        return
    fig, ax = figures.new(7, 3.5)
    for adapter in dict.fromkeys(r.get("adapter") for r in log):  # the binary adapter, then each k-way one
        mine = [r for r in log if r.get("adapter") == adapter]
        ax.plot([r["step"] for r in mine], [r["loss"] for r in mine], marker="o", label=adapter or "adapter")
    if len({r.get("adapter") for r in log}) > 1:
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL loss")
    figures.save(fig, "distill_loss", "Distillation loss")


def replication_plot(figures: Figures, run: RunDir) -> None:
    table = load_replication(run.path)
    rows = {s: r for s, r in (table or {}).get("rows", {}).items() if r["overall"] is not None}
    if not rows:
        return
    fig, ax = figures.new(7, 3.5)
    values = [r["overall"]["value"] for r in rows.values()]
    intervals = [r["overall"]["ci"] for r in rows.values()]
    ax.bar(list(rows), values, color=[COLORS.get(s) for s in rows], yerr=error_bars(values, intervals, 1),
           capsize=3, error_kw={"linewidth": 0.8})
    ax.set_ylim(0, 100)
    ax.set_ylabel("Overall (mean of 15 scores, 95% CI)")
    figures.save(fig, "replication_overall", "Replication of the paper's Table 1: Overall per system")
