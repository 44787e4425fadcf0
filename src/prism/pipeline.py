"""The bootstrap: six stages over one run directory, each skipped when done and resumed when cut short."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prism import answers, distill, gate, personas, queries, verify
from prism.config import BootstrapConfig
from prism.errors import PrismError
from prism.models import load_model
from prism.runs import FILES, STAGES, RunDir, StageContext, now

log = logging.getLogger("prism")

STAGE_FUNCTIONS: dict[str, Callable[[StageContext], dict | None]] = {
    "personas": personas.run,
    "queries": queries.run,
    "answers": answers.run,
    "verify": verify.run,
    "gate": gate.run,
    "distill": distill.run,
}
FINISHED = ("done", "skipped")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("prism-routing", "torch", "transformers", "peft", "safetensors", "tokenizers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def prepare_run_dir(run: RunDir, config: BootstrapConfig, force: bool) -> None:
    """Create the run directory, or check that an existing one was made with this config."""
    if run.exists():
        old = run.manifest()
        old_identity = {k: v for k, v in old.get("config", {}).items() if k in config.identity()}
        differences = config_differences(old_identity, config.identity())
        if not differences:
            return
        if not force:
            raise PrismError(
                f"{run.path} was made with a different config ({'; '.join(differences)}): use another --out, "
                "re-run with the original "
                "settings to resume, or pass --force to start over (the old run is moved aside, not deleted)"
            )
        aside = run.path.with_name(f"{run.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run.path.rename(aside)
        log.warning("--force: moved the previous run to %s", aside)
    elif run.path.exists() and any(run.path.iterdir()):
        raise PrismError(f"{run.path} exists and is not a PRISM run directory: choose an empty or new --out")
    run.save_manifest({
        "prism_version": package_versions()["prism-routing"],
        "created": now(),
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "versions": package_versions(),
        "model": None,
        "stages": {stage: {"status": "pending"} for stage in STAGES},
    })


def bootstrap(config: BootstrapConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage of the PRISM bootstrap into `out`; returns `inspect_run(out)`."""
    run = RunDir(out)
    prepare_run_dir(run, config, force)
    for name in FILES:  # a corrupt record is reported before minutes go into loading a model
        run.read(name)
    todo = [s for s in STAGES if run.stage_status(s) not in FINISHED]
    if not todo:
        log.info("%s: every stage is already done", run.path)
        return inspect_run(run.path)
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.time()
    lm = load_model(config.model, device=config.device, trust_remote_code=config.trust_remote_code)
    manifest = run.manifest()
    manifest["model"] = lm.identity
    manifest["model_load_seconds"] = round(time.time() - started, 2)
    run.save_manifest(manifest)
    ctx = StageContext(run=run, config=config, lm=lm)
    for stage in todo:
        log.info("stage %s", stage)
        previous = run.manifest()["stages"].get(stage, {})
        run.update_stage(stage, status="partial", started=previous.get("started") or now())
        begun = time.time()
        info = STAGE_FUNCTIONS[stage](ctx) or {}
        _check_stage_output(run, config, stage)
        seconds = previous.get("seconds", 0.0) + time.time() - begun
        status = "skipped" if info.get("skipped") else "done"
        run.update_stage(stage, status=status, finished=now(), seconds=round(seconds, 2), **info)
    return inspect_run(run.path)


def _check_stage_output(run: RunDir, config: BootstrapConfig, stage: str) -> None:
    if stage == "queries":
        kept = queries.kept_queries(run.read("queries"))
        if not kept:
            raise PrismError("the model wrote no usable query (all too short or duplicates): try another --seed, "
                             "more --query-max-tokens, or a larger model")
        per_persona = Counter(q["persona_id"] for q in kept)
        short = [f"{p['id']}={per_persona[p['id']]}" for p in run.read("personas")
                 if per_persona[p["id"]] < config.queries_per_persona]
        if short:
            log.warning("fewer queries than asked for some personas: %s", ", ".join(short))


def inspect_run(path: str | Path) -> dict[str, Any]:
    """What a run holds: stage status, record counts, gate, adapter and distillation metrics."""
    run = RunDir(path)
    manifest = run.manifest()
    stages = manifest.get("stages", {})
    labels = run.read("labels")
    query_records = run.read("queries")
    summary: dict[str, Any] = {
        "path": str(run.path),
        "stages": {s: stages.get(s, {}).get("status", "pending") for s in STAGES},
        "counts": {
            "personas": len(run.read("personas")),
            "query_candidates": len(query_records),
            "queries": len(queries.kept_queries(query_records)),
            "answers": len(run.read("answers")),
            "judgments": len(run.read("judgments")),
            "distill": sum(1 for r in labels if r["label"] == 1),
            "retain": sum(1 for r in labels if r["label"] == 0),
        },
        "seconds": {s: stages.get(s, {}).get("seconds") for s in STAGES},
        "model": (manifest.get("model") or {}).get("name", manifest.get("config", {}).get("model")),
        "config_fingerprint": manifest.get("config_fingerprint"),
    }
    gate_info = stages.get("gate", {})
    summary["gate"] = {k: gate_info.get(k) for k in (
        "kind", "heldout_accuracy", "heldout_balanced_accuracy", "heldout_method", "train_accuracy",
        "majority_baseline", "examples", "positives", "constant_route") if k in gate_info}
    distill_info = stages.get("distill", {})
    summary["adapter"] = {k: distill_info.get(k) for k in ("trainable_params", "share_of_base") if k in distill_info}
    summary["distill"] = {k: distill_info.get(k) for k in ("loss_first", "loss_last", "steps", "examples", "skipped")
                          if k in distill_info}
    summary["files"] = {name: (run.path / file).is_file() for name, file in FILES.items()}
    summary["files"].update(adapter=(run.path / "adapter" / "adapter_model.safetensors").is_file(),
                            gate=(run.path / "gate" / "gate.safetensors").is_file())
    return summary
