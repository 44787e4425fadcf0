import json

import pytest
import torch
from peft import PeftModel

from helpers import BASE_QUERIES, PERSONA_QUERIES, build_tiny_run
from prism.errors import ContextLengthError, PrismError
from prism.inference.base import GenerationRequest
from prism.inference.transformers import PrismModel
from prism.lm.decoding import SamplingParams
from prism.lm.models import chat_prompt, decoder_layers, encode, load_model
from prism.runs import RunDir

MAX_TOKENS = 12


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def reference_reply(model: torch.nn.Module, tokenizer, query: str, max_tokens: int = MAX_TOKENS) -> str:
    """Greedy reply from transformers' own generate, one prompt at a time (no padding, no routing)."""
    ids = torch.tensor([encode(tokenizer, chat_prompt(tokenizer, query))])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def prism_model(tiny_run):
    return PrismModel.from_run(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def references(tiny_run, tiny_model_dir):
    """reply(query, route, max_tokens) from separate plain models: base alone, and base + PEFT adapter."""
    base = load_model(str(tiny_model_dir), device="cpu")
    adapted = load_model(str(tiny_model_dir), device="cpu")
    models = {"base": base.model, "persona": PeftModel.from_pretrained(adapted.model, str(tiny_run / "adapter"))}

    def reply(query: str, route: str, max_tokens: int = MAX_TOKENS) -> str:
        return reference_reply(models[route].eval(), base.tokenizer, query, max_tokens)

    return reply


@pytest.mark.parametrize("base_tokens", [MAX_TOKENS, 4])  # 4: the batch turns persona-only midway
def test_mixed_batch_matches_base_and_adapter_models_token_for_token(prism_model, references, base_tokens):
    queries = [PERSONA_QUERIES[0], BASE_QUERIES[0], PERSONA_QUERIES[1], BASE_QUERIES[1]]
    lengths = [MAX_TOKENS, base_tokens, MAX_TOKENS, base_tokens]
    requests = [GenerationRequest(user(q), params=SamplingParams(max_tokens=n)) for q, n in zip(queries, lengths)]
    completions = prism_model.generate_batch(requests)
    assert [c.route for c in completions] == ["persona", "base", "persona", "base"]
    for query, length, completion in zip(queries, lengths, completions):
        assert completion.text == references(query, completion.route, length), (query, completion.route)
    # the adapter must matter, or the comparison above proves nothing
    assert any(references(q, "persona") != references(q, "base") for q in PERSONA_QUERIES)


def count_calls(module: torch.nn.Module, counter: list[int]):
    return module.register_forward_hook(lambda *_: counter.append(1))


def test_block0_runs_once_per_forward_pass_gate_included(prism_model):
    layers = decoder_layers(prism_model.lm.model)
    first, last = [], []
    handles = [count_calls(layers[0], first), count_calls(layers[-1], last)]
    try:
        completion = prism_model.generate(PERSONA_QUERIES[0], max_tokens=1)
        assert (len(first), len(last)) == (1, 1)  # the gate read the prefill's own block-0 output
        first.clear(), last.clear()
        completion = prism_model.generate(BASE_QUERIES[0], max_tokens=5)
        assert len(first) == len(last) == completion.completion_tokens  # prefill + one step per later token
    finally:
        for handle in handles:
            handle.remove()
    assert completion.gate_probability is not None and not completion.forced


def test_multi_turn_routes_on_the_last_user_turn(prism_model):
    conversation = [*user(BASE_QUERIES[0]), {"role": "assistant", "content": "Paris."}, *user(PERSONA_QUERIES[0])]
    completion = prism_model.generate(conversation, max_tokens=3)
    alone = prism_model.decide([user(PERSONA_QUERIES[0])])[0]
    assert completion.route == alone.route == "persona"
    assert completion.gate_probability == pytest.approx(alone.gate_probability, abs=1e-5)


def test_forced_routes_override_the_gate(prism_model, references):
    for query, route in ((PERSONA_QUERIES[0], "base"), (BASE_QUERIES[0], "persona")):
        forced = prism_model.generate(query, route=route, max_tokens=MAX_TOKENS)
        assert (forced.route, forced.forced, forced.gate_probability) == (route, True, None)
        assert forced.text == references(query, route)


def test_stream_sends_the_route_first_and_deltas_that_add_up(prism_model):
    requests = [GenerationRequest(user(q), params=SamplingParams(max_tokens=MAX_TOKENS))
                for q in (PERSONA_QUERIES[0], BASE_QUERIES[1])]
    seen_decision, text, completions = set(), {0: "", 1: ""}, {}
    for event in prism_model.stream(requests):
        if event.decision is not None:
            seen_decision.add(event.index)
        if event.delta:
            assert event.index in seen_decision
            text[event.index] += event.delta
        if event.completion is not None:
            completions[event.index] = event.completion
    assert text == {i: c.text for i, c in completions.items()}


def test_sampling_is_reproducible_with_a_seed_and_rows_keep_their_own_settings(prism_model):
    def reply(seed: int, temperature: float = 1.0) -> str:
        return prism_model.generate(BASE_QUERIES[0], max_tokens=10, temperature=temperature, seed=seed).text

    assert reply(3) == reply(3)
    assert len({reply(s) for s in range(4)}) > 1
    greedy = prism_model.generate(BASE_QUERIES[0], max_tokens=10).text
    mixed = prism_model.generate_batch([
        GenerationRequest(user(BASE_QUERIES[0]), params=SamplingParams(max_tokens=10, temperature=1.0, seed=3)),
        GenerationRequest(user(BASE_QUERIES[0]), params=SamplingParams(max_tokens=4)),
    ])
    assert mixed[0].text == reply(3) and greedy.startswith(mixed[1].text) and mixed[1].finish_reason == "length"
    assert prism_model.generate(BASE_QUERIES[0], max_tokens=10, temperature=1.0, top_p=1e-6, seed=9).text == greedy


def test_stop_strings_cut_the_reply(prism_model):
    full = prism_model.generate(BASE_QUERIES[0], max_tokens=MAX_TOKENS).text
    stop = full[4:7]
    cut = prism_model.generate(BASE_QUERIES[0], max_tokens=MAX_TOKENS, stop=[stop])
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_threshold_moves_the_route_and_saves_with_the_run(tiny_run):
    model = PrismModel.from_run(tiny_run, device="cpu", threshold=0.0)
    assert model.decide([user(BASE_QUERIES[0])])[0].route == "persona"
    model.set_threshold(0.75, save=True)
    try:
        assert json.loads((tiny_run / "gate" / "config.json").read_text())["threshold"] == 0.75
        assert PrismModel.from_run(tiny_run, device="cpu").threshold == 0.75
    finally:
        model.set_threshold(0.5, save=True)
    with pytest.raises(PrismError, match="in \\[0, 1\\]"):
        model.set_threshold(1.5)


def test_context_window_is_enforced_before_any_work(tiny_run):
    model = PrismModel.from_run(tiny_run, device="cpu", max_model_len=64)
    with pytest.raises(ContextLengthError, match="maximum context length is 64 tokens"):
        model.generate(BASE_QUERIES[0], max_tokens=60)


def test_from_run_explains_what_is_missing(tmp_path, tiny_run):
    with pytest.raises(PrismError, match="not a PRISM run directory"):
        PrismModel.from_run(tmp_path, device="cpu")
    run = RunDir(tmp_path)
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    manifest["stages"]["distill"] = {"status": "partial"}
    run.save_manifest(manifest)
    with pytest.raises(PrismError, match="distill stage has not finished"):
        PrismModel.from_run(tmp_path, device="cpu")
    manifest["stages"]["distill"] = {"status": "done"}
    manifest["config"]["trust_remote_code"] = True
    run.save_manifest(manifest)
    with pytest.raises(PrismError, match="--trust-remote-code"):
        PrismModel.from_run(tmp_path, device="cpu")


def test_continuation_logprobs_match_a_plain_forward(prism_model):
    request = GenerationRequest(user(BASE_QUERIES[0]), route="base", assistant_prefix="Answer:")
    values, decisions = prism_model.continuation_logprobs([request, request], [" Paris", " the capital"])
    tokenizer = prism_model.lm.tokenizer
    for (total, count), continuation in zip(values, [" Paris", " the capital"]):
        prompt = prism_model.prompt(request.messages, "Answer:")
        ids = encode(tokenizer, prompt + continuation)
        tail = len(ids) - len(encode(tokenizer, prompt))
        with torch.no_grad(), prism_model.adapter.disable_adapter():
            logprobs = torch.log_softmax(prism_model.lm.model(input_ids=torch.tensor([ids])).logits[0], -1)
        expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(len(ids) - tail, len(ids)))
        assert count == tail and total == pytest.approx(expected, abs=1e-3)
    assert [d.route for d in decisions] == ["base", "base"]


@pytest.mark.parametrize(("layer", "pool"), [(0, "last"), (1, "mean")])
def test_one_gate_feature_on_every_path_and_dtype(tiny_model_dir, tmp_path, layer, pool):
    """The gate's probability of single-turn prompts is the same from PrismModel's prefill hook (a batch of two
    prompts of different lengths: left padding), from the gate stage's training path (gate_features) and from the
    sidecar's Router, at the run's gate layer and pooling; and a model run in bf16 routes on the float32 blocks it
    was trained on, not on its own bf16 ones. The gate is an untrained one with probabilities near 0.5 (the
    fixture's trained gate saturates at 1.0, where anything agrees)."""
    from prism.inference.router import Router
    from prism.lm.batching import gate_features
    from prism.lm.gate import Gate, GateConfig
    from prism.lm.models import gate_feature_model

    run = build_tiny_run(tmp_path / "run", tiny_model_dir, gate_layer=layer, gate_pool=pool)
    torch.manual_seed(0)
    fresh = Gate(GateConfig(input_dim=json.loads((run / "gate" / "config.json").read_text())["input_dim"],
                            hidden=32, layer=layer, pool=pool))
    fresh.std.fill_(4.0)
    fresh.save(run / "gate")
    queries = [PERSONA_QUERIES[0], "Why?"]
    model = PrismModel.from_run(run, device="cpu")
    assert model.gate_lm is model.lm  # float32: the decision comes from the shared prefill
    hooked = [c.gate_probability for c in model.generate_batch(
        [GenerationRequest(user(q), "auto", SamplingParams(max_tokens=1)) for q in queries])]
    features = gate_features(model.lm, [chat_prompt(model.tokenizer, q) for q in queries], layer, pool)
    trained = fresh.persona_probability(features).tolist()
    assert all(0.05 < p < 0.95 for p in trained)
    routed = [d.gate_probability for d in Router.from_run(run, device="cpu").decide([user(q) for q in queries])]
    assert hooked == pytest.approx(trained, abs=1e-5) and routed == pytest.approx(trained, abs=1e-5)

    half = load_model(str(tiny_model_dir), device="cpu")
    half.model.to(torch.bfloat16)
    adapter = PeftModel.from_pretrained(half.model, str(run / "adapter"), adapter_name="persona")
    bf16 = PrismModel(half, Gate.load(run / "gate"), adapter,
                      gate_lm=gate_feature_model(half, str(tiny_model_dir), layer=layer))
    assert bf16.gate_lm is not bf16.lm
    assert bf16.generate(queries[0], max_tokens=1).gate_probability == pytest.approx(trained[0], abs=1e-5)
    # the negative control: the bf16 model's own blocks give another feature, and move the probability
    own = gate_features(half, [chat_prompt(half.tokenizer, queries[0])], layer, pool)
    assert not torch.allclose(own, features[:1], atol=1e-3)
    assert abs(float(fresh.persona_probability(own)[0]) - trained[0]) > 1e-5


def test_an_adapter_on_the_gates_layer_does_not_load(tiny_model_dir, tmp_path):
    """The gate decides on its layer's output before any adapter runs: an adapter that changes that layer would
    make the shared prefill wrong, so the run does not load."""
    from prism.lm.gate import Gate

    run = build_tiny_run(tmp_path / "run", tiny_model_dir)  # LoRA on blocks 1 and 2
    gate = Gate.load(run / "gate")
    gate.config.layer = 1
    gate.save(run / "gate")
    with pytest.raises(PrismError, match="at or below the gate's layer 1"):
        PrismModel.from_run(run, device="cpu")


def scaled_adapter(run, factor):
    """A retrained adapter as far as a reload can tell: every LoRA B matrix of the run scaled."""
    from safetensors.torch import load_file, save_file

    path = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v * factor if "lora_B" in k else v for k, v in load_file(str(path)).items()}, str(path))


def test_a_batch_in_flight_finishes_on_the_old_adapter_and_the_next_one_serves_the_new_run(tiny_run, tmp_path):
    """The batch being generated finishes on the old adapter (the reload waits for it), the next one runs on
    the new adapter with the new threshold, and a reload that fails changes nothing."""
    import shutil
    import threading

    from prism.lm.gate import save_threshold

    run = shutil.copytree(tiny_run, tmp_path / "run")
    model = PrismModel.from_run(run, device="cpu")
    request = GenerationRequest(user(PERSONA_QUERIES[0]), "persona", SamplingParams(max_tokens=12, ignore_eos=True))
    old_text = model.generate_batch([request])[0].text
    scaled_adapter(run, 4.0)
    save_threshold(run / "gate", 0.9)
    new_text = PrismModel.from_run(run, device="cpu").generate_batch([request])[0].text
    assert new_text != old_text

    stream = model.stream([request])
    deltas = [next(stream) for _ in range(4)]  # the route, then a few tokens: this batch is mid-generation
    reload = threading.Thread(target=model.reload)
    reload.start()
    reload.join(timeout=30)
    assert not reload.is_alive(), "a reload does not wait for a stream: no lock is held between its steps"
    assert len(model.adapter.peft_config) == 2, "the stream's adapter stays loaded while it decodes"
    deltas += list(stream)
    assert "".join(e.delta for e in deltas) == old_text  # finished on the old adapter, never on a mix
    assert list(model.adapter.peft_config) == ["persona-1"], "the old adapter goes once its last stream ends"
    assert model.threshold == 0.9 and model.generate_batch([request])[0].text == new_text

    (run / "gate" / "config.json").write_text("{broken")
    with pytest.raises(PrismError, match="cannot load the gate"):
        model.reload()
    assert model.threshold == 0.9 and model.generate_batch([request])[0].text == new_text


def test_the_adapter_takes_the_base_models_dtype(tiny_run, tiny_model_dir, monkeypatch):
    """A bf16 model gets bf16 LoRA weights (PEFT would upcast them to float32, and every LoRA layer would
    then cast its input and output at each step)."""
    from peft.tuners.lora import LoraLayer

    import prism.inference.transformers as transformers_model

    def bf16_model(*args, **kwargs):
        lm = load_model(str(tiny_model_dir), device="cpu")
        lm.model.to(torch.bfloat16)
        return lm

    monkeypatch.setattr(transformers_model, "load_model", bf16_model)
    model = PrismModel.from_run(tiny_run, device="cpu")
    lora = [m for m in model.lm.model.modules() if isinstance(m, LoraLayer)]
    assert lora and {p.dtype for m in lora for p in m.lora_A.parameters()} == {torch.bfloat16}
    assert model.generate(PERSONA_QUERIES[0], route="persona", max_tokens=3).route == "persona"


def test_a_stream_left_open_blocks_no_one_and_leaves_no_hook_behind(tiny_run):
    """No lock is held between the steps of a stream, and the routing hooks live as long as one forward pass."""
    import threading

    from peft.tuners.lora import LoraLayer

    model = PrismModel.from_run(tiny_run, device="cpu")
    request = GenerationRequest(user(PERSONA_QUERIES[0]), params=SamplingParams(max_tokens=50, ignore_eos=True))
    mixed = [request, GenerationRequest(user(BASE_QUERIES[0]), params=SamplingParams(max_tokens=50, ignore_eos=True))]
    abandoned = model.stream(mixed)
    assert next(abandoned).decision is not None and next(abandoned).decision is not None  # mid-generation now
    layers = [m for m in model.lm.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(not m._forward_pre_hooks for m in layers), "a hook outlived its forward pass"
    done = []
    other = threading.Thread(target=lambda: done.append(model.generate(BASE_QUERIES[1], max_tokens=4)), daemon=True)
    other.start()
    other.join(timeout=60)
    assert done and done[0].completion_tokens == 4, "another request waited on a stream nobody finished"
    assert model.decide([user(PERSONA_QUERIES[0])])[0].route == "persona"
    rest = list(abandoned)  # the abandoned stream still finishes as it would have alone
    alone = model.generate_batch(mixed)
    texts = {}
    for event in rest:
        if event.completion is not None:
            texts[event.index] = event.completion.text
    assert texts == {0: alone[0].text, 1: alone[1].text}


def test_a_run_made_before_gate_layers_and_pooling_routes_as_before(tiny_run, tmp_path):
    """A gate saved before `layer`, `pool` and `kind` existed (block 0, last token, the MLP) and a manifest without
    the gate_* fields: the run loads and routes on the block-0 last-token feature, on both paths."""
    import shutil

    from prism.inference.router import Router
    from prism.lm.batching import block0_features
    from prism.lm.gate import Gate

    run = shutil.copytree(tiny_run, tmp_path / "run")
    config = json.loads((run / "gate" / "config.json").read_text())
    old = {k: v for k, v in config.items() if k not in ("layer", "pool", "kind", "neighbors", "memory")}
    (run / "gate" / "config.json").write_text(json.dumps(old))
    manifest = RunDir(run).manifest()
    manifest["config"] = {k: v for k, v in manifest["config"].items() if not k.startswith("gate_")}
    RunDir(run).save_manifest(manifest)

    gate = Gate.load(run / "gate")
    assert (gate.config.layer, gate.config.pool, gate.config.kind) == (0, "last", "mlp")
    model = PrismModel.from_run(run, device="cpu")
    queries = PERSONA_QUERIES + BASE_QUERIES
    expected = gate.persona_probability(block0_features(model.lm, [chat_prompt(model.tokenizer, q) for q in queries]))
    served = [model.generate(q, max_tokens=1) for q in queries]
    assert [c.gate_probability for c in served] == pytest.approx(expected.tolist(), abs=1e-5)
    assert [c.route for c in served] == ["persona"] * len(PERSONA_QUERIES) + ["base"] * len(BASE_QUERIES)
    routed = Router.from_run(run, device="cpu").decide([user(q) for q in queries])
    assert [d.gate_probability for d in routed] == pytest.approx(expected.tolist(), abs=1e-5)
