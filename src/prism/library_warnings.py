"""Warnings and log lines raised inside libraries that PRISM cannot avoid, silenced at its entry points
(the CLI and the server) by category and message, or by logger: never every warning, and never one raised
by PRISM's own calls (those are fixed instead; tests turn them into errors)."""

from __future__ import annotations

import logging
import warnings

LIBRARY_WARNINGS: list[tuple[type[Warning], str]] = [
    # PEFT reads `model.is_gradient_checkpointing` when it wraps a model; transformers 5 renamed the property
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]


# rouge-score logs "Using default tokenizer." through absl at INFO each time the queries stage starts; the
# gguf writer logs its endianness and file list at INFO during `prism export gguf`
LIBRARY_LOGGERS = ("absl", "gguf")


def silence_library_warnings() -> None:
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
