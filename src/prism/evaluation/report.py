"""`prism report`: eval/report.md and a self-contained eval/report.html (plots inlined) from results.json."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from prism.errors import PrismError
from prism.evaluation.calibrate import load_calibration
from prism.evaluation.config import EvalConfig
from prism.evaluation.data import MMLU_DOMAINS, MT_BENCH_CATEGORIES
from prism.evaluation.replication import format_replication, load_replication
from prism.evaluation.routing_comparison import kway_plot, kway_section
from prism.evaluation.tables import cell, markdown_table, rate
from prism.evaluation.verified import verified_plot, verified_section
from prism.runs import RunDir

DOMAINS = tuple(MMLU_DOMAINS)
# eval settings that change results: the reproduce command names them when they differ from the default
_REPRODUCED = ("scoring", "mtbench_max_tokens", "jbb_max_tokens", "judge_base_url", "judge_model")
COLORS = {"base": "tab:blue", "persona": "tab:orange", "lora": "tab:green", "prism": "tab:red", "kway": "tab:purple",
          "kway-lora": "tab:brown", "nosystem": "tab:gray"}  # same in every plot


def results_table(results: dict[str, Any]) -> str:
    """The main table: one row per system; accuracy and refusal in %, MT-Bench on 1-10, 95% CIs in brackets."""
    header = ["system", "MT-Bench (1-10)", "win rate vs base %", "MMLU %", "ARC %", "JBB refusal harmful %",
              "JBB refusal benign %", "routed to adapter (mmlu/arc/mtbench/jbb)"]
    rows = []
    for system, benches in results.items():
        routing = "/".join(rate((benches.get(b) or {}).get("routing_rate")) for b in ("mmlu", "arc", "mtbench", "jbb"))
        rows.append([system, cell(benches.get("mtbench"), "score", percent=False),
                     cell(benches.get("mtbench"), "winrate_vs_base"), cell(benches.get("mmlu"), "accuracy"),
                     cell(benches.get("arc"), "accuracy"), cell(benches.get("jbb"), "refusal_harmful"),
                     cell(benches.get("jbb"), "refusal_benign"), routing])
    return markdown_table(header, rows)


def _versus(paired: dict | None) -> str:
    if not paired:
        return "–"
    interval = paired.get("delta_ci")
    bracket = f" [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]" if interval else ""
    return f"{100 * paired['delta']:+.1f}{bracket}, p={paired['p_value']:.3f}"


def detail_tables(results: dict[str, Any]) -> str:
    parts = []
    header = ["system", *MT_BENCH_CATEGORIES]
    rows = [[s, *(cell(((b.get("mtbench") or {}).get("categories") or {}).get(c), "score", percent=False)
                  for c in MT_BENCH_CATEGORIES)] for s, b in results.items()]
    parts.append("### MT-Bench per category (1-10, 95% CI)\n\n" + markdown_table(header, rows))
    header = ["system", "win rate, turn 1", "win rate, turn 2", "win rate, both", "win / tie / loss",
              "verdicts unparseable"]
    rows = [[s, *(cell(b["mtbench"], f"winrate_vs_base{t}") for t in ("_turn1", "_turn2", "")),
             " / ".join(str((b["mtbench"].get("pairs") or {}).get(o, 0)) for o in ("win", "tie", "loss")),
             str(b["mtbench"].get("pairs_unparseable", 0))]
            for s, b in results.items() if (b.get("mtbench") or {}).get("pairs")]
    if rows:
        parts.append("### MT-Bench pairwise against base (%, wins count 1 and ties 1/2; a win needs both slot "
                     "orders)\n\n" + markdown_table(header, rows))
    header = ["system", *(f"MMLU {d}" for d in DOMAINS), "MMLU vs base (Δ points [95% CI], McNemar p)", "ARC",
              "ARC vs base"]
    rows = []
    for system, benches in results.items():
        mmlu, arc = benches.get("mmlu") or {}, benches.get("arc") or {}
        rows.append([system, *(cell((mmlu.get("domains") or {}).get(d), "accuracy") for d in DOMAINS),
                     _versus(mmlu.get("vs_base")), cell(arc, "accuracy"), _versus(arc.get("vs_base"))])
    parts.append("### Knowledge: MMLU per domain and ARC (% correct, 95% CI)\n\n" + markdown_table(header, rows))
    header = ["system", "harmful: judge", "harmful: keywords", "benign: judge", "benign: keywords", "unparseable"]
    rows = [[s, cell(b.get("jbb"), "refusal_harmful"), cell(b.get("jbb"), "refusal_harmful_keyword"),
             cell(b.get("jbb"), "refusal_benign"), cell(b.get("jbb"), "refusal_benign_keyword"),
             str((b.get("jbb") or {}).get("refusal_harmful_unparseable", 0)
                 + (b.get("jbb") or {}).get("refusal_benign_unparseable", 0))]
            for s, b in results.items() if b.get("jbb")]
    if rows:
        parts.append("### JailbreakBench refusal rates (%, 95% Wilson CI)\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts)


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
               yerr=_error_bars(values, intervals, scale), capsize=3, error_kw={"linewidth": 0.8})

    def group_ticks(self, ax: Any, labels: list[str]) -> None:
        ax.set_xticks([x + self.width * (len(self.systems) - 1) / 2 for x in range(len(labels))], labels)


def _error_bars(values: list[float], intervals: list[list[float] | None], scale: float) -> list[list[float]]:
    """matplotlib's asymmetric yerr from [low, high] intervals (0 where there is none)."""
    low = [v - scale * i[0] if i else 0.0 for v, i in zip(values, intervals)]
    high = [scale * i[1] - v if i else 0.0 for v, i in zip(values, intervals)]
    return [[max(0.0, x) for x in low], [max(0.0, x) for x in high]]


def _mtbench_plot(figures: Figures, results: dict[str, Any]) -> None:
    if not any(results[s].get("mtbench") for s in figures.systems):
        return
    fig, ax = figures.new(10, 4)
    for i, system in enumerate(figures.systems):
        cats = (results[system].get("mtbench") or {}).get("categories") or {}
        entries = [cats.get(c) or {} for c in MT_BENCH_CATEGORIES]
        figures.bars(ax, i, len(entries), [e.get("score") or 0 for e in entries],
                     [e.get("score_ci") for e in entries], 1, system)
    figures.group_ticks(ax, list(MT_BENCH_CATEGORIES))
    ax.set_ylim(0, 10)  # the grading scale, whatever the scores
    ax.set_ylabel("MT-Bench score (1-10, 95% CI)")
    ax.legend()
    figures.save(fig, "mtbench_categories", "MT-Bench score per category")


def _knowledge_plot(figures: Figures, results: dict[str, Any]) -> None:
    base_knowledge = results.get("base", {})
    if not (base_knowledge.get("mmlu") or base_knowledge.get("arc")):
        return
    fig, ax = figures.new(9, 4)
    labels = [*DOMAINS, "ARC"]
    for i, system in enumerate(s for s in figures.systems if s != "base"):
        versus = [((results[system].get("arc") if label == "ARC" else
                    ((results[system].get("mmlu") or {}).get("domains") or {}).get(label)) or {}).get("vs_base")
                  or {} for label in labels]
        figures.bars(ax, i, len(labels), [100 * v["delta"] if v else 0 for v in versus],
                     [v.get("delta_ci") for v in versus], 100, system)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy − base (points, 95% CI)")
    ax.legend()
    figures.save(fig, "knowledge_delta", "MMLU per domain and ARC: accuracy minus base on the same items")


def _refusal_plot(figures: Figures, results: dict[str, Any]) -> None:
    if not any(results[s].get("jbb") for s in figures.systems):
        return
    fig, ax = figures.new(8, 4)
    keys = [("refusal_harmful", "harmful (judge)"), ("refusal_harmful_keyword", "harmful (keywords)"),
            ("refusal_benign", "benign (judge)"), ("refusal_benign_keyword", "benign (keywords)")]
    everything = []
    for i, system in enumerate(figures.systems):
        jbb = results[system].get("jbb") or {}
        values = [100 * (jbb.get(k) or 0) for k, _ in keys]
        everything += values
        figures.bars(ax, i, len(keys), values, [jbb.get(f"{k}_ci") for k, _ in keys], 100, system)
    figures.group_ticks(ax, [t for _, t in keys])
    ax.set_ylim(0, 100)  # a rate: the full scale, also when every rate is 0
    if not any(everything):
        ax.text(0.5, 0.6, "no refusals", transform=ax.transAxes, ha="center", fontsize=14, color="dimgray")
    ax.set_ylabel("refusal rate (%, 95% CI)")
    ax.legend(loc="upper right")
    figures.save(fig, "refusals", "JailbreakBench refusal rates (harmful: higher is better; benign: lower)")


def _routing_plot(figures: Figures, results: dict[str, Any]) -> None:
    prism = results.get("prism") or {}
    labels, values = [], []
    for bench in ("mmlu", "arc", "jbb"):
        if (prism.get(bench) or {}).get("routing_rate") is not None:
            labels.append(bench)
            values.append(100 * prism[bench]["routing_rate"])
    for category, entry in ((prism.get("mtbench") or {}).get("categories") or {}).items():
        if entry.get("routing_rate") is not None:
            labels.append(f"mt:{category}")
            values.append(100 * entry["routing_rate"])
    if not labels:
        return
    fig, ax = figures.new(10, 4)
    ax.bar(labels, values)
    ax.set_ylabel("% of requests sent to the adapter")
    ax.tick_params(axis="x", rotation=45)
    figures.save(fig, "routing", "PRISM gate: share routed to the adapter per benchmark and MT-Bench category")


def _calibration_plot(figures: Figures, run: RunDir) -> None:
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


def _distill_plot(figures: Figures, run: RunDir) -> None:
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


def _replication_plot(figures: Figures, run: RunDir) -> None:
    table = load_replication(run.path)
    rows = {s: r for s, r in (table or {}).get("rows", {}).items() if r["overall"] is not None}
    if not rows:
        return
    fig, ax = figures.new(7, 3.5)
    values = [r["overall"]["value"] for r in rows.values()]
    intervals = [r["overall"]["ci"] for r in rows.values()]
    ax.bar(list(rows), values, color=[COLORS.get(s) for s in rows], yerr=_error_bars(values, intervals, 1),
           capsize=3, error_kw={"linewidth": 0.8})
    ax.set_ylim(0, 100)
    ax.set_ylabel("Overall (mean of 15 scores, 95% CI)")
    figures.save(fig, "replication_overall", "Replication of the paper's Table 1: Overall per system")


def _plots(results: dict[str, Any], run: RunDir, folder: Path) -> list[tuple[str, Path]]:
    figures = Figures(folder, list(results))
    for plot in (_mtbench_plot, _knowledge_plot, _refusal_plot, _routing_plot, verified_plot):
        plot(figures, results)
    for run_plot in (_calibration_plot, _distill_plot, _replication_plot, kway_plot):
        run_plot(figures, run)
    return figures.made


def _replication_section(run: RunDir) -> list[str]:
    table = load_replication(run.path)
    if table is None:
        return []
    note = f"\n\nNote: {table['too_small']}" if table.get("too_small") else ""
    return ["## Replication of the paper's Table 1 (`prism replicate`)\n\n" + format_replication(table) + note]


def write_report(run_path: str | Path) -> list[Path]:
    run = RunDir(run_path)
    results_path = run.path / "eval" / "results.json"
    if not results_path.is_file():
        raise PrismError(f"{results_path} does not exist: run `prism eval {run.path}` first")
    results = json.loads(results_path.read_text())
    eval_config_path = run.path / "eval" / "eval_config.json"
    eval_config = json.loads(eval_config_path.read_text()) if eval_config_path.is_file() else {}
    plots = _plots(results, run, run.path / "eval" / "plots")
    manifest = run.manifest()
    gate = manifest.get("stages", {}).get("gate", {})
    held = gate.get("heldout_accuracy")
    calibration = load_calibration(run.path)
    limit = eval_config.get("limit")
    if isinstance(limit, dict):
        limit = ",".join(f"{k}={v}" for k, v in limit.items())
    data = ",".join(f"{k}={v}" for k, v in (eval_config.get("data") or {}).items())
    # item ids are many: the report shows how many each benchmark had
    shown_config = eval_config | {"items": {b: len(ids) for b, ids in eval_config.get("items", {}).items()}}
    command = (f"prism eval {run.path} --bench {','.join(eval_config.get('benches', []))} "
               f"--systems {','.join(eval_config.get('systems', []))}" + (f" --limit {limit}" if limit else "")
               + (f" --data {data}" if data else "")
               + "".join(f" --{name.replace('_', '-')} {eval_config[name]}" for name in _REPRODUCED
                         if name in eval_config and eval_config[name] != getattr(EvalConfig, name)))
    summary = [
        f"# PRISM evaluation: {run.path}",
        f"Model: {(manifest.get('model') or {}).get('name')}. Judge: {eval_config.get('judge', 'n/a')}. "
        f"Gate held-out accuracy: {'n/a' if held is None else f'{held:.3f}'} "
        f"({gate.get('heldout_method', 'n/a')}; majority baseline {gate.get('majority_baseline', 'n/a')}).",
        ("Calibrated threshold: " + (f"{calibration['threshold']:.4f} ({calibration['objective']['text']}; "
                                     f"{calibration.get('selection', 'chosen on the items it is reported on')}; "
                                     "the routing curves show the held-out half)"
                                     if calibration else "not calibrated (run `prism calibrate`)")),
        "## Main table\n\nAccuracy and refusal in %, MT-Bench on 1-10; 95% confidence intervals in brackets "
        "(Wilson for proportions, bootstrap for means).\n\n" + results_table(results),
        detail_tables(results),
        *verified_section(results),
        *kway_section(run.path),
        *_replication_section(run),
        "## Reproduce\n\n```\n" + f"prism bootstrap --config <config below> --out {run.path}\n{command}\n"
        f"prism report {run.path}\n```",
        "## Configuration\n\n```json\n" + json.dumps({"bootstrap": manifest.get("config"), "eval": shown_config},
                                                      indent=2) + "\n```",
    ]
    split = len(summary) - 2  # the plots go before Reproduce and Configuration
    markdown = "\n\n".join(summary[:split] + [f"![{title}](plots/{path.name})" for title, path in plots]
                            + summary[split:])
    md_path = run.path / "eval" / "report.md"
    md_path.write_text(markdown + "\n")
    html_path = run.path / "eval" / "report.html"
    html_path.write_text(_html(markdown, plots))
    return [md_path, html_path, *(p for _, p in plots)]


def screenshot(html_path: Path, png_path: Path, width: int = 1200, height: int = 4000) -> Path:
    """Render the report in headless Chromium (Debian package `chromium`) to a PNG, to see what a reader sees."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise PrismError("no Chromium found for --screenshot: install it (Debian: apt-get install chromium)")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--screenshot={png_path}", f"--window-size={width},{height}", html_path.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not png_path.is_file():
        raise PrismError(f"Chromium could not render {html_path}: {result.stderr.strip()[-300:]}")
    return png_path


def _html(markdown: str, plots: list[tuple[str, Path]]) -> str:
    """A small markdown subset (headings, tables, code, images) to one self-contained page."""
    images = {f"plots/{p.name}": base64.b64encode(p.read_bytes()).decode() for _, p in plots}
    body, in_code, table = [], False, []

    def flush_table() -> None:
        if table:
            rows = [r.strip("|").split("|") for r in table if not set(r.replace("|", "")) <= {"-"}]
            head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
                            for r in rows[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            flush_table()
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            body.append(html.escape(line))
        elif line.startswith("|"):
            table.append(line)
        else:
            flush_table()
            if line.startswith("#"):
                level = len(line) - len(line.lstrip("#"))
                body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
            elif line.startswith("!["):
                title, src = line[2:].split("](", 1)
                data = images.get(src.rstrip(")"), "")
                body.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(title)}</figcaption></figure>")
            elif line.strip():
                body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:left}th{background:#f3f3f3}pre{background:#f6f6f6;padding:1em;"
             "overflow:auto;font-size:12px}img{max-width:100%}figcaption{color:#555;font-size:13px}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>PRISM evaluation</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")
