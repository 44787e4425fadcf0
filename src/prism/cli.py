"""`prism` command line: a thin mirror of the Python API (prism.bootstrap, prism.inspect_run)."""

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
    add_config_flags(boot)

    show = commands.add_parser("inspect", help="what a run directory holds: stages, counts, metrics")
    show.add_argument("run", help="run directory")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def format_summary(summary: dict[str, Any]) -> str:
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
        lines.append(f"distill  KL loss {dist['loss_first']:.4f} -> {dist['loss_last']:.4f} over {dist['steps']} steps")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="prism: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.command == "bootstrap":
            from prism.pipeline import bootstrap

            file_values = load_config_file(args.config) if args.config else {}
            out = args.out or file_values.pop("out", None) or DEFAULT_OUT
            flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(BootstrapConfig)}
            config = resolve_config(file_values, **flags)
            summary = bootstrap(config, out, force=args.force)
            print(format_summary(summary))
        elif args.command == "inspect":
            from prism.pipeline import inspect_run

            summary = inspect_run(args.run)
            print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    except PrismError as exc:
        print(f"prism: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prism: interrupted; re-run the same command to resume where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
