"""`load_gated_model`: a finished run on the backend asked for (llama.cpp or transformers)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prism.config import with_options
from prism.inference.artifacts import FinishedRun
from prism.inference.base import GatedModel
from prism.inference.config import LoadConfig
from prism.inference.gguf_export import recorded_base_gguf
from prism.inference.llamacpp import LlamaCppModel
from prism.inference.transformers import PrismModel
from prism.lm.llama import resolve_backend

log = logging.getLogger("prism")


def load_gated_model(run: str | Path, config: LoadConfig | None = None, **options: Any) -> GatedModel:
    """A finished run on the backend `config.engine` asks for (or its fields as keywords, like the CLI's flags):
    'auto' takes llama.cpp when the run's model is GGUF (the embedded default, `gguf` given, or a base GGUF
    recorded by `prism export gguf`) and llama-cpp-python is installed, else transformers (PrismModel).
    `routing`: 'binary', 'kway' (a run bootstrapped with --routing kway) or 'auto' (k-way when the run has it)."""
    config = with_options(LoadConfig, config, **options)
    opened = FinishedRun.open(run, config)
    gguf = config.gguf or recorded_base_gguf(opened.path)
    if resolve_backend(config.engine, opened.model, None if gguf is None else str(gguf)) == "llamacpp":
        if config.device not in ("auto", "cpu"):
            log.warning("the llamacpp engine runs on the CPU here; --device %s is ignored", config.device)
        return LlamaCppModel.from_run(opened, config)
    return PrismModel.from_run(opened, config)
