"""`prism report`: eval/report.md and a self-contained eval/report.html (plots inlined) from results.json."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from prism.errors import PrismError
from prism.evaluation.calibrate import load_calibration
from prism.evaluation.config import EvalConfig
from prism.evaluation.harness import RESULT_FILE as HARNESS_RESULT_FILE
from prism.evaluation.harness import format_table as format_harness_table
from prism.evaluation.plots import (
    Figures,
    calibration_plot,
    distill_plot,
    knowledge_plot,
    mtbench_plot,
    refusal_plot,
    replication_plot,
    routing_plot,
)
from prism.evaluation.replication import format_replication, load_replication
from prism.evaluation.results import Results
from prism.evaluation.routing_comparison import kway_plot, kway_section
from prism.evaluation.tables import detail_tables, results_table
from prism.evaluation.verified import verified_plot, verified_section
from prism.runs import EVAL_DIR, RunDir

# eval settings that change results: the reproduce command names them when they differ from the default
_REPRODUCED = ("scoring", "mtbench_max_tokens", "jbb_max_tokens", "judge_base_url", "judge_model")
RESULT_PLOTS = (mtbench_plot, knowledge_plot, refusal_plot, routing_plot, verified_plot)  # from results.json
RUN_PLOTS = (calibration_plot, distill_plot, replication_plot, kway_plot)  # from the run's own records


def _plots(results: Results, run: RunDir, folder: Path) -> list[tuple[str, Path]]:
    figures = Figures(folder, results.systems)
    for plot in RESULT_PLOTS:
        plot(figures, results)
    for run_plot in RUN_PLOTS:
        run_plot(figures, run)
    return figures.made


def _replication_section(run: RunDir) -> list[str]:
    table = load_replication(run.path)
    if table is None:
        return []
    note = f"\n\nNote: {table['too_small']}" if table.get("too_small") else ""
    return ["## Replication of the paper's Table 1 (`prism replicate`)\n\n" + format_replication(table) + note]


def _harness_section(run: RunDir) -> list[str]:
    path = run.path / EVAL_DIR / HARNESS_RESULT_FILE
    if not path.is_file():
        return []
    return ["## lm-evaluation-harness (`prism lm-eval`)\n\nThe harness's own metrics, ± its stderr.\n\n"
            + format_harness_table(json.loads(path.read_text()))]


def write_report(run_path: str | Path) -> list[Path]:
    run = RunDir(run_path)
    results = Results.load(run.path)
    eval_config_path = run.path / EVAL_DIR / "eval_config.json"
    eval_config = json.loads(eval_config_path.read_text()) if eval_config_path.is_file() else {}
    plots = _plots(results, run, run.path / EVAL_DIR / "plots")
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
        *_harness_section(run),
        "## Reproduce\n\n```\n" + f"prism bootstrap --config <config below> --out {run.path}\n{command}\n"
        f"prism report {run.path}\n```",
        "## Configuration\n\n```json\n" + json.dumps({"bootstrap": manifest.get("config"), "eval": shown_config},
                                                      indent=2) + "\n```",
    ]
    split = len(summary) - 2  # the plots go before Reproduce and Configuration
    markdown = "\n\n".join(summary[:split] + [f"![{title}](plots/{path.name})" for title, path in plots]
                            + summary[split:])
    md_path = run.path / EVAL_DIR / "report.md"
    md_path.write_text(markdown + "\n")
    html_path = run.path / EVAL_DIR / "report.html"
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
