"""`prism export vllm`: the commands that serve a run with vLLM (base model + the adapter as a LoRA
module, and a k-way run's persona adapters as more LoRA modules) and the PRISM sidecar in front of it."""

from __future__ import annotations

import logging
from pathlib import Path

from prism.inference.artifacts import FinishedRun
from prism.inference.config import LoadConfig
from prism.routes import BASE, PERSONA, persona_of, served_name
from prism.serving.config import DEFAULT_PORT

log = logging.getLogger("prism")


def vllm_commands(run: str | Path, port: int = DEFAULT_PORT) -> str:
    """The vLLM server (base model + the run's adapters as LoRA modules) and the sidecar in front of it."""
    import shlex

    from prism.lm.models import EMBEDDED, embedded_checkpoint

    # the commands read the run's layout only: no model code runs here, whatever its trust_remote_code
    opened = FinishedRun.open(run, LoadConfig(trust_remote_code=True))
    model = str(embedded_checkpoint()) if opened.model == EMBEDDED else opened.model
    upstream = f"http://127.0.0.1:{port + 1}/v1"
    base = served_name(BASE)
    vllm = ["vllm", "serve", model, "--served-model-name", base, "--port", str(port + 1)]
    modules = {served_name(PERSONA, persona_of(key)): directory for key, directory in opened.adapters.items()}
    if modules:
        vllm += ["--enable-lora", "--lora-modules", *(f"{name}={path.resolve()}" for name, path in modules.items()),
                 "--max-lora-rank", str(max(16, int(opened.config["lora_r"]))), "--max-loras", str(len(modules))]
    else:
        log.warning("%s has no adapter (distill skipped): the adapter model name will not exist upstream", opened.path)
    if opened.config.get("trust_remote_code"):
        vllm.append("--trust-remote-code")
    sidecar = ["prism", "serve", str(opened.path), "--port", str(port), "--upstream", upstream,
               "--upstream-base-model", base, "--upstream-adapter-model", served_name(PERSONA)]
    return "\n".join([
        f"# 1. vLLM: the base model and the run's {len(modules)} adapter(s) as LoRA modules (GPU machine)",
        shlex.join(vllm),
        "# 2. the PRISM sidecar: loads the gate's inputs only, routes each request to one of those names",
        shlex.join(sidecar),
        f"# clients talk to http://127.0.0.1:{port}/v1 with model prism (gated) or "
        f"{', '.join([base, *modules])}",
    ])

