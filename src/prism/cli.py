"""`prism` command line: a thin mirror of the Python API (bootstrap, inspect_run, PrismModel, serve)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prism.config import BootstrapConfig, load_config_file, resolve_config
from prism.discovery.config import DiscoverConfig
from prism.errors import PrismError
from prism.evaluation.calibrate import Objective, format_calibration
from prism.evaluation.config import CompareConfig, EvalConfig, HarnessConfig
from prism.evaluation.persona_ab import SHARED_OPTIONS as AB_SHARED_OPTIONS
from prism.evaluation.persona_ab import ABConfig
from prism.evaluation.replicate import ReplicateConfig
from prism.inference.config import LoadConfig
from prism.library_warnings import silence_library_warnings
from prism.serving.config import ChatConfig, ExportConfig, ServeConfig, SidecarConfig
from prism.stages.inspect import format_summary, inspect_run

DEFAULT_OUT = "runs/prism"
RUN_HELP = "a bootstrapped run directory (adapter + gate)"
EVAL_LOAD_OPTIONS = ("device", "trust_remote_code")  # the eval loads the run on transformers, at its own thresholds


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
                     show_defaults: bool = True, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of a config dataclass (or per field named in `only`), named, typed and explained by
    the field (config.option). Unset flags stay None (or the field's environment variable), so the dataclass's
    own defaults apply."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if meta.get("cli") is False or (only is not None and field.name not in only):  # a Python-only field
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
            # a parser raises PrismError, which argparse would not report: it runs in flag_values
            kind = str if "parse" in meta else kind
            parser.add_argument(flag, dest=field.name, type=kind, default=default, choices=meta.get("choices"),
                                help=help_text)


def flag_values(args: argparse.Namespace, config_class: type, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The config fields (or those named in `only`) given on the command line (parsed where the field has a
    parser)."""
    values = {}
    for field in dataclasses.fields(config_class):
        if field.metadata.get("cli") is False or (only is not None and field.name not in only):
            continue
        value = getattr(args, field.name)
        if value is not None:
            values[field.name] = field.metadata["parse"](value) if "parse" in field.metadata else value
    return values


def package_version() -> str:
    try:
        return importlib.metadata.version("prism-routing")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM: persona routing via intent-based self-modeling")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"prism {package_version()}")
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
    talk.add_argument("run", help=RUN_HELP)
    add_config_flags(talk.add_argument_group("loading the run"), LoadConfig)
    add_config_flags(talk.add_argument_group("the chat"), ChatConfig)

    server = commands.add_parser("serve", help="serve a run's gated model behind an OpenAI-compatible API")
    server.add_argument("run", help=RUN_HELP)
    add_config_flags(server.add_argument_group("loading the run"), LoadConfig)
    add_config_flags(server.add_argument_group("serving"), ServeConfig)
    add_config_flags(server.add_argument_group("routing sidecar (the model runs upstream, e.g. vLLM with "
                                               "--enable-lora; `prism export vllm RUN` prints both commands)"),
                     SidecarConfig)

    export = commands.add_parser("export", help="a run for other engines: its adapter as llama.cpp GGUF, or the "
                                 "commands to serve it with vLLM")
    export.add_argument("target", choices=("gguf", "vllm"),
                        help="gguf: RUN/gguf/adapter.gguf (llama.cpp LoRA) and, with --merged, persona.gguf; "
                        "vllm: the vLLM multi-LoRA server and the PRISM sidecar commands")
    export.add_argument("run", help="a finished run directory")
    add_config_flags(export, ExportConfig)


def add_evaluation_commands(commands: argparse._SubParsersAction) -> None:
    evaluation = commands.add_parser("eval", help="MMLU, ARC, MT-Bench and JailbreakBench for base, persona, "
                                     "lora and prism; results in RUN/eval/results.json")
    evaluation.add_argument("run", help="a bootstrapped run directory")
    add_config_flags(evaluation, EvalConfig)
    add_config_flags(evaluation, LoadConfig, only=EVAL_LOAD_OPTIONS)

    tune = commands.add_parser("calibrate", help="pick the gate threshold from the eval records and save it in the run")
    tune.add_argument("run", help="a run directory that has been through `prism eval` (base, lora and prism)")
    add_config_flags(tune, Objective)
    tune.add_argument("--no-save", action="store_true", help="only report; leave the run's threshold as it is")

    versus = commands.add_parser("ab", help="persona A/B test on your own queries: answers with and without it, "
                                 "judged by the judge you name, win/loss/tie per category")
    add_config_flags(versus, ABConfig)
    add_config_flags(versus, BootstrapConfig, only=AB_SHARED_OPTIONS)

    again = commands.add_parser("replicate", help="the paper's experiment on a model: bootstrap with its protocol, "
                                "evaluate five systems on MT-Bench, MMLU and three safety sets, its Table 1")
    add_config_flags(again, ReplicateConfig)
    again.add_argument("--dry-run", action="store_true", help="print the estimate of the work and time, then stop")
    again.add_argument("--status", action="store_true", help="show which parts of --out are done, then stop")

    finder = commands.add_parser("discover", help="domains from your own traffic: cluster a request log's prompts, "
                                 "name the clusters, write the domains, real queries and a bootstrap config")
    finder.add_argument("log", help="a --request-log file (written with --log-prompts), chat records with `messages`, "
                        "or a JSONL, CSV or text file of prompts")
    add_config_flags(finder, DiscoverConfig)

    versions = commands.add_parser("compare", help="two runs on held-out prompts: routing shares per domain and the "
                                   "judge's verdict of NEW's answers against OLD's")
    versions.add_argument("old", help="the run in service")
    versions.add_argument("new", help="the run that may replace it")
    versions.add_argument("--queries", required=True, help="held-out prompts: JSONL of {\"query\", \"domain\"} "
                          "(prism discover's holdout.jsonl)")
    add_config_flags(versions, CompareConfig)

    harness = commands.add_parser("lm-eval", help="lm-evaluation-harness tasks for base, persona, lora and prism, "
                                  "routed per request; the harness's metrics in RUN/eval/lm_eval.json")
    harness.add_argument("run", help="a bootstrapped run directory")
    add_config_flags(harness, HarnessConfig)

    report = commands.add_parser("report", help="RUN/eval/report.md and report.html with plots, from results.json")
    report.add_argument("run", help="a run directory that has been through `prism eval`")
    report.add_argument("--screenshot", action="store_true",
                        help="also render report.html in headless Chromium to eval/report.png")


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
    from prism.inference.loading import load_gated_model
    from prism.serving.chat import chat

    # one conversation: llama.cpp reserves one sequence's KV cache per route
    chat(load_gated_model(args.run, LoadConfig(**flag_values(args, LoadConfig), max_num_seqs=1)),
         ChatConfig(**flag_values(args, ChatConfig)))


def run_eval(args: argparse.Namespace) -> None:
    from prism.evaluation.results import Results
    from prism.evaluation.runner import evaluate
    from prism.evaluation.tables import results_table

    load = LoadConfig(**flag_values(args, LoadConfig, EVAL_LOAD_OPTIONS))
    results = evaluate(args.run, EvalConfig(**flag_values(args, EvalConfig)), load)
    print(results_table(Results(results)))


def run_calibrate(args: argparse.Namespace) -> None:
    from prism.evaluation.calibrate import calibrate

    print(format_calibration(calibrate(args.run, Objective(**flag_values(args, Objective)), save=not args.no_save)))


def run_ab(args: argparse.Namespace) -> None:
    from prism.evaluation.persona_ab import format_ab, persona_ab, read_queries

    ab = ABConfig(**flag_values(args, ABConfig))
    if not ab.persona or not ab.queries:
        raise PrismError("prism ab needs --persona FILE (the persona's text) and --queries FILE (JSONL of queries)")
    config = resolve_config(**flag_values(args, BootstrapConfig, AB_SHARED_OPTIONS), answer_max_tokens=ab.max_tokens,
                            batch_size=ab.batch_size, answer_temperature=0.0)
    print(format_ab(persona_ab(ab.read_persona(), read_queries(ab.queries), ab.output(), config)))
    print(f"details: {ab.output()}/labels.jsonl, plot: {ab.output()}/ab_results.png")


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


def run_discover(args: argparse.Namespace) -> None:
    from prism.discovery.discover import discover, format_discovery

    config = DiscoverConfig(**flag_values(args, DiscoverConfig))
    print(format_discovery(discover(args.log, config), config.out))


def run_compare(args: argparse.Namespace) -> None:
    from prism.evaluation.compare_runs import compare_runs, format_comparison

    config = CompareConfig(**flag_values(args, CompareConfig))
    print(format_comparison(compare_runs(args.old, args.new, args.queries, config)))
    print(f"details: {Path(config.out or Path(args.new) / 'compare') / 'compare.json'}")


def run_lm_eval(args: argparse.Namespace) -> None:
    from prism.evaluation.harness import RESULT_FILE, format_table, lm_eval

    config = HarnessConfig(**flag_values(args, HarnessConfig))
    print(format_table(lm_eval(args.run, config)))
    print(f"results: {Path(config.out or Path(args.run) / 'eval') / RESULT_FILE}")


def run_report(args: argparse.Namespace) -> None:
    from prism.evaluation.report import screenshot, write_report

    written = write_report(args.run)
    if args.screenshot:
        written.append(screenshot(written[1], Path(args.run) / "eval" / "report.png"))
    for path in written:
        print(path)


def run_export(args: argparse.Namespace) -> None:
    config = ExportConfig(**flag_values(args, ExportConfig))
    if args.target == "vllm":
        from prism.serving.vllm import vllm_commands

        print(vllm_commands(args.run, port=config.port))
        return
    from prism.inference.gguf_export import export_gguf

    exported = export_gguf(args.run, base_gguf=config.gguf, merged=config.merged, merged_type=config.merged_type)
    for path in (exported.adapter, exported.merged, *exported.kway.values()):
        if path is not None:
            print(path)
    print(f"base model: {exported.base_gguf}  (prism chat/serve {args.run} uses them with --engine llamacpp)")


# What only the in-process server does: the sidecar leaves batching, queueing and deadlines to its upstream.
GENERATING_SERVER_FIELDS = ("max_batch_size", "max_waiting", "request_timeout", "default_max_tokens")


def run_serve(args: argparse.Namespace) -> None:
    given = flag_values(args, ServeConfig)
    config = ServeConfig(**given)
    load = LoadConfig(**flag_values(args, LoadConfig), max_num_seqs=config.max_batch_size)
    sidecar = SidecarConfig(**flag_values(args, SidecarConfig))
    if sidecar.upstream:
        unused = [name for name in GENERATING_SERVER_FIELDS if name in given]
        if unused:
            flags = ", ".join("--" + name.replace("_", "-") for name in unused)
            raise PrismError(f"{flags}: the sidecar does not generate, its upstream does (set batching, queue "
                             "limits and deadlines there; --upstream-timeout bounds the sidecar's wait); drop "
                             f"{'it' if len(unused) == 1 else 'them'} or serve without --upstream")
        from prism.serving.sidecar import serve_sidecar

        serve_sidecar(args.run, load, sidecar, config)
        return
    from prism.inference.loading import load_gated_model
    from prism.serving.server import serve

    serve(load_gated_model(args.run, load), config)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "bootstrap": run_bootstrap, "distill": run_distill, "inspect": run_inspect, "chat": run_chat,
    "serve": run_serve, "export": run_export, "eval": run_eval, "calibrate": run_calibrate, "ab": run_ab,
    "replicate": run_replicate, "lm-eval": run_lm_eval, "discover": run_discover, "compare": run_compare,
    "report": run_report,
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
