"""The one test that runs the real embedded model: `prism bootstrap --preset tiny` (a few minutes)."""

import subprocess
import sys

import pytest
import torch

from prism.distill import load_adapter
from prism.engine import block0_features
from prism.gate import Gate
from prism.models import chat_prompt, encode, load_model
from prism.pipeline import inspect_run
from prism.runs import STAGES, RunDir

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
    assert summary["distill"]["loss_last"] < summary["distill"]["loss_first"]

    lm = load_model("embedded")
    gate = Gate.load(run / "gate")
    record = next(r for r in RunDir(run).read("labels") if r["label"] == 1)
    prompt = chat_prompt(lm.tokenizer, record["query"])
    probability = gate.persona_probability(block0_features(lm, [prompt]))
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
