"""`load_gated_model`: a finished run on the backend asked for (llama.cpp or transformers)."""

from __future__ import annotations

import logging
from pathlib import Path

from prism.inference.artifacts import open_finished_run
from prism.inference.base import GatedModel
from prism.inference.gguf_export import recorded_base_gguf
from prism.inference.llamacpp import LlamaCppModel
from prism.inference.transformers import PrismModel
from prism.lm.llama import resolve_backend

log = logging.getLogger("prism")


def load_gated_model(run_dir: str | Path, *, engine: str = "auto", gguf: str | Path | None = None,
                     threshold: float | None = None, device: str = "auto", max_model_len: int | None = None,
                     threads: int | None = None, persona_model: str = "auto",
                     trust_remote_code: bool = False, routing: str = "auto") -> GatedModel:
    """A finished run on the backend asked for (`engine`, like the CLI's --engine): 'auto' takes llama.cpp
    when the run's model is GGUF (the embedded default, `gguf` given, or a base GGUF recorded by
    `prism export gguf`) and llama-cpp-python is installed, else transformers (PrismModel). `routing`: 'binary',
    'kway' (a run bootstrapped with --routing kway) or 'auto' (k-way when the run has it)."""
    run, _manifest, config = open_finished_run(run_dir, trust_remote_code)
    gguf = gguf or recorded_base_gguf(run.path)
    if resolve_backend(engine, config["model"], None if gguf is None else str(gguf)) == "llamacpp":
        if device not in ("auto", "cpu"):
            log.warning("the llamacpp engine runs on the CPU here; --device %s is ignored", device)
        return LlamaCppModel.from_run(run_dir, gguf=gguf, threshold=threshold, max_model_len=max_model_len,
                                      n_threads=threads, persona=persona_model, trust_remote_code=trust_remote_code,
                                      routing=routing)
    return PrismModel.from_run(run_dir, device=device, threshold=threshold, trust_remote_code=trust_remote_code,
                               max_model_len=max_model_len, routing=routing)

