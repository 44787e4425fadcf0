import torch

from prism.lm.batching import block0_features
from prism.lm.gate import Gate, GateConfig
from prism.lm.models import chat_prompt, encode
from prism.stages.gate import class_weights, heldout_accuracy, stratified_folds, train_gate


def test_feature_is_block0_output_at_last_token_of_the_inference_prompt(tiny_lm):
    queries = ["What is the capital of France?", "Explain recursion in Python, please, with an example."]
    prompts = [chat_prompt(tiny_lm.tokenizer, q) for q in queries]  # the prompt PRISM serves: no persona
    features = block0_features(tiny_lm, prompts, batch_size=2)  # batched: right padding must not matter
    for query, feature in zip(queries, features):
        ids = torch.tensor([encode(tiny_lm.tokenizer, chat_prompt(tiny_lm.tokenizer, query))])
        with torch.no_grad():
            hidden = tiny_lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(feature, hidden[0, -1], rtol=1e-5, atol=1e-5)
    # The inference-time template: the template's own default system prompt, ending at the assistant turn.
    assert all(p.endswith("<|im_start|>assistant\n") and "You are a helpful assistant." in p for p in prompts)


def test_class_weights_balance_the_classes():
    weights = class_weights(torch.tensor([0, 0, 0, 1]))
    assert torch.allclose(weights, torch.tensor([4 / 6, 4 / 2]))


def test_gate_learns_a_separable_rule_and_reports_heldout_accuracy():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 16, generator=generator)
    labels = (features[:, 3] > 0.5).long()  # an imbalanced but learnable rule
    config = GateConfig(input_dim=16, hidden=32)
    gate = train_gate(features, labels, config, epochs=60, lr=1e-2, seed=0)
    assert (gate.route(features) == labels).float().mean() > 0.95
    metrics = heldout_accuracy(features, labels, config, epochs=60, lr=1e-2, folds=5, seed=0)
    assert metrics["heldout_method"] == "stratified 5-fold cross-validation"
    assert metrics["heldout_accuracy"] > 0.8


def test_stratified_folds_cover_everything_once():
    labels = torch.tensor([0] * 10 + [1] * 4)
    folds = stratified_folds(labels, 4, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(14))
    assert all(int(labels[f].sum()) == 1 for f in folds)  # every fold holds a positive


def test_gate_save_load_round_trip(tmp_path):
    gate = train_gate(torch.randn(8, 4), torch.tensor([0, 1] * 4), GateConfig(input_dim=4, hidden=8), epochs=2,
                      lr=1e-3, seed=0)
    gate.save(tmp_path)
    loaded = Gate.load(tmp_path)
    x = torch.randn(3, 4)
    assert torch.equal(gate.persona_probability(x), loaded.persona_probability(x))


def test_constant_gate_routes_everything_one_way(tmp_path):
    Gate(GateConfig(input_dim=4, constant_route=0)).save(tmp_path)
    assert Gate.load(tmp_path).route(torch.randn(5, 4)).tolist() == [0] * 5
