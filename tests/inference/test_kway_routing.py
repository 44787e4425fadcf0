"""k-way routing at inference (transformers): base and k persona adapters in one PeftModel, each adapter on
its own route only, mixed batches equal to single-route runs, and binary runs as before."""

import json
import shutil

import pytest
import torch
from peft import PeftModel

from helpers import BASE_QUERIES, KWAY_PERSONAS, REVIEW_QUERY, WRITING_QUERY
from prism.config import BootstrapConfig, with_new_defaults
from prism.errors import PrismError
from prism.inference.base import GenerationRequest
from prism.inference.router import gate_decisions
from prism.inference.transformers import PrismModel
from prism.lm.decoding import SamplingParams
from prism.lm.models import load_model
from prism.routes import served_names
from prism.runs import KWAY_ADAPTERS
from prism.stages.pipeline import bootstrap


@pytest.fixture(scope="module")
def kway_model(tiny_kway_run):
    return PrismModel.from_run(tiny_kway_run, device="cpu")


def ask(text):
    return [{"role": "user", "content": text}]


def test_a_kway_run_loads_its_gate_and_one_named_adapter_per_persona(kway_model, tiny_kway_run):
    assert kway_model.routing == "kway" and kway_model.personas == KWAY_PERSONAS and kway_model.has_adapter
    assert set(kway_model.adapter.peft_config) == {"persona", "persona-writing", "persona-review"}
    decisions = kway_model.decide([ask(WRITING_QUERY), ask(REVIEW_QUERY), *map(ask, BASE_QUERIES)])
    assert [(d.route, d.persona) for d in decisions] == [("persona", "writing"), ("persona", "review"),
                                                         ("base", None), ("base", None)]
    assert served_names(kway_model.has_adapter, kway_model.personas) == [
        "prism", "prism-base", "prism-persona", "prism-persona-writing", "prism-persona-review"]
    binary = PrismModel.from_run(tiny_kway_run, device="cpu", routing="binary")
    assert binary.routing == "binary" and binary.personas == [] and set(binary.adapter.peft_config) == {"persona"}


def reference_logprobs(model_dir, adapter_dir, text):
    """The next-token log-probabilities of a fresh base model, with one PEFT adapter loaded alone, or none."""
    lm = load_model(str(model_dir), device="cpu")
    model = lm.model if adapter_dir is None else PeftModel.from_pretrained(lm.model, str(adapter_dir)).eval()
    from prism.lm.models import chat_prompt, encode

    ids = torch.tensor([encode(lm.tokenizer, chat_prompt(lm.tokenizer, text))])
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)


def test_each_adapter_moves_the_output_on_its_own_route_only(kway_model, tiny_kway_run, tiny_model_dir):
    query = BASE_QUERIES[0]
    routes = {"base": ("base", None, None), "binary": ("persona", None, tiny_kway_run / "adapter")}
    routes.update({p: ("persona", p, tiny_kway_run / KWAY_ADAPTERS / p) for p in KWAY_PERSONAS})
    # one batch over every route: each row must equal the base model with its own adapter alone (or none)
    requests = [GenerationRequest(ask(query), route, persona=persona) for route, persona, _ in routes.values()]
    got, decisions = kway_model.next_token_logprobs(requests)
    assert [d.persona for d in decisions] == [None, None, *KWAY_PERSONAS]
    expected = {name: reference_logprobs(tiny_model_dir, adapter, query) for name, (_, _, adapter) in routes.items()}
    for row, name in enumerate(routes):
        assert torch.allclose(got[row], expected[name], atol=1e-5), f"the {name} route is not its adapter alone"
    # and every adapter moves the output: no route is another one in disguise
    names = list(routes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (expected[a] - expected[b]).abs().max() > 1e-2, f"{a} and {b} give the same output"
    # one route at a time (PEFT's plain path after set_adapter) gives the same
    for name, (route, persona, _) in routes.items():
        alone, _ = kway_model.next_token_logprobs([GenerationRequest(ask(query), route, persona=persona)])
        assert torch.allclose(alone[0], expected[name], atol=1e-5), f"{name} alone"


def test_a_mixed_batch_over_base_and_two_adapters_reproduces_each_rows_single_route_output(kway_model):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    requests = [
        GenerationRequest(ask(WRITING_QUERY), "auto", params),  # the gate picks writing
        GenerationRequest(ask(BASE_QUERIES[0]), "base", params),
        GenerationRequest(ask(BASE_QUERIES[1]), "persona", params, persona="review"),
        GenerationRequest(ask(REVIEW_QUERY), "auto", params),  # the gate picks review
        GenerationRequest(ask(BASE_QUERIES[1]), "auto", params),  # the gate picks base
        GenerationRequest(ask(WRITING_QUERY), "persona", params, persona="writing"),
        GenerationRequest(ask(REVIEW_QUERY), "persona", params),  # the binary adapter
    ]
    batch = kway_model.generate_batch(requests)
    assert [(c.route, c.persona) for c in batch] == [
        ("persona", "writing"), ("base", None), ("persona", "review"), ("persona", "review"), ("base", None),
        ("persona", "writing"), ("persona", None)]
    for request, mixed in zip(requests, batch):
        alone = kway_model.generate_batch([request])[0]
        assert mixed.text == alone.text and mixed.completion_tokens == alone.completion_tokens == 12
    assert len({c.text for c in batch[:4]}) == 4  # base and the three adapters answer differently


def test_a_persona_the_run_has_no_adapter_for_is_a_clear_error(kway_model, tiny_run):
    with pytest.raises(PrismError, match="no k-way adapter for the persona 'math'; its personas: writing, review"):
        kway_model.generate("hi", route="persona", persona="math", max_tokens=2)
    with pytest.raises(PrismError, match="bootstrapped with --routing binary"):
        PrismModel.from_run(tiny_run, device="cpu", routing="kway")
    binary = PrismModel.from_run(tiny_run, device="cpu")
    with pytest.raises(PrismError, match="no kway gate"):
        binary.generate_batch([GenerationRequest(ask("hi"), routing="kway")])


def test_the_eval_can_ask_either_gate_of_a_kway_run(kway_model):
    requests = [GenerationRequest(ask(WRITING_QUERY), routing=r, params=SamplingParams(max_tokens=2))
                for r in ("binary", "kway")]
    binary, kway = kway_model.generate_batch(requests)
    assert (binary.route, binary.persona) == ("persona", None) and (kway.route, kway.persona) == ("persona", "writing")
    expected = gate_decisions(kway_model.gate_lm, kway_model.gates["binary"], [ask(WRITING_QUERY)])[0]
    assert binary.gate_probability == pytest.approx(expected.gate_probability, abs=1e-6)
    assert kway.gate_probability == pytest.approx(kway_model.decide([ask(WRITING_QUERY)])[0].gate_probability, abs=1e-6)


def test_a_binary_run_made_before_kway_routing_existed_loads_serves_and_resumes_unchanged(tiny_run, tmp_path,
                                                                                         tiny_model_dir):
    old = tmp_path / "old-run"
    shutil.copytree(tiny_run, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("routing", "kway_min_wins"):  # fields this change added
        manifest["config"].pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    before, after = PrismModel.from_run(tiny_run, device="cpu"), PrismModel.from_run(old, device="cpu")
    assert after.routing == "binary" and after.personas == [] and list(after.gates) == ["binary"]
    assert served_names(after.has_adapter, after.personas) == ["prism", "prism-base", "prism-persona"]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    requests = [GenerationRequest(ask(q), params=params) for q in (WRITING_QUERY, REVIEW_QUERY, *BASE_QUERIES)]
    for a, b in zip(before.generate_batch(requests), after.generate_batch(requests)):
        assert (a.text, a.route, a.gate_probability, a.persona) == (b.text, b.route, b.gate_probability, None)
    # `prism bootstrap` on it again: every stage is done, nothing is refused as a different config
    config = BootstrapConfig(**with_new_defaults(manifest["config"]))
    assert bootstrap(config, old)["stages"]["distill"] == "done"


def test_a_reload_swaps_every_kway_adapter_and_a_bad_one_changes_nothing(tiny_kway_run, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(tiny_kway_run, run)
    model = PrismModel.from_run(run, device="cpu")
    query = BASE_QUERIES[0]

    def outputs():
        requests = [GenerationRequest(ask(query), "persona", persona=p) for p in KWAY_PERSONAS]
        return dict(zip(KWAY_PERSONAS, model.next_token_logprobs(requests)[0]))

    before = outputs()
    weights = run / KWAY_ADAPTERS / "writing" / "adapter_model.safetensors"
    save_file({k: 2 * v if "lora_B" in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    assert model.reload().personas == KWAY_PERSONAS
    after = outputs()
    assert torch.allclose(after["writing"], reference_logprobs(tiny_model_dir, weights.parent, query), atol=1e-5)
    assert not torch.allclose(after["writing"], before["writing"], atol=1e-3)
    assert torch.allclose(after["review"], before["review"], atol=1e-6)

    review = run / KWAY_ADAPTERS / "review" / "adapter_model.safetensors"
    good = review.read_bytes()
    save_file({k: v[:, :-1].contiguous() if "lora_A" in k else v for k, v in load_file(str(review)).items()},
              str(review))
    with pytest.raises(PrismError, match="does not fit the base model.*keeps serving"):
        model.reload()
    review.write_bytes(good)
    assert all(torch.allclose(outputs()[p], after[p], atol=1e-6) for p in KWAY_PERSONAS)
    assert len(model.adapter.peft_config) == 3, "a failed reload leaves no half-loaded adapter behind"
    shutil.rmtree(run / KWAY_ADAPTERS / "review")
    with pytest.raises(PrismError, match="holds no adapter"):
        model.reload()


def test_a_saved_threshold_goes_to_the_gate_the_model_routes_with(tiny_kway_run, tmp_path):
    from prism.lm.gate import Gate

    run = tmp_path / "run"
    shutil.copytree(tiny_kway_run, run)
    PrismModel.from_run(run, device="cpu").set_threshold(0.61, save=True)
    PrismModel.from_run(run, device="cpu", routing="binary").set_threshold(0.27, save=True)
    assert Gate.load(run / "kway" / "gate").config.threshold == 0.61
    assert Gate.load(run / "gate").config.threshold == 0.27
