"""The bootstrap: seven stages over one run directory, each skipped when done and resumed when cut short."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prism.config import (
    BEFORE_THE_FIELD,
    GATE_FIELDS,
    JUDGE_FIELDS,
    ROUTING_FIELDS,
    BootstrapConfig,
    identity_of,
    with_new_defaults,
)
from prism.engines.base import Engine
from prism.engines.local import LocalEngine
from prism.errors import PrismError
from prism.lm.gate import GATE_CONFIG
from prism.lm.models import LoadedModel, load_model
from prism.runs import (
    ADAPTER_DIR,
    ADAPTER_OUTCOMES,
    EVAL_DIR,
    EXPORT_DIR,
    FILES,
    FINISHED,
    GATE_DIR,
    JUDGED_OUTPUTS,
    KWAY_ADAPTERS,
    KWAY_DIR,
    KWAY_GATE,
    STAGES,
    RunDir,
    adapter_dir,
    has_adapter_weights,
    move_aside,
    now,
    set_aside,
)
from prism.stages import adapter_outcomes, answers, distill, gate, personas, queries, verify
from prism.stages.context import StageContext
from prism.stages.inspect import inspect_run

log = logging.getLogger("prism")

STAGE_FUNCTIONS: dict[str, Callable[[StageContext], dict | None]] = {
    "personas": personas.run,
    "queries": queries.run,
    "answers": answers.run,
    "verify": verify.run,
    "distill": distill.run,
    "adapter_outcomes": adapter_outcomes.run,
    "gate": gate.run,
}
ENGINE_KEY_ENV = "PRISM_ENGINE_API_KEY"


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


def as_the_run_was_made(run: RunDir, config: BootstrapConfig, force: bool) -> BootstrapConfig:
    """The config an existing run resumes with: a field the run predates, whose change would need --force (the
    query writer's top_p), left at today's default, takes the value the run had (BEFORE_THE_FIELD), so the same
    command resumes it as it was made. Fields whose change redoes only later stages (gate_labels) stay as asked."""
    if force or not run.exists():
        return config
    recorded = run.manifest().get("config", {})
    defaults = BootstrapConfig()
    kept = {name: old for name, old in BEFORE_THE_FIELD.items()
            if name not in recorded and name not in GATE_FIELDS | JUDGE_FIELDS | ROUTING_FIELDS
            and getattr(config, name) == getattr(defaults, name)}
    return dataclasses.replace(config, **kept) if kept else config


def prepare_run_dir(run: RunDir, config: BootstrapConfig, force: bool) -> None:
    """Create the run directory, or check that an existing one was made with this config."""
    if run.exists():
        old = run.manifest()
        # the identity recorded when the run was made (its input files' digests: the files may have moved since), over
        # what its recorded config says today (fields added since, and runs made before identities were recorded)
        recorded = with_new_defaults(old.get("config", {}))
        identity = config.identity()
        old_identity = {k: v for k, v in {**identity_of(recorded), **old.get("config_identity", {})}.items()
                        if k in identity}
        differences = config_differences(old_identity, identity)
        if not differences:
            changed_code = changed_verifiers(old, config)
            if changed_code:  # the same spec, other code: the verdicts it made are out of date
                change_judge(run, old, config, [], reason=f"the code of {', '.join(changed_code)} changed")
            return
        changed = {k for k in set(old_identity) | set(identity) if old_identity.get(k) != identity.get(k)}
        if changed <= ROUTING_FIELDS and not force:
            change_routing(run, old, config)
            return
        if changed <= GATE_FIELDS and not force:
            change_gate(run, old, config, sorted(changed))
            return
        if changed <= ROUTING_FIELDS | JUDGE_FIELDS and not force:
            change_judge(run, old, config, sorted(changed & JUDGE_FIELDS))
            return
        if not force:
            raise PrismError(
                f"{run.path} was made with a different config ({'; '.join(differences)}): use another --out, "
                "re-run with the original "
                "settings to resume, or pass --force to start over (the old run is moved aside, not deleted)"
            )
        aside = move_aside(run.path)
        log.warning("--force: moved the previous run to %s", aside)
    elif run.path.exists() and any(run.path.iterdir()):
        raise PrismError(f"{run.path} exists and is not a PRISM run directory: choose an empty or new --out")
    run.save_manifest({
        "prism_version": package_versions()["prism-routing"],
        "created": now(),
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "config_identity": config.identity(),
        "versions": package_versions(),
        "model": None,
        "stages": {stage: {"status": "pending"} for stage in STAGES},
    })


def change_routing(run: RunDir, manifest: dict[str, Any], config: BootstrapConfig) -> None:
    """A run asked for with another routing (binary <-> kway, or another kway_min_wins): the personas,
    queries, answers and verdicts do not depend on it and are kept. The k-way gate and adapters of the old
    setting are moved aside; to go k-way, the gate and distill stages run again for the k-way part (the
    binary gate, with its threshold, and the binary adapter, made from the same labels, are kept)."""
    old = with_new_defaults(manifest["config"])
    if (run.path / KWAY_DIR).exists():
        move_aside(run.path / KWAY_DIR)
    stages = manifest["stages"]
    distill_info = stages.get("distill", {})
    for info in (stages.get("gate", {}), distill_info):
        for key in [k for k in info if k.startswith("kway")]:
            del info[key]
    if config.routing == "kway":
        def metrics(info: dict[str, Any], kept: str) -> dict[str, Any]:
            return {k: v for k, v in info.items() if k not in ("status", "started", "finished", "seconds", "engine",
                                                               kept)}

        gate_info = stages.get("gate", {})
        gate_done = gate_info.get("status") == "done" and (run.path / GATE_DIR / GATE_CONFIG).is_file()
        done = distill_info.get("status") == "done" and has_adapter_weights(adapter_dir(run.path))
        stages["gate"] = {"status": "pending", **({"binary_gate": metrics(gate_info, "binary_gate")}
                                                  if gate_done else {})}
        stages["distill"] = {"status": "pending", **({"binary_adapter": metrics(distill_info, "binary_adapter")}
                                                     if done else {})}
    manifest["config"] = config.to_dict()
    manifest["config_fingerprint"] = config.fingerprint()
    manifest["config_identity"] = config.identity()
    run.save_manifest(manifest)
    def routing(values: dict[str, Any]) -> str:
        return f"kway (min wins {values['kway_min_wins']})" if values["routing"] == "kway" else "binary"

    log.warning("%s: routing %s -> %s: the personas, queries, answers and verdicts are kept%s", run.path,
                routing(old), routing(config.to_dict()),
                "; the gate and distill stages run again for the k-way part" if config.routing == "kway" else "")


def change_gate(run: RunDir, manifest: dict[str, Any], config: BootstrapConfig, changed: list[str]) -> None:
    """A run asked for with other gate settings: its personas, queries, answers and labels are kept; its gates and
    eval records are set aside in RUN/replaced-<time>/ and the gate stage runs again; with another gate layer the
    adapters (and their exports) too, since they train only on the blocks above it."""
    old = with_new_defaults(manifest["config"])
    names, stages = [GATE_DIR, EVAL_DIR], ["gate"]
    if "gate_layer" in changed:
        names += [ADAPTER_DIR, KWAY_DIR, EXPORT_DIR, FILES["distill_log"], *ADAPTER_OUTCOMES,
                  *(p.name for p in run.path.glob(f"{distill.CHECKPOINT}*"))]
        stages += ["distill", "adapter_outcomes"]
    elif "gate_labels" in changed:  # the same adapter: answers and verdicts already made for it are kept
        stages.append("adapter_outcomes")
    elif (run.path / KWAY_GATE).exists():
        names.append(KWAY_GATE)
    aside = set_aside(run.path, names)
    stages = [s for s in STAGES if s in stages]
    for stage in stages:
        manifest["stages"][stage] = {"status": "pending"}
    manifest["config"] = config.to_dict()
    manifest["config_fingerprint"] = config.fingerprint()
    manifest["config_identity"] = config.identity()
    run.save_manifest(manifest)
    changes = "; ".join(f"{k}: {old.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
    log.warning("%s: %s: everything up to the labels is kept; %s run again%s", run.path, changes,
                " and ".join(stages), f" (the old outputs are in {aside})" if aside else "")


def changed_verifiers(manifest: dict[str, Any], config: BootstrapConfig) -> list[str]:
    """The user verifiers whose code differs from the code the run's verdicts were made with."""
    verify_info = manifest.get("stages", {}).get("verify", {})
    if config.judge != "verifier" or verify_info.get("status") != "done":
        return []
    recorded = verify_info.get("verifier_sources", {})
    return [spec for spec, digest in verify.verifier_sources(config).items() if recorded.get(spec) != digest]


def change_judge(run: RunDir, manifest: dict[str, Any], config: BootstrapConfig, changed: list[str],
                 reason: str | None = None) -> None:
    """A run asked for with another judge (or judge setting): its personas, queries and answers do not depend on
    it and are kept; the verdicts, labels, gate, adapters, exports and eval records do, and are set aside in
    RUN/replaced-<time>/ while verify and every stage after it run again."""
    old = with_new_defaults(manifest["config"])
    aside = set_aside(run.path, [*JUDGED_OUTPUTS, *(p.name for p in run.path.glob(f"{distill.CHECKPOINT}*"))])
    for stage in STAGES[STAGES.index("verify"):]:
        manifest["stages"][stage] = {"status": "pending"}
    manifest["config"] = config.to_dict()
    manifest["config_fingerprint"] = config.fingerprint()
    manifest["config_identity"] = config.identity()
    run.save_manifest(manifest)
    changes = reason or "; ".join(f"{k}: {old.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
    log.warning("%s: %s: the personas, queries and answers are kept; verify and the stages after it run again%s",
                run.path, changes,
                f" (the old verdicts, labels, gate, adapter and eval records are in {aside})" if aside else "")


AFTER_DISTILL = STAGES[STAGES.index("distill") + 1:]  # they read the adapter: a new one makes them run again
# Stages that only generate text or judge: an OpenAI-compatible server can run them.
ENGINE_STAGES = ("personas", "queries", "answers", "verify")


def make_engine(config: BootstrapConfig, api_key: str | None = None) -> Engine | None:
    """The engine the config names, or None for the local model with transformers."""
    if config.engine == "llamacpp":
        return _llamacpp_engine(config)
    if config.engine != "openai":
        return None
    from prism.engines.openai import OpenAIEngine

    assert config.base_url and config.engine_model  # BootstrapConfig.validate checked both
    return OpenAIEngine(config.base_url, config.engine_model, api_key=api_key or os.environ.get(ENGINE_KEY_ENV),
                        concurrency=config.engine_concurrency, timeout_s=config.engine_timeout,
                        max_retries=config.engine_max_retries)


def _llamacpp_engine(config: BootstrapConfig) -> Engine | None:
    from transformers import AutoTokenizer

    from prism.engines.llamacpp import LlamaCppEngine
    from prism.lm.llama import resolve_backend
    from prism.lm.models import resolve_model

    if resolve_backend("llamacpp", config.model, config.gguf) != "llamacpp":
        return None  # llama-cpp-python is missing: resolve_backend warned, transformers runs the stages
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model)[0],
                                              trust_remote_code=config.trust_remote_code)
    return LlamaCppEngine.open(config.model, tokenizer, gguf=config.gguf, n_threads=config.threads or None,
                               slots=config.batch_size, gguf_weights=config.gguf_weights)


def bootstrap(config: BootstrapConfig, out: str | Path, force: bool = False, api_key: str | None = None
              ) -> dict[str, Any]:
    """Run (or resume) every stage of the PRISM bootstrap into `out`; returns `inspect_run(out)`.
    With `config.engine == "openai"` the generating stages run on that server (`api_key`, default
    $PRISM_ENGINE_API_KEY) and the model is loaded here only for the gate and distill stages."""
    run = RunDir(out)
    state = distill.distributed_state(config.device)
    if not state.is_main_process:  # under `accelerate launch`: only the distill stage is shared
        return _join_distill(run, config, state)
    config = as_the_run_was_made(run, config, force)
    prepare_run_dir(run, config, force)
    for name in FILES:  # a corrupt record is reported before minutes go into loading a model
        run.read(name)
    todo = [s for s in STAGES if run.stage_status(s) not in FINISHED]
    if not todo:
        log.info("%s: every stage is already done", run.path)
        return inspect_run(run.path)
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = StageContext(run=run, config=config, engine=make_engine(config, api_key))
    try:
        for stage in todo:
            if stage not in ENGINE_STAGES and hasattr(ctx.engine, "close"):
                ctx.engine.close()  # the stages left train on the local model: free llama.cpp's weights and caches
                ctx.engine = None
            skipped = adapter_outcomes.skip_reason(config, run) if stage == "adapter_outcomes" else None
            if ctx.lm is None and (ctx.engine is None or stage not in ENGINE_STAGES) and skipped is None:
                _load_local_model(ctx)
            if stage == "distill" and state.num_processes > 1:
                distill_run(run.path, lm=ctx.lm)  # the same steps the other processes take
                continue
            log.info("stage %s", stage)
            previous = run.manifest()["stages"].get(stage, {})
            run.update_stage(stage, status="partial", started=previous.get("started") or now())
            begun = time.time()
            info = STAGE_FUNCTIONS[stage](ctx) or {}
            _check_stage_output(run, config, stage)
            seconds = previous.get("seconds", 0.0) + time.time() - begun
            status = "skipped" if info.get("skipped") else "done"
            engine = (ctx.generator.describe() if stage in ENGINE_STAGES else {} if skipped is not None else
                      {"kind": "transformers", "model": ctx.model.identity.get("name")})
            run.update_stage(stage, status=status, finished=now(), seconds=round(seconds, 2), engine=engine, **info)
    finally:  # an error or Ctrl-C leaves no llama.cpp context behind (the CLI may go on, a test surely does)
        if hasattr(ctx.engine, "close"):
            ctx.engine.close()
    return inspect_run(run.path)


def _process_device(config: BootstrapConfig) -> str:
    """Each process of `accelerate launch` gets its own device; a single process uses the config's."""
    state = distill.distributed_state(config.device)
    return str(state.device) if state.num_processes > 1 else config.device


def _join_distill(run: RunDir, config: BootstrapConfig, state: Any) -> dict[str, Any]:
    """A non-main process of a launched bootstrap: wait while the main process runs the stages before
    distill (polling the manifest, since those can take hours and a collective wait would time out),
    then take its share of the distillation."""
    log.info("process %d: waiting for the main process to finish the stages before distill", state.process_index)
    before = STAGES[: STAGES.index("distill")]
    while not (run.exists() and all(run.stage_status(s) in FINISHED for s in before)):
        time.sleep(2)
    return distill_run(run.path)


def distill_run(out: str | Path, force: bool = False, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Run (or re-run with `force`) the distill stage of a run whose earlier stages are done: the entry
    point for `accelerate launch -m prism.cli distill RUN`, which trains data parallel. Every process
    calls it; only the main one writes the manifest, the log and the adapter."""
    run = RunDir(out)
    config = BootstrapConfig(**with_new_defaults(run.manifest()["config"]))
    unfinished = [s for s in STAGES[: STAGES.index("distill")] if run.stage_status(s) not in FINISHED]
    if unfinished:
        raise PrismError(f"{run.path}: the stages {', '.join(unfinished)} are not done yet: run "
                         f"`prism bootstrap --out {run.path}` (with the same options) first")
    state = distill.distributed_state(config.device)
    if run.stage_status("distill") in FINISHED and not force:
        log.info("%s: distill is already done (pass --force to train the adapter again)", run.path)
        return inspect_run(run.path)
    if force and state.is_main_process:
        for adapters in (ADAPTER_DIR, KWAY_ADAPTERS):
            if (run.path / adapters).exists():
                aside = move_aside(run.path / adapters)
                log.info("moved the previous adapter(s) to %s", aside)
        for checkpoint in run.path.glob(f"{distill.CHECKPOINT}*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
        run.update_stage("distill", binary_adapter=None, kway_adapters={})
        aside = set_aside(run.path, ADAPTER_OUTCOMES)  # the old adapter's answers and verdicts: the new one's differ
        if aside:
            log.info("moved the previous adapter's answers and verdicts to %s", aside)
        manifest = run.manifest()
        manifest["stages"].update({stage: {"status": "pending"} for stage in AFTER_DISTILL})
        run.save_manifest(manifest)
    state.wait_for_everyone()
    ctx = StageContext(run=run, config=config)
    ctx.lm = lm or load_model(config.model, device=_process_device(config), trust_remote_code=config.trust_remote_code)
    if state.is_main_process:
        run.update_stage("distill", status="partial", started=now())
    begun = time.time()
    info = distill.run(ctx) or {}
    if state.is_main_process:
        status = "skipped" if info.get("skipped") else "done"
        run.update_stage("distill", status=status, finished=now(), seconds=round(time.time() - begun, 2),
                         engine={"kind": "transformers", "model": ctx.model.identity.get("name"),
                                 "processes": state.num_processes}, **info)
        left = [s for s in AFTER_DISTILL if run.stage_status(s) not in FINISHED]
        if left:
            log.warning("%s: %s still to run after distill: `prism bootstrap --out %s` (with the same options) "
                        "finishes the run", run.path, " and ".join(left), run.path)
    state.wait_for_everyone()
    return inspect_run(run.path)


def _load_local_model(ctx: StageContext) -> None:
    config, run = ctx.config, ctx.run
    started = time.time()
    ctx.lm = load_model(config.model, device=_process_device(config), trust_remote_code=config.trust_remote_code)
    if ctx.engine is None:
        ctx.engine = LocalEngine(ctx.lm)
    manifest = run.manifest()
    manifest["model"] = ctx.lm.identity
    manifest["model_load_seconds"] = round(time.time() - started, 2)
    run.save_manifest(manifest)


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
