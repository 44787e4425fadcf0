"""`prism` command line: a thin mirror of the Python API (bootstrap, inspect_run, PrismModel, serve)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prism.config import JUDGES, BootstrapConfig, load_config_file, resolve_config
from prism.errors import PrismError
from prism.evaluation.calibrate import Objective, format_calibration
from prism.evaluation.config import EvalConfig
from prism.evaluation.replicate import ReplicateConfig
from prism.inference.base import ROUTES
from prism.library_warnings import silence_library_warnings
from prism.stages.inspect import format_summary, inspect_run

DEFAULT_OUT = "runs/prism"


def _flag_type(hint: Any) -> tuple[Any, bool]:
    """(argparse type, is_list) of a config field type such as int, str | None, list[str]."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return str, True
    return hint, False


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING and field.default not in (None, ""):
        return f" (default {field.default})"
    value = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
    if value:
        return f" (default {','.join(value) if isinstance(value, list) else value})"
    return ""


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_class: type,
                     show_defaults: bool = True) -> None:
    """One flag per field of a config dataclass, named, typed and explained by the field (config.option).
    Unset flags stay None (or the field's environment variable), so the dataclass's own defaults apply."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if meta.get("cli") is False:  # a Python-only field
            continue
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        kind, is_list = _flag_type(hints[field.name])
        help_text = meta.get("help", "") + (_default_text(field) if show_defaults else "")
        default = os.environ.get(meta["env"]) if "env" in meta else None
        if "env" in meta:
            help_text += f" (default ${meta['env']})"
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action="store_true", default=None, help=help_text)
        elif is_list:
            parser.add_argument(flag, dest=field.name, type=_comma_list, default=default,
                                help=help_text + " (comma-separated)")
        else:
            # a parser raises PrismError, which argparse would not report: it runs in config_from_flags
            kind = str if "parse" in meta else kind
            parser.add_argument(flag, dest=field.name, type=kind, default=default, choices=meta.get("choices"),
                                help=help_text)


def flag_values(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The config fields given on the command line (parsed where the field has a parser)."""
    values = {}
    for field in dataclasses.fields(config_class):
        if field.metadata.get("cli") is False:
            continue
        value = getattr(args, field.name)
        if value is not None:
            values[field.name] = field.metadata["parse"](value) if "parse" in field.metadata else value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM: persona routing via intent-based self-modeling")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    boot = commands.add_parser("bootstrap", help="personas -> queries -> answers -> verify -> gate -> adapter")
    boot.add_argument("--config", help="YAML file of options (same names as the flags)")
    boot.add_argument("--out", help=f"run directory (default {DEFAULT_OUT}); re-running resumes it")
    boot.add_argument("--force", action="store_true", help="start over when --out holds a run with another config")
    boot.add_argument("--api-key", help="the openai engine's API key (default $PRISM_ENGINE_API_KEY; never saved)")
    add_config_flags(boot.add_argument_group("bootstrap options (each overrides --preset and --config)"),
                     BootstrapConfig, show_defaults=False)

    teach = commands.add_parser("distill", help="train (or retrain) a run's adapter; data parallel under "
                                "`accelerate launch -m prism.cli distill RUN`")
    teach.add_argument("run", help="a run whose stages before distill are done")
    teach.add_argument("--force", action="store_true", help="train again (the old adapter is moved aside)")

    show = commands.add_parser("inspect", help="what a run directory holds: stages, counts, metrics")
    show.add_argument("run", help="run directory")
    show.add_argument("--json", action="store_true", help="print one JSON object")

    add_serving_commands(commands)
    add_evaluation_commands(commands)
    return parser


def add_serving_commands(commands: argparse._SubParsersAction) -> None:
    talk = commands.add_parser("chat", help="chat in the terminal with a run's gated model")
    add_model_flags(talk)
    add_engine_flags(talk)
    talk.add_argument("--route", default="auto", help=f"start pinned to a route: {', '.join(ROUTES)}, or a k-way "
                      "persona's name (default auto)")
    talk.add_argument("--system", help="a system message for the whole conversation")
    talk.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens (default 512)")
    talk.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    talk.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    talk.add_argument("--seed", type=int, help="sampling seed, for reproducible answers")

    server = commands.add_parser("serve", help="serve a run's gated model behind an OpenAI-compatible API")
    add_model_flags(server)
    add_engine_flags(server)
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this machine only)")
    server.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    server.add_argument("--api-key", default=os.environ.get("PRISM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $PRISM_API_KEY; none = open)")
    server.add_argument("--max-batch-size", type=int, default=32, help="requests generated together (default 32)")
    server.add_argument("--max-model-len", type=int, help="context window in tokens (default: the model's)")
    server.add_argument("--default-max-tokens", type=int, default=512,
                        help="completion length when a request gives no max_tokens (default 512)")
    server.add_argument("--request-log", metavar="FILE", help="append one JSON line per request (route, gate "
                        "probability, threshold, tokens, latency, status) to FILE, for audits and recalibration")
    server.add_argument("--log-prompts", action="store_true", help="with --request-log: also log each request's "
                        "messages (off by default: prompts may hold private data)")
    sidecar = server.add_argument_group("routing sidecar (the model runs upstream, e.g. vLLM with --enable-lora; "
                                        "`prism export vllm RUN` prints both commands)")
    sidecar.add_argument("--upstream", help="an OpenAI-compatible server's /v1 URL: load only the gate's inputs "
                         "here and forward each request there under the route's model name")
    sidecar.add_argument("--upstream-base-model", help="the base model's name on the upstream server")
    sidecar.add_argument("--upstream-adapter-model", help="the adapter's name on the upstream server (its LoRA "
                         "module); a k-way run's persona adapters are NAME-<persona> there")
    sidecar.add_argument("--upstream-api-key", default=os.environ.get("PRISM_UPSTREAM_API_KEY"),
                         help="default $PRISM_UPSTREAM_API_KEY")

    export = commands.add_parser("export", help="a run for other engines: its adapter as llama.cpp GGUF, or the "
                                 "commands to serve it with vLLM")
    export.add_argument("target", choices=("gguf", "vllm"),
                        help="gguf: RUN/gguf/adapter.gguf (llama.cpp LoRA) and, with --merged, persona.gguf; "
                        "vllm: the vLLM multi-LoRA server and the PRISM sidecar commands")
    export.add_argument("run", help="a finished run directory")
    export.add_argument("--gguf", help="gguf: the base model's GGUF (default: the embedded model's own file)")
    export.add_argument("--merged", action="store_true",
                        help="gguf: also write the persona model with the adapter merged in (no LoRA cost per token)")
    export.add_argument("--merged-type", choices=("q8_0", "f16", "f32"), default="q8_0",
                        help="gguf: the merged tensors' type (default q8_0; the other tensors keep the base's)")
    export.add_argument("--port", type=int, default=8000, help="vllm: the sidecar's port (vLLM gets port + 1)")


def add_evaluation_commands(commands: argparse._SubParsersAction) -> None:
    evaluation = commands.add_parser("eval", help="MMLU, ARC, MT-Bench and JailbreakBench for base, persona, "
                                     "lora and prism; results in RUN/eval/results.json")
    evaluation.add_argument("run", help="a bootstrapped run directory")
    add_config_flags(evaluation, EvalConfig)
    evaluation.add_argument("--device", default="auto")
    evaluation.add_argument("--trust-remote-code", action="store_true")

    tune = commands.add_parser("calibrate", help="pick the gate threshold from the eval records and save it in the run")
    tune.add_argument("run", help="a run directory that has been through `prism eval` (base, lora and prism)")
    add_config_flags(tune, Objective)
    tune.add_argument("--no-save", action="store_true", help="only report; leave the run's threshold as it is")
    tune.add_argument("--routing", choices=("binary", "kway"), default="binary",
                      help="which gate: binary (base, lora, prism records) or kway (base, kway-lora, kway records)")

    versus = commands.add_parser("ab", help="persona A/B test on your own queries: answers with and without it, "
                                 "judged in both orders, win/loss/tie per category")
    versus.add_argument("--persona", required=True, help="a text file holding the persona (system prompt)")
    versus.add_argument("--queries", required=True, help="JSONL, one {\"query\": ..., \"category\": ...} per line")
    versus.add_argument("--model", default="embedded", help="Hub id, local path, or 'embedded' (default)")
    versus.add_argument("--out", help="where answers and verdicts go (default runs/ab-<persona file name>); "
                        "re-running resumes")
    versus.add_argument("--max-tokens", type=int, default=256, help="answer length (default 256)")
    versus.add_argument("--judge", choices=JUDGES, default="pairwise",
                        help="pairwise (both orders), pointwise (each answer rated alone) or verifier (--verifier)")
    versus.add_argument("--verifier", help="with --judge verifier: max-words:N, min-words:N, json, numbered-steps:N, "
                        "refusal, regex:PATTERN or module:function")
    versus.add_argument("--judge-calibration", choices=("position", "none"), default="position")
    versus.add_argument("--batch-size", type=int, default=16)
    versus.add_argument("--seed", type=int, default=0)
    versus.add_argument("--device", default="auto")

    again = commands.add_parser("replicate", help="the paper's experiment on a model: bootstrap with its protocol, "
                                "evaluate five systems on MT-Bench, MMLU and three safety sets, its Table 1")
    add_config_flags(again, ReplicateConfig)
    again.add_argument("--dry-run", action="store_true", help="print the estimate of the work and time, then stop")
    again.add_argument("--status", action="store_true", help="show which parts of --out are done, then stop")

    report = commands.add_parser("report", help="RUN/eval/report.md and report.html with plots, from results.json")
    report.add_argument("run", help="a run directory that has been through `prism eval`")
    report.add_argument("--screenshot", action="store_true",
                        help="also render report.html in headless Chromium to eval/report.png")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a bootstrapped run directory (adapter + gate)")
    parser.add_argument("--threshold", type=float, help="route to the adapter when P(persona) >= this "
                        "(default: the run's saved threshold)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the Hub")
    parser.add_argument("--routing", choices=("auto", "binary", "kway"), default="auto",
                        help="which gate routes: binary (base or the adapter), kway (base or one persona's adapter; a "
                        "run bootstrapped with --routing kway) or auto (default: kway when the run has it)")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("auto", "llamacpp", "transformers"), default="auto",
                        help="auto (default): llama.cpp when the model is GGUF (the embedded default, or --gguf) and "
                        "llama-cpp-python is installed, else transformers")
    parser.add_argument("--gguf", help="llamacpp: the GGUF of the run's base model (default: the embedded model's, "
                        "or the one `prism export gguf --gguf` recorded)")
    parser.add_argument("--persona-model", choices=("auto", "merged", "lora"), default="auto",
                        help="llamacpp: the persona route on the merged persona GGUF (`prism export gguf --merged`) "
                        "or on the base GGUF with the LoRA; auto takes the merged one when it exists")
    parser.add_argument("--threads", type=int, help="llamacpp: CPU threads (default: every core this process may use)")


def _load_gated(args: argparse.Namespace, max_model_len: int | None = None) -> Any:
    from prism.inference.loading import load_gated_model

    return load_gated_model(args.run, engine=args.engine, gguf=args.gguf, threshold=args.threshold,
                            device=args.device, max_model_len=max_model_len, threads=args.threads,
                            persona_model=args.persona_model, trust_remote_code=args.trust_remote_code,
                            routing=args.routing)


def run_bootstrap(args: argparse.Namespace) -> None:
    from prism.stages.pipeline import bootstrap

    file_values = load_config_file(args.config) if args.config else {}
    out = args.out or file_values.pop("out", None) or DEFAULT_OUT
    config = resolve_config(file_values, **flag_values(args, BootstrapConfig))
    print(format_summary(bootstrap(config, out, force=args.force, api_key=args.api_key)))


def run_distill(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from prism.stages.pipeline import distill_run

    summary = distill_run(args.run, force=args.force)
    if PartialState().is_main_process:  # the state distill_run set up: one summary per launch
        print(format_summary(summary))


def run_inspect(args: argparse.Namespace) -> None:
    summary = inspect_run(args.run)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


def run_chat(args: argparse.Namespace) -> None:
    from prism.lm.decoding import SamplingParams
    from prism.serving.chat import chat

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    chat(_load_gated(args), params, route=args.route, system=args.system)


def run_eval(args: argparse.Namespace) -> None:
    from prism.evaluation.report import results_table
    from prism.evaluation.runner import evaluate

    results = evaluate(args.run, EvalConfig(**flag_values(args, EvalConfig)), device=args.device,
                       trust_remote_code=args.trust_remote_code)
    print(results_table(results))


def run_calibrate(args: argparse.Namespace) -> None:
    from prism.evaluation.calibrate import calibrate

    result = calibrate(args.run, Objective(**flag_values(args, Objective)), save=not args.no_save,
                       routing=args.routing)
    print(format_calibration(result))


def run_ab(args: argparse.Namespace) -> None:
    from prism.evaluation.persona_ab import format_ab, persona_ab, read_queries

    try:
        persona = Path(args.persona).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise PrismError(f"cannot read the persona file {args.persona}: {exc}") from None
    if not persona:
        raise PrismError(f"the persona file {args.persona} is empty")
    config = resolve_config(model=args.model, answer_max_tokens=args.max_tokens, seed=args.seed, judge=args.judge,
                            verifier=args.verifier, judge_calibration=args.judge_calibration,
                            batch_size=args.batch_size, device=args.device, answer_temperature=0.0)
    out = args.out or f"runs/ab-{Path(args.persona).stem}"
    print(format_ab(persona_ab(persona, read_queries(args.queries), out, config)))
    print(f"details: {out}/labels.jsonl, plot: {out}/ab_results.png")


def run_replicate(args: argparse.Namespace) -> None:
    from prism.evaluation.replicate import format_status, replicate, status
    from prism.evaluation.replication import format_replication

    config = ReplicateConfig(**flag_values(args, ReplicateConfig))
    if args.status:
        print(format_status(status(config)))
        return
    table = replicate(config, dry_run=args.dry_run)
    if not args.dry_run:
        print(format_replication(table))
        if table.get("too_small"):
            print(f"note: {table['too_small']}")
        print(f"table: {config.out}/eval/replication.md; with plots: prism report {config.out}")


def run_report(args: argparse.Namespace) -> None:
    from prism.evaluation.report import screenshot, write_report

    written = write_report(args.run)
    if args.screenshot:
        written.append(screenshot(written[1], Path(args.run) / "eval" / "report.png"))
    for path in written:
        print(path)


def run_export(args: argparse.Namespace) -> None:
    if args.target == "vllm":
        from prism.serving.vllm import vllm_commands

        print(vllm_commands(args.run, port=args.port))
        return
    from prism.inference.gguf_export import export_gguf

    exported = export_gguf(args.run, base_gguf=args.gguf, merged=args.merged, merged_type=args.merged_type)
    for path in (exported.adapter, exported.merged, *exported.kway.values()):
        if path is not None:
            print(path)
    print(f"base model: {exported.base_gguf}  (prism chat/serve {args.run} uses them with --engine llamacpp)")


def run_serve(args: argparse.Namespace) -> None:
    if args.upstream:
        from prism.serving.sidecar import serve_sidecar

        serve_sidecar(args.run, upstream=args.upstream, base_model=args.upstream_base_model,
                      adapter_model=args.upstream_adapter_model, host=args.host, port=args.port,
                      api_key=args.api_key, upstream_api_key=args.upstream_api_key, threshold=args.threshold,
                      device=args.device, trust_remote_code=args.trust_remote_code,
                      request_log=args.request_log, log_prompts=args.log_prompts, routing=args.routing)
        return
    from prism.serving.server import serve

    serve(_load_gated(args, args.max_model_len), host=args.host, port=args.port, api_key=args.api_key,
          max_batch_size=args.max_batch_size, default_max_tokens=args.default_max_tokens,
          request_log=args.request_log, log_prompts=args.log_prompts)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "bootstrap": run_bootstrap, "distill": run_distill, "inspect": run_inspect, "chat": run_chat,
    "serve": run_serve, "export": run_export, "eval": run_eval, "calibrate": run_calibrate, "ab": run_ab,
    "replicate": run_replicate, "report": run_report,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    silence_library_warnings()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="prism: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        COMMANDS[args.command](args)
    except PrismError as exc:
        print(f"prism: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prism: interrupted; re-run the same command to resume where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
