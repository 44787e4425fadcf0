"""The one test that runs the real embedded model: `prism bootstrap --preset tiny` (a few minutes)."""

import os
import subprocess
import sys

import pytest
import torch

from gguf_helpers import agreement_with, torch_reference
from helpers import epoch_mean_losses
from prism.inference.llamacpp import LlamaCppModel
from prism.inference.transformers import PrismModel
from prism.lm import llama
from prism.lm.batching import gate_features
from prism.lm.gate import Gate
from prism.lm.models import chat_prompt, encode, load_model
from prism.runs import STAGES, RunDir
from prism.stages.distill import load_adapter
from prism.stages.inspect import inspect_run

pytestmark = pytest.mark.e2e


def test_tiny_preset_on_the_embedded_model(tmp_path):
    run = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "prism.cli", "bootstrap", "--preset", "tiny", "--out", str(run)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = inspect_run(run)
    assert summary["stages"] == {s: "done" for s in STAGES}
    assert summary["counts"]["personas"] == 10
    assert summary["counts"]["distill"] >= 1, "the tiny preset must leave the adapter something to learn"
    epochs = epoch_mean_losses(run)  # a step's loss depends on its batch: epochs compare the same examples
    assert len(epochs) >= 2 and epochs[-1] < 0.9 * epochs[0], epochs

    lm = load_model("embedded")
    gate = Gate.load(run / "gate")
    record = next(r for r in RunDir(run).read("labels") if r["label"] == 1)
    prompt = chat_prompt(lm.tokenizer, record["query"])
    probability = gate.persona_probability(gate_features(lm, [prompt], gate.config.layer, gate.config.pool))
    assert probability.shape == (1,) and 0.0 <= float(probability[0]) <= 1.0

    ids = torch.tensor([encode(lm.tokenizer, prompt)])
    with torch.no_grad():
        base_logits = lm.model(input_ids=ids).logits[0, -1]
    model = load_adapter(lm, run)
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits[0, -1]
    # The adapter moves the next-token distribution on a query it was distilled on.
    shift = torch.nn.functional.kl_div(adapted_logits.log_softmax(-1), base_logits.log_softmax(-1),
                                       log_target=True, reduction="sum")
    assert float(shift) > 1e-3

    # The same run turned k-way (its records and binary adapter kept): one adapter per persona that won,
    # each routed to by name, on the real model.
    done = subprocess.run([sys.executable, "-m", "prism.cli", "bootstrap", "--preset", "tiny", "--out", str(run),
                           "--routing", "kway", "--kway-min-wins", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    kway = inspect_run(run)["kway"]
    personas = kway["classes"][1:]
    assert personas and sum(kway["class_counts"][1:]) == summary["counts"]["distill"]
    kway_model = PrismModel.from_run(run, device="cpu")
    assert kway_model.routing == "kway" and kway_model.personas == personas
    reply = kway_model.generate(record["query"], route="persona", persona=personas[0], max_tokens=8)
    assert (reply.route, reply.persona) == ("persona", personas[0]) and reply.completion_tokens > 0
    del kway_model

    # The parity check on the real model: the shipped Q4_1 GGUF in llama.cpp (as it is, and re-encoded
    # to Q8_0, what several sequences decode with) with the exported adapter vs PyTorch (fp32 weights
    # dequantized from that same file) with the PEFT adapter. llama.cpp multiplies quantized weights with
    # activations quantized to 8 bits, so near-ties may flip: 95% of the first 32 teacher-forced positions must
    # agree (measured 97-98% over 16 queries of two runs; over 4 queries one run gave 94.5%, so the test uses
    # 16 for a steadier share).
    if llama.llama_cpp_missing():
        assert not os.environ.get("CI"), "the project installs llama-cpp-python; CI must have it"
        return
    queries = [r["query"] for r in RunDir(run).read("labels")][:16]
    torch_model = PrismModel.from_run(run, device="cpu", routing="binary")
    references = {route: torch_reference(torch_model, route, queries, 32) for route in ("persona", "base")}
    for persona in ("lora", "merged"):
        if persona == "merged":
            assert subprocess.run([sys.executable, "-m", "prism.cli", "export", "gguf", str(run), "--merged"],
                                  capture_output=True, timeout=300).returncode == 0
        for weights in ("as-is", "q8_0"):
            cpp_model = LlamaCppModel.from_run(run, persona_model=persona, max_model_len=1024, routing="binary",
                                               gguf_weights=weights)
            assert cpp_model.persona_source == persona and cpp_model.weights_type == weights
            for route in ("persona", "base"):
                agreement, _ = agreement_with(references[route], cpp_model, route)
                assert agreement >= 0.95, f"{persona}/{weights}/{route}: {agreement:.3f}"
            cpp_model.close()
    # and the k-way routing on llama.cpp: a context per persona adapter (its LoRA GGUF exported on load)
    cpp_kway = LlamaCppModel.from_run(run, max_model_len=1024)
    assert cpp_kway.routing == "kway" and cpp_kway.personas == personas
    assert all((run / "gguf" / f"adapter-{p}.gguf").is_file() for p in personas)
    reply = cpp_kway.generate(record["query"], route="persona", persona=personas[-1], max_tokens=8)
    assert (reply.route, reply.persona) == ("persona", personas[-1]) and reply.completion_tokens > 0
