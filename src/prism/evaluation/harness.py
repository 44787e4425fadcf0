"""`prism lm-eval`: a run on lm-evaluation-harness tasks, one harness evaluation per system (base, persona,
lora, prism) through `simple_evaluate` with the run as its model (`PrismLM`), the harness's own metrics and
stderr side by side in OUT/lm_eval.json, with the share of each task's requests the gate routed to an adapter.

The project's tasks `prism_mmlu` and `prism_arc` read the same files `prism eval` reads (../shared/benchmarks
or --data-dir); any other task is the harness's own or a YAML under --include-path. Datasets are read
offline (HF_DATASETS_OFFLINE, unless set otherwise), from local files or the harness's dataset cache.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from prism.config import with_options
from prism.errors import PrismError
from prism.evaluation import data as benchdata
from prism.evaluation.config import HarnessConfig

log = logging.getLogger("prism")

INSTALL_HINT = "pip install 'prism-routing[lm-eval]' (or: pip install 'lm-eval>=0.4.13,<0.5')"
SHIPPED_TASKS = ("prism_mmlu", "prism_arc")  # prism_arc: the group of prism_arc_easy and prism_arc_challenge
SHIPPED_FILES = ("prism_mmlu", "prism_arc", "prism_arc_easy", "prism_arc_challenge")
TASK_FILES = Path(__file__).with_name("harness_tasks")
RESULT_FILE = "lm_eval.json"
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise PrismError(f"prism lm-eval needs EleutherAI's lm-evaluation-harness: {INSTALL_HINT}") from None


def write_task_files(folder: Path, data_dir: str | Path | None) -> Path:
    """The project's task YAMLs with the benchmark data directory filled in; the harness reads `folder`."""
    root = Path(data_dir) if data_dir else benchdata.default_data_dir()
    for name in SHIPPED_FILES:
        text = (TASK_FILES / f"{name}.yaml").read_text()
        (folder / f"{name}.yaml").write_text(text.replace("__BENCHMARKS__", str(root.resolve())))
    return folder


def lm_eval(run: str | Path, config: HarnessConfig | None = None, **options: Any) -> dict[str, Any]:
    """The run on the harness tasks `config.tasks` for each system; writes and returns lm_eval.json's content:
    {"systems": {system: {task: {metric: value}}}, "routing": {task: share of requests on an adapter}}."""
    config = with_options(HarnessConfig, config, **options)
    require_lm_eval()
    offline = {name: "1" for name in OFFLINE_VARIABLES if name not in os.environ}  # what the user set stays
    os.environ.update(offline)  # no hub here: a task's data must be local or in the datasets cache
    try:
        return _evaluate(run, config)
    finally:
        for name in offline:
            os.environ.pop(name, None)


def _evaluate(run: str | Path, config: HarnessConfig) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from prism.evaluation.harness_model import PrismLM
    from prism.inference.loading import load_gated_model

    out = Path(config.out) if config.out else Path(run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prism-tasks-") as shipped:
        paths = [str(write_task_files(Path(shipped), config.data_dir)) if _wants_shipped(config) else None,
                 config.include_path]
        manager = TaskManager(include_path=[p for p in paths if p] or None)
        tasks = _load_tasks(manager, config)
        model = load_gated_model(run, engine=config.engine, routing="binary")  # prism eval's prism: the binary gate
        try:
            table: dict[str, Any] = {"systems": {}, "routing": {}, "tasks": config.tasks,
                                     "limit": config.limit, "num_fewshot": config.num_fewshot}
            for system in config.systems:
                harness_model = PrismLM(system=system, model=model, persona_domain=config.persona_domain,
                                        batch_size=config.batch_size)
                results = simple_evaluate(model=harness_model, tasks=tasks, num_fewshot=config.num_fewshot,
                                          limit=config.limit, task_manager=manager, log_samples=False,
                                          bootstrap_iters=1000)
                table["systems"][system] = _metrics(results)
                if system == "prism":
                    table["routing"] = harness_model.routing_shares()
                (out / RESULT_FILE).write_text(json.dumps(table, indent=2) + "\n")  # each system kept as it ends
        finally:
            model.close()
    return table


def _wants_shipped(config: HarnessConfig) -> bool:
    return any(task in SHIPPED_FILES for task in config.tasks)


def _load_tasks(manager: Any, config: HarnessConfig) -> list[str]:
    """Check each task loads its data (offline) before any model time is spent; a failure names the task."""
    known = set(manager.all_tasks)
    for task in config.tasks:
        if task not in known:
            raise PrismError(f"unknown lm-eval task {task!r}: use {', '.join(SHIPPED_TASKS)}, a task of the harness "
                             "(`lm-eval ls tasks`), or a YAML of your own under --include-path")
        try:
            manager.load([task])
        except Exception as exc:  # the harness and datasets raise many kinds for a missing download
            raise PrismError(
                f"the lm-eval task {task!r} cannot load its data offline ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): put its files on this machine and define it "
                "from them (dataset_path: json, dataset_kwargs.data_files) in a YAML under --include-path, or "
                "download it once with network (HF_DATASETS_OFFLINE=0) into the datasets cache") from None
    return list(config.tasks)


def _metrics(results: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Per task, the harness's metrics as it names them ('acc,none', 'acc_stderr,none', ...)."""
    if not results:
        return {}
    return {task: {name: value for name, value in values.items() if isinstance(value, (int, float))}
            for task, values in results["results"].items()}


def format_table(table: dict[str, Any]) -> str:
    """Systems side by side per task and metric, each value with its stderr; the routing share of prism."""
    systems = list(table["systems"])
    lines = ["| task | metric | " + " | ".join(systems) + " |", "|---|---|" + "---|" * len(systems)]
    tasks = sorted({task for per_task in table["systems"].values() for task in per_task})
    for task in tasks:
        metrics = sorted({name for s in systems for name in table["systems"][s].get(task, {})
                          if "_stderr" not in name})
        for metric in metrics:
            base, _, flt = metric.partition(",")
            stderr = f"{base}_stderr,{flt}" if flt else f"{base}_stderr"
            cells = []
            for system in systems:
                values = table["systems"][system].get(task, {})
                value = values.get(metric)
                cells.append("-" if value is None else f"{value:.4f}" + (
                    f" ± {values[stderr]:.4f}" if isinstance(values.get(stderr), (int, float)) else ""))
            lines.append(f"| {task} | {base} | " + " | ".join(cells) + " |")
    if table.get("routing"):
        lines.append("")
        lines.append("prism routes to an adapter: " + ", ".join(f"{task} {share:.1%}"
                                                               for task, share in sorted(table["routing"].items())))
    return "\n".join(lines)
