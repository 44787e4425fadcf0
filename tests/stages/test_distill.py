import pytest
import torch
from peft import get_peft_model

from prism.config import resolve_config
from prism.errors import PrismError
from prism.lm.batching import gate_features
from prism.lm.models import chat_prompt, decoder_layers, layers_pattern, supports_system_role
from prism.stages.distill import (
    Example,
    TeacherTargets,
    build_example,
    distill_loss,
    lora_config,
    persona_signal,
    teacher_targets,
    topk_kl,
)

PERSONA = "You are a meticulous safety expert who always explains risks first."
DATA = [
    ("How do I store cleaning chemicals?", "Keep them apart, labelled, and away from children."),
    ("Is it safe to jump a car battery?", "Yes, if you connect the cables in the right order."),
]


def test_topk_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    logits = torch.randn(5, 50) * 3
    for k in (8, 50):  # k below the vocabulary too: no floor from the student's mass outside the top-k
        top = logits.topk(k, dim=-1)
        same = TeacherTargets(top.values, top.indices.int())
        assert float(topk_kl(logits, same, 2.0)) == pytest.approx(0.0, abs=1e-6)
        assert float(topk_kl(torch.randn(5, 50) * 3, same, 2.0)) > 0.01


def test_answer_tokens_are_shared_and_prompts_differ(tiny_lm):
    example = build_example(tiny_lm.tokenizer, DATA[0][0], PERSONA, DATA[0][1], max_length=1024)
    tail = example.answer_len
    assert example.teacher_ids[-tail:] == example.student_ids[-tail:]
    assert example.teacher_ids[-1] == tiny_lm.tokenizer.eos_token_id
    assert PERSONA in tiny_lm.tokenizer.decode(example.teacher_ids)
    assert PERSONA not in tiny_lm.tokenizer.decode(example.student_ids)


def test_teacher_sees_the_persona_kl_starts_positive_and_falls(tiny_lm):
    config = resolve_config(model="x", lora_dropout=0.0)
    examples = [build_example(tiny_lm.tokenizer, q, PERSONA, a, 1024) for q, a in DATA]
    targets = teacher_targets(tiny_lm, examples, top_k=64, micro_batch=2)
    model = get_peft_model(tiny_lm.model, lora_config(config, len(decoder_layers(tiny_lm.model)),
                                                     layers_pattern(tiny_lm.model)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    pad = tiny_lm.tokenizer.pad_token_id
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss, tokens = distill_loss(model, examples, targets, pad, temperature=2.0)
        (loss / tokens).backward()
        optimizer.step()
        losses.append(loss.item() / tokens)
    assert losses[0] > 1e-3  # at step 0 (LoRA B = 0) the student is the base model without the persona
    assert losses[-1] < 0.6 * losses[0]


def without_persona(example: Example) -> Example:
    """The authors' bug, planted: the teacher prompt built without the persona."""
    return Example(list(example.student_ids), list(example.student_ids), example.answer_len)


def test_step0_loss_is_zero_without_the_persona_and_positive_with_it(tiny_lm):
    """The negative control: a teacher that does not see the persona is the student at step 0 (LoRA B = 0),
    so the loss must be zero; with the persona it must be clearly above that."""
    config = resolve_config(model="x", lora_dropout=0.0)
    pad = tiny_lm.tokenizer.pad_token_id
    with_persona = [build_example(tiny_lm.tokenizer, q, PERSONA, a, 1024) for q, a in DATA]
    planted = [without_persona(e) for e in with_persona]
    model = get_peft_model(tiny_lm.model, lora_config(config, len(decoder_layers(tiny_lm.model)),
                                                     layers_pattern(tiny_lm.model)))
    signals = {}
    for name, examples in (("persona", with_persona), ("planted", planted)):
        targets = teacher_targets(tiny_lm, examples, top_k=64, micro_batch=2)
        signals[name] = persona_signal(model, examples, targets, pad, temperature=2.0, micro_batch=1)
        loss, tokens = distill_loss(model, examples, targets, pad, temperature=2.0)
        assert loss.item() / tokens == pytest.approx(signals[name], rel=1e-4, abs=1e-7)
    assert signals["planted"] < 1e-6
    assert signals["persona"] > 1e-3


@pytest.mark.parametrize("gate_layer", [0, 1])
def test_no_lora_up_to_the_gate_layer_and_its_output_identical_with_adapter_on_and_off(tiny_lm, gate_layer):
    """With gate_layer L the adapter has no LoRA weight in blocks 0..L, so a routed request's prefill through L is
    base's: the gate's feature (both poolings) is the same vector with the adapter on and off."""
    config = resolve_config(model="x", gate_layer=gate_layer)
    model = get_peft_model(tiny_lm.model, lora_config(config, len(decoder_layers(tiny_lm.model)),
                                                     layers_pattern(tiny_lm.model)))
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    blocks = {int(n.split(".layers.")[1].split(".")[0]) for n in lora_names}
    assert lora_names and blocks == set(range(gate_layer + 1, 3))
    with torch.no_grad():  # make the adapter non-trivial so "identical" means something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    tiny_lm.model = model
    prompts = [chat_prompt(tiny_lm.tokenizer, q) for q, _ in DATA]
    for pool in ("last", "mean"):
        with_adapter = gate_features(tiny_lm, prompts, gate_layer, pool)
        with model.disable_adapter():
            without_adapter = gate_features(tiny_lm, prompts, gate_layer, pool)
        assert torch.equal(with_adapter, without_adapter)
    ids = torch.tensor([tiny_lm.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert not torch.allclose(on, off)  # ... while the full model does change


def test_a_gate_layer_with_no_block_above_it_is_one_clear_error(tiny_lm):
    with pytest.raises(PrismError, match="gate_layer 2 leaves no block above it for the adapter: this model has 3"):
        lora_config(resolve_config(model="x", gate_layer=2), 3, "layers")


# ChatML whose template refuses a system turn, as Gemma's and Mistral's early templates do.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_without_a_system_role_gets_the_persona_in_the_first_user_turn(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    assert not supports_system_role(tokenizer)
    query, answer = DATA[0]
    prompt = chat_prompt(tokenizer, query, system=PERSONA)
    assert prompt == f"<|im_start|>user\n{PERSONA}\n\n{query}<|im_end|>\n<|im_start|>assistant\n"
    example = build_example(tokenizer, query, PERSONA, answer, 1024)
    assert PERSONA in tokenizer.decode(example.teacher_ids) and PERSONA not in tokenizer.decode(example.student_ids)


def test_the_lm_head_runs_over_the_answer_span_only_with_the_full_forwards_logits(tiny_lm):
    """Left padding and logits_to_keep: the LM head sees max(answer_len) + 1 positions, and each row's answer
    logits equal those of a plain full-length forward of that row alone."""
    from prism.stages.distill import answer_span_logits

    tokenizer = tiny_lm.tokenizer
    examples = [build_example(tokenizer, q, PERSONA, a, max_length=256) for q, a in DATA]
    examples.append(build_example(tokenizer, "Hi?", PERSONA, "Hello there, friend.", max_length=256))
    widths = []
    head = tiny_lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, inputs, _o: widths.append(inputs[0].shape[1]))
    try:
        with torch.no_grad():
            parts = answer_span_logits(tiny_lm.model, [e.teacher_ids for e in examples],
                                       [e.answer_len for e in examples], tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert widths == [max(e.answer_len for e in examples) + 1] < [max(len(e.teacher_ids) for e in examples)]
    for example, part in zip(examples, parts):
        with torch.no_grad():
            full = tiny_lm.model(input_ids=torch.tensor([example.teacher_ids])).logits[0]
        start = len(example.teacher_ids) - example.answer_len - 1
        assert part.shape == (example.answer_len, full.shape[-1])
        assert torch.allclose(part, full[start : start + example.answer_len], atol=1e-4)


def test_gradient_checkpointing_recomputes_and_changes_no_gradient(tiny_lm, monkeypatch):
    from prism.stages.distill import set_checkpointing, use_gradient_checkpointing

    tokenizer = tiny_lm.tokenizer
    examples = [build_example(tokenizer, q, PERSONA, a, max_length=256) for q, a in DATA]
    targets = teacher_targets(tiny_lm, examples, top_k=16, micro_batch=2)
    cfg = resolve_config(model="x", preset="tiny", lora_dropout=0.0)
    torch.manual_seed(0)
    model = get_peft_model(tiny_lm.model, lora_config(cfg, len(decoder_layers(tiny_lm.model)),
                                                      layers_pattern(tiny_lm.model)))
    for p in model.parameters():  # LoRA B starts at zero: give it weight so every gradient is non-trivial
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    model.train()
    calls = []
    # the backward pass re-runs forward methods but not module hooks: count the MLPs' forward calls
    mlp_class = type(decoder_layers(tiny_lm.model)[1].mlp)
    mlp_forward = mlp_class.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return mlp_forward(self, *args, **kwargs)

    monkeypatch.setattr(mlp_class, "forward", counted)

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        calls.clear()
        loss, _ = distill_loss(model, examples, targets, tokenizer.pad_token_id, temperature=2.0)
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain, plain_calls = gradients(), len(calls)
    set_checkpointing(model, True)
    recomputed, recomputed_calls = gradients(), len(calls)
    set_checkpointing(model, False)
    layers = len(decoder_layers(tiny_lm.model))
    assert (plain_calls, recomputed_calls) == (layers, 2 * layers)  # every block ran again in the backward pass
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, recomputed))
    assert use_gradient_checkpointing(resolve_config(model="x", distill_gradient_checkpointing="on"), tiny_lm)
    assert not use_gradient_checkpointing(resolve_config(model="x"), tiny_lm)  # auto, on a CPU


@pytest.mark.parametrize("lr", [2e-3, 0.0])
def test_the_epoch_mean_loss_falls_when_the_adapter_learns_and_only_then(tiny_config, tmp_path, lr):
    """The check the embedded e2e test makes of its distillation, on the tiny model (whose own judge never lets the
    persona win: three labels are set to distil by hand); lr 0 is its negative control."""
    from helpers import epoch_mean_losses
    from prism.runs import RunDir
    from prism.stages.pipeline import bootstrap, distill_run

    run = tmp_path / "run"
    bootstrap(tiny_config(domains=["math", "safety"], distill_epochs=4, distill_lr=lr, lora_dropout=0.0,
                          answer_max_tokens=24), run)
    labels = RunDir(run).read("labels")
    for record in labels[:3]:
        record.update(label=1, split="distill", outcome="win")
    RunDir(run).rewrite("labels", labels)
    distill_run(run, force=True)
    epochs = epoch_mean_losses(run)
    assert len(epochs) == 4
    assert (epochs[-1] < 0.9 * epochs[0]) == (lr > 0), epochs
