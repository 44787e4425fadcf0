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
from typing import Any

from prism.config import BootstrapConfig, load_config_file, resolve_config
from prism.errors import PrismError
from prism.inference.base import ROUTES
from prism.library_warnings import silence_library_warnings

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


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per BootstrapConfig field; unset flags stay None so the preset and file decide."""
    group = parser.add_argument_group("bootstrap options (each overrides --preset and --config)")
    hints = typing.get_type_hints(BootstrapConfig)
    for field in dataclasses.fields(BootstrapConfig):
        flag = "--personas" if field.name == "personas_file" else "--" + field.name.replace("_", "-")
        kind, is_list = _flag_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, dest=field.name, action="store_true", default=None, help=help_text)
        elif is_list:
            group.add_argument(flag, dest=field.name, type=_comma_list, default=None,
                               help=help_text + " (comma-separated)")
        else:
            group.add_argument(flag, dest=field.name, type=kind, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM: persona routing via intent-based self-modeling")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    boot = commands.add_parser("bootstrap", help="personas -> queries -> answers -> verify -> gate -> adapter")
    boot.add_argument("--config", help="YAML file of options (same names as the flags)")
    boot.add_argument("--out", help=f"run directory (default {DEFAULT_OUT}); re-running resumes it")
    boot.add_argument("--force", action="store_true", help="start over when --out holds a run with another config")
    boot.add_argument("--api-key", help="the openai engine's API key (default $PRISM_ENGINE_API_KEY; never saved)")
    add_config_flags(boot)

    teach = commands.add_parser("distill", help="train (or retrain) a run's adapter; data parallel under "
                                "`accelerate launch -m prism.cli distill RUN`")
    teach.add_argument("run", help="a run whose stages before distill are done")
    teach.add_argument("--force", action="store_true", help="train again (the old adapter is moved aside)")

    show = commands.add_parser("inspect", help="what a run directory holds: stages, counts, metrics")
    show.add_argument("run", help="run directory")
    show.add_argument("--json", action="store_true", help="print one JSON object")

    talk = commands.add_parser("chat", help="chat in the terminal with a run's gated model")
    add_model_flags(talk)
    add_engine_flags(talk)
    talk.add_argument("--route", choices=ROUTES, default="auto", help="start pinned to a route (default auto)")
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
    sidecar = server.add_argument_group("routing sidecar (the model runs upstream, e.g. vLLM with --enable-lora; "
                                        "`prism export vllm RUN` prints both commands)")
    sidecar.add_argument("--upstream", help="an OpenAI-compatible server's /v1 URL: load only the gate's inputs "
                         "here and forward each request there under the route's model name")
    sidecar.add_argument("--upstream-base-model", help="the base model's name on the upstream server")
    sidecar.add_argument("--upstream-adapter-model", help="the adapter's name on the upstream server (its LoRA module)")
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

    evaluation = commands.add_parser("eval", help="MMLU, ARC, MT-Bench and JailbreakBench for base, persona, "
                                     "lora and prism; results in RUN/eval/results.json")
    evaluation.add_argument("run", help="a bootstrapped run directory")
    evaluation.add_argument("--bench", type=_comma_list, default=["all"],
                            help="mmlu,arc,mtbench,jbb, or knowledge (mmlu+arc), or all (default)")
    evaluation.add_argument("--systems", type=_comma_list, default=["base", "persona", "lora", "prism"],
                            help="base,persona,lora,prism (default all four)")
    evaluation.add_argument("--limit", help="items per MMLU subject, per ARC split, per MT-Bench category and per "
                            "JBB kind: one number, or per benchmark like mmlu=4,arc=100,mtbench=3,jbb=25 "
                            "(default: everything)")
    evaluation.add_argument("--data-dir", help="benchmark data (mmlu/, arc/, mt_bench/, jbb/); "
                            "default $PRISM_BENCHMARKS or ../shared/benchmarks")
    evaluation.add_argument("--data", help="per benchmark, a Hugging Face dataset id (ID or ID:CONFIG) or a "
                            "local folder, e.g. mmlu=cais/mmlu,arc=allenai/ai2_arc,jbb=JailbreakBench/JBB-Behaviors,"
                            "mtbench=lighteval/mt-bench (MT-Bench judge prompts still come from --data-dir)")
    evaluation.add_argument("--scoring", choices=("letter", "cloze"), default="letter",
                            help="multiple choice: the answer letter's log-likelihood, or each choice's "
                            "length-normalized log-likelihood (cloze)")
    evaluation.add_argument("--batch-size", type=int, default=16)
    evaluation.add_argument("--mtbench-max-tokens", type=int, default=None,
                            help="MT-Bench answer cap (FastChat: 1024); default 1024 for a run bootstrapped with "
                            "--preset paper, else 256")
    evaluation.add_argument("--jbb-max-tokens", type=int, default=96)
    evaluation.add_argument("--judge-base-url", help="an OpenAI-compatible judge (default: the model judges itself)")
    evaluation.add_argument("--judge-model", help="the judge's model name on that server")
    evaluation.add_argument("--judge-api-key", default=os.environ.get("PRISM_JUDGE_API_KEY"),
                            help="default $PRISM_JUDGE_API_KEY")
    evaluation.add_argument("--device", default="auto")
    evaluation.add_argument("--trust-remote-code", action="store_true")

    tune = commands.add_parser("calibrate", help="pick the gate threshold from the eval records and save it in the run")
    tune.add_argument("run", help="a run directory that has been through `prism eval` (base, lora and prism)")
    tune.add_argument("--max-mmlu-drop", type=float, default=0.5,
                      help="largest MMLU accuracy loss against base allowed, in points (default 0.5)")
    tune.add_argument("--no-save", action="store_true", help="only report; leave the run's threshold as it is")

    versus = commands.add_parser("ab", help="persona A/B test on your own queries: answers with and without it, "
                                 "judged in both orders, win/loss/tie per category")
    versus.add_argument("--persona", required=True, help="a text file holding the persona (system prompt)")
    versus.add_argument("--queries", required=True, help="JSONL, one {\"query\": ..., \"category\": ...} per line")
    versus.add_argument("--model", default="embedded", help="Hub id, local path, or 'embedded' (default)")
    versus.add_argument("--out", help="where answers and verdicts go (default runs/ab-<persona file name>); "
                        "re-running resumes")
    versus.add_argument("--max-tokens", type=int, default=256, help="answer length (default 256)")
    versus.add_argument("--judge-calibration", choices=("position", "none"), default="position")
    versus.add_argument("--batch-size", type=int, default=16)
    versus.add_argument("--seed", type=int, default=0)
    versus.add_argument("--device", default="auto")

    report = commands.add_parser("report", help="RUN/eval/report.md and report.html with plots, from results.json")
    report.add_argument("run", help="a run directory that has been through `prism eval`")
    report.add_argument("--screenshot", action="store_true",
                        help="also render report.html in headless Chromium to eval/report.png")
    return parser


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a bootstrapped run directory (adapter + gate)")
    parser.add_argument("--threshold", type=float, help="route to the adapter when P(persona) >= this "
                        "(default: the run's saved threshold)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the Hub")


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
                            persona_model=args.persona_model, trust_remote_code=args.trust_remote_code)


def format_summary(summary: dict[str, Any]) -> str:
    from prism.stages import verify

    stages = "  ".join(f"{name}={status}" for name, status in summary["stages"].items())
    c = summary["counts"]
    lines = [
        f"run      {summary['path']}   model: {summary['model']}",
        f"stages   {stages}",
        f"counts   personas {c['personas']}, queries {c['queries']} (of {c['query_candidates']} candidates), "
        f"answers {c['answers']}, judgments {c['judgments']}, distill {c['distill']}, retain {c['retain']}",
    ]
    gate = summary.get("gate") or {}
    if gate.get("kind") == "constant":
        target = "the adapter" if gate["constant_route"] else "the base model"
        lines.append(f"gate     constant: every query goes to {target}")
    elif gate:
        held = gate.get("heldout_accuracy")
        held_text = "n/a" if held is None else f"{held:.3f} ({gate.get('heldout_method')})"
        lines.append(f"gate     held-out accuracy {held_text}, train {gate['train_accuracy']:.3f}, "
                     f"majority-class baseline {gate['majority_baseline']:.3f}")
    adapter = summary.get("adapter") or {}
    if adapter:
        lines.append(f"adapter  {adapter['trainable_params']:,} trainable parameters "
                     f"({100 * adapter['share_of_base']:.2f}% of the base model)")
    dist = summary.get("distill") or {}
    if dist.get("skipped"):
        lines.append(f"distill  skipped: {dist['skipped']}")
    elif "loss_first" in dist:
        signal = dist.get("persona_signal")
        lines.append(f"distill  persona signal (KL at step 0) {'n/a' if signal is None else f'{signal:.4f}'}; "
                     f"KL loss {dist['loss_first']:.4f} -> {dist['loss_last']:.4f} over {dist['steps']} steps")
    judge = summary.get("verify") or {}
    if judge.get("pairs"):
        lines.insert(3, verify.format_judge_quality(judge))
    warning = verify.judge_warning(judge)
    if warning:
        lines.append(warning)  # the last line a bootstrap prints
    return "\n".join(lines)


def format_calibration(result: dict[str, Any]) -> str:
    lines = [f"threshold {result['threshold']:.4f} ({'saved in the run' if result['saved'] else 'not saved'}); "
             f"objective: {result['objective']['text']}",
             f"  {result['selection']}; the figures below are the held-out half's"]
    for metric, value in result["at_threshold"].items():
        curve = result["curves"][metric]
        lines.append(f"  {metric:<20} {value:.3f} at this threshold (base {curve['base']:.3f}, always adapter "
                     f"{curve['adapter']:.3f}, oracle {curve['oracle']['value']:.3f}); "
                     f"{100 * result['share_routed'][metric]:.0f}% routed to the adapter, {curve['items']} items")
    held = result.get("gate_heldout_accuracy")
    lines.append(f"  gate held-out accuracy: {'n/a' if held is None else f'{held:.3f}'} "
                 f"({result.get('gate_heldout_method') or 'n/a'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    silence_library_warnings()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="prism: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.command == "bootstrap":
            from prism.stages.pipeline import bootstrap

            file_values = load_config_file(args.config) if args.config else {}
            out = args.out or file_values.pop("out", None) or DEFAULT_OUT
            flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(BootstrapConfig)}
            config = resolve_config(file_values, **flags)
            summary = bootstrap(config, out, force=args.force, api_key=args.api_key)
            print(format_summary(summary))
        elif args.command == "distill":
            from accelerate import PartialState

            from prism.stages.pipeline import distill_run

            summary = distill_run(args.run, force=args.force)
            if PartialState().is_main_process:  # the state distill_run set up: one summary per launch
                print(format_summary(summary))
        elif args.command == "inspect":
            from prism.stages.pipeline import inspect_run

            summary = inspect_run(args.run)
            print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
        elif args.command == "chat":
            from prism.lm.decoding import SamplingParams
            from prism.serving.chat import chat

            params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                    seed=args.seed)
            chat(_load_gated(args), params, route=args.route, system=args.system)
        elif args.command == "eval":
            from prism.evaluation.config import EvalConfig, parse_data, parse_limit
            from prism.evaluation.runner import evaluate

            config = EvalConfig(benches=args.bench, systems=args.systems, limit=parse_limit(args.limit),
                                data_dir=args.data_dir, data=parse_data(args.data), scoring=args.scoring,
                                batch_size=args.batch_size,
                                mtbench_max_tokens=args.mtbench_max_tokens, jbb_max_tokens=args.jbb_max_tokens,
                                judge_base_url=args.judge_base_url, judge_model=args.judge_model,
                                judge_api_key=args.judge_api_key)
            results = evaluate(args.run, config, device=args.device, trust_remote_code=args.trust_remote_code)
            from prism.evaluation.report import results_table

            print(results_table(results))
        elif args.command == "calibrate":
            from prism.evaluation.calibrate import Objective, calibrate

            result = calibrate(args.run, Objective(max_mmlu_drop=args.max_mmlu_drop), save=not args.no_save)
            print(format_calibration(result))
        elif args.command == "ab":
            from pathlib import Path

            from prism.evaluation.persona_ab import format_ab, persona_ab, read_queries

            try:
                persona = Path(args.persona).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise PrismError(f"cannot read the persona file {args.persona}: {exc}") from None
            if not persona:
                raise PrismError(f"the persona file {args.persona} is empty")
            config = resolve_config(model=args.model, answer_max_tokens=args.max_tokens, seed=args.seed,
                                    judge_calibration=args.judge_calibration, batch_size=args.batch_size,
                                    device=args.device, answer_temperature=0.0)
            out = args.out or f"runs/ab-{Path(args.persona).stem}"
            results = persona_ab(persona, read_queries(args.queries), out, config)
            print(format_ab(results))
            print(f"details: {out}/labels.jsonl, plot: {out}/ab_results.png")
        elif args.command == "report":
            from pathlib import Path

            from prism.evaluation.report import screenshot, write_report

            written = write_report(args.run)
            if args.screenshot:
                written.append(screenshot(written[1], Path(args.run) / "eval" / "report.png"))
            for path in written:
                print(path)
        elif args.command == "export" and args.target == "gguf":
            from prism.inference.gguf_export import export_gguf

            exported = export_gguf(args.run, base_gguf=args.gguf, merged=args.merged, merged_type=args.merged_type)
            for path in (exported.adapter, exported.merged):
                if path is not None:
                    print(path)
            print(f"base model: {exported.base_gguf}  (prism chat/serve {args.run} uses them with --engine llamacpp)")
        elif args.command == "export":
            from prism.serving.vllm import vllm_commands

            print(vllm_commands(args.run, port=args.port))
        elif args.command == "serve" and args.upstream:
            from prism.serving.sidecar import serve_sidecar

            serve_sidecar(args.run, upstream=args.upstream, base_model=args.upstream_base_model,
                          adapter_model=args.upstream_adapter_model, host=args.host, port=args.port,
                          api_key=args.api_key, upstream_api_key=args.upstream_api_key, threshold=args.threshold,
                          device=args.device, trust_remote_code=args.trust_remote_code)
        elif args.command == "serve":
            from prism.serving.server import serve

            serve(_load_gated(args, args.max_model_len), host=args.host, port=args.port,
                  api_key=args.api_key, max_batch_size=args.max_batch_size, default_max_tokens=args.default_max_tokens)
    except PrismError as exc:
        print(f"prism: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prism: interrupted; re-run the same command to resume where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
