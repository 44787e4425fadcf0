import pytest
import torch

from helpers import train_gate
from prism.errors import PrismError
from prism.lm.batching import block0_features, gate_features
from prism.lm.gate import Gate, GateConfig
from prism.lm.models import chat_prompt, encode
from prism.stages.gate import as_targets
from prism.stages.gate_selection import (
    CANDIDATES,
    OUTER_REPEATS,
    Candidate,
    candidates_for,
    class_weights,
    fit,
    nested_cv,
    out_of_fold,
    select,
    threshold_for_gain,
)


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


@pytest.mark.parametrize("layer", [0, 1])
def test_mean_feature_pools_the_users_turn_of_the_chosen_layer(tiny_lm, layer):
    """The mean feature: hidden_states[layer + 1] averaged over the tokens from the user's text on (the template's
    fixed prefix, its default system prompt, left out), batched with right padding, the last feature its last
    token."""
    tokenizer = tiny_lm.tokenizer
    queries = ["What is the capital of France?", "Explain recursion in Python, please, with an example."]
    prompts = [chat_prompt(tokenizer, q) for q in queries]
    mean = gate_features(tiny_lm, prompts, layer, "mean", batch_size=2)
    last = gate_features(tiny_lm, prompts, layer, "last", batch_size=2)
    prefix = encode(tokenizer, prompts[0].split(queries[0])[0])  # the template up to the user's text
    for prompt, pooled, at_last in zip(prompts, mean, last):
        ids = encode(tokenizer, prompt)
        assert ids[: len(prefix)] == prefix
        with torch.no_grad():
            hidden = tiny_lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1]
        torch.testing.assert_close(pooled, hidden[0, len(prefix):].mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(at_last, hidden[0, -1], rtol=1e-5, atol=1e-5)


def test_class_weights_balance_the_classes():
    weights = class_weights(as_targets(torch.tensor([0, 0, 0, 1]), 2))
    assert torch.allclose(weights, torch.tensor([4 / 6, 4 / 2]))


def test_nested_cross_validation_scores_a_learnable_rule_and_a_rule_of_noise():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(80, 16, generator=generator)
    labels = (features[:, 3] > 0.5).long()  # an imbalanced but learnable rule
    config = GateConfig(input_dim=16, hidden=32)

    def targets_for(rows):
        return as_targets(labels[rows], 2)

    learnable = nested_cv(features, labels, targets_for, config, CANDIDATES[:4], folds=5, epochs=60, lr=1e-2, seed=0)
    assert learnable["heldout_accuracy"] > 0.85 and learnable["heldout_auroc"] > 0.9
    low, high = learnable["heldout_intervals"]["auroc"]
    assert low <= learnable["heldout_auroc"] <= high
    noise = torch.randint(0, 2, (80,), generator=generator)
    random = nested_cv(features, noise, lambda rows: as_targets(noise[rows], 2), config, CANDIDATES[:4], folds=5,
                       epochs=60, lr=1e-2, seed=0)
    assert random["heldout_auroc"] < 0.7  # what it reports on rows it never saw is not what it fitted


def test_the_classifier_is_chosen_by_its_cross_validated_score():
    """Labels by distance from the centre: no linear rule separates them, the nearest neighbours do."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(120, 4, generator=generator)
    labels = (features.norm(dim=1) > 2.0).long()
    candidates = (Candidate("logistic", {"C": 1.0}), Candidate("knn", {"neighbors": 5}))
    chosen, scores, _ = select(features, labels, lambda rows: as_targets(labels[rows], 2),
                               GateConfig(input_dim=4), candidates, epochs=1, lr=1e-2, seed=0)
    assert chosen.kind == "knn" and scores["knn neighbors=5"] < scores["logistic C=1"]


@pytest.mark.parametrize("candidate", list({c.kind: c for c in CANDIDATES}.values()), ids=lambda c: c.name)
def test_every_kind_fits_soft_targets_and_round_trips(tmp_path, candidate):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, generator=generator)
    rate = torch.sigmoid(3 * features[:, 0])  # a persona win rate that rises with the first feature
    domains = ["helped" if x > 0 else "hurt" for x in features[:, 0]]  # read by the domain gate alone
    gate = fit(candidate, features, torch.stack([1 - rate, rate], 1), GateConfig(input_dim=6, hidden=16), epochs=80,
               lr=1e-2, seed=0, domains=domains)
    probability = gate.persona_probability(features)
    assert float(torch.corrcoef(torch.stack([probability, rate]))[0, 1]) > 0.6
    gate.save(tmp_path)
    loaded = Gate.load(tmp_path)
    assert loaded.config.kind == candidate.kind and loaded.config.domains == gate.config.domains
    torch.testing.assert_close(loaded.persona_probability(features), probability)


def test_the_threshold_routes_the_rows_that_gain_and_base_when_none_does():
    probabilities = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.2])
    gains = torch.tensor([1.0, 0.5, -1.0, 1.5, -1.0])  # the best cut routes the top four: 2.0
    chosen = threshold_for_gain(probabilities, gains)
    assert chosen["threshold"] == pytest.approx(0.4) and chosen["oof_routed_share"] == pytest.approx(0.8)
    assert chosen["oof_gain_per_query"] == pytest.approx(2.0 / 5)
    tie = threshold_for_gain(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1.0, -1.0, 1.0]))
    assert tie["threshold"] == pytest.approx(0.85)  # routing one or all three gains 1: the higher threshold
    losing = threshold_for_gain(torch.tensor([0.9, 0.5]), torch.tensor([-1.0, -0.5]))
    assert losing["threshold"] == 1.0 and losing["oof_routed_share"] == 0.0


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


def test_the_shipped_threshold_is_chosen_on_out_of_fold_probabilities(tmp_path):
    """The saved gate's threshold is the gain-maximising cut of its own classifier's out-of-fold probabilities,
    never of the shipped gate's own probabilities on the rows it was fitted to (a kNN gate counts each row's own vote
    there)."""
    from types import SimpleNamespace

    from prism.config import resolve_config
    from prism.stages.gate import fit_gate

    generator = torch.Generator().manual_seed(1)
    features = torch.randn(60, 8, generator=generator)
    labels = (features[:, 0] + torch.randn(60, generator=generator) > 0).long()
    gains = torch.where(labels == 1, 1.0, -1.0) * torch.rand(60, generator=generator)
    config = resolve_config(model="x", gate_classifier="knn", gate_folds=5, seed=0)
    ctx = SimpleNamespace(config=config, run=SimpleNamespace(path=tmp_path))
    info = fit_gate(ctx, features, labels, GateConfig(input_dim=8), "gate", gains=gains)

    def targets_for(rows):
        return as_targets(labels[rows], 2)

    training = {"epochs": config.gate_epochs, "lr": config.gate_lr, "seed": 0}
    chosen, _, _ = select(features, labels, targets_for, GateConfig(input_dim=8), CANDIDATES[3:5], folds=5,
                          repeats=OUTER_REPEATS, **training)
    oof = out_of_fold(chosen, features, labels, targets_for, GateConfig(input_dim=8), folds=5, **training)
    expected = threshold_for_gain(oof, gains)["threshold"]
    shipped = Gate.load(tmp_path / "gate")
    assert info["classifier"]["chosen"] == chosen.name == f"knn neighbors={shipped.config.neighbors}"
    assert info["threshold"]["threshold"] == pytest.approx(expected)
    assert shipped.config.threshold == pytest.approx(expected)
    in_sample = threshold_for_gain(shipped.persona_probability(features), gains)["threshold"]
    assert in_sample != pytest.approx(expected)


def test_the_domain_rate_auroc_is_the_hand_counted_share_of_ranked_pairs():
    from prism.stages.gate import domain_rate_auroc

    labels = torch.tensor([1, 0, 1, 0, 0, 0, 1, 0])
    domains = ["a"] * 4 + ["b"] * 4
    # 3 positives x 5 negatives: a's 2 positives over b's 3 negatives (6), a tie with a's 2 negatives (4 x 1/2),
    # b's positive tied with b's 3 negatives (3 x 1/2), below a's 2 negatives (0): 9.5 of 15 pairs
    assert domain_rate_auroc(labels, domains, {"a": 0.5, "b": 0.25}) == pytest.approx(9.5 / 15)
    assert domain_rate_auroc(torch.zeros(8, dtype=torch.long), domains, {"a": 0.5, "b": 0.25}) is None


def _two_domains(rows: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Rows of two domains a linear probe tells apart (feature 0 shifted by domain) among noise features."""
    generator = torch.Generator().manual_seed(seed)
    domains = ["helped" if i % 3 else "hurt" for i in range(rows)]
    features = torch.randn(rows, 8, generator=generator)
    features[:, 0] += torch.tensor([2.0 if d == "helped" else -2.0 for d in domains])
    return features, domains


def test_the_domain_gate_weighs_each_domains_mean_target_by_its_probe():
    """P(adapter | x) = sum over domains of P(domain | x) x the domain's mean target: the probe is scikit-learn's
    logistic regression on the standardized feature, the means are counted here."""
    from sklearn.linear_model import LogisticRegression

    features, domains = _two_domains(30, seed=0)
    rates = torch.linspace(0, 1, 30)  # each row's own target: unrelated to its feature
    gate = fit(CANDIDATES[-1], features, torch.stack([1 - rates, rates], 1), GateConfig(input_dim=8), epochs=1,
               lr=1e-2, seed=0, domains=domains)
    means = {d: float(rates[[i for i, x in enumerate(domains) if x == d]].mean()) for d in ("helped", "hurt")}
    standardized = (features - features.mean(0)) / features.std(0)
    probe = LogisticRegression(C=1.0, max_iter=5000).fit(standardized.numpy(), domains)
    by_hand = probe.predict_proba(standardized.numpy()) @ [means[c] for c in probe.classes_]
    torch.testing.assert_close(gate.persona_probability(features), torch.tensor(by_hand, dtype=torch.float32),
                               atol=1e-4, rtol=1e-4)
    assert gate.config.domains == ["hurt", "helped"]  # in the order the rows name them


def test_the_domain_gate_is_chosen_where_one_draw_labels_a_domain_that_the_persona_helps_by_half():
    """Per-query labels are coin flips inside the helped domain (a win rate of 0.5, one draw each) and losses in the
    other: only the domain carries the signal, and the selection sees it; every other kind chases the flips."""
    features, domains = _two_domains(90, seed=1)
    generator = torch.Generator().manual_seed(2)
    flips = torch.randint(0, 2, (90,), generator=generator)
    labels = torch.tensor([int(f) if d == "helped" else 0 for f, d in zip(flips, domains)])
    chosen, scores, _ = select(features, labels, lambda rows: as_targets(labels[rows], 2),
                               GateConfig(input_dim=8), candidates_for("auto", domains), epochs=30, lr=1e-3, seed=0,
                               domains=domains, folds=5, repeats=OUTER_REPEATS)
    assert chosen.kind == "domain", scores
    assert min(v for k, v in scores.items() if not k.startswith("domain")) > scores[chosen.name] + 0.02


def test_the_domain_gate_needs_two_domains():
    assert all(c.kind != "domain" for c in candidates_for("auto", ["a"] * 5))
    assert all(c.kind != "domain" for c in candidates_for("auto", None))
    with pytest.raises(PrismError, match="one domain: use auto"):
        candidates_for("domain", ["a"] * 5)
    from prism.config import resolve_config

    with pytest.raises(PrismError, match="this run has one domain"):
        resolve_config(model="x", domains=["a"], gate_classifier="domain")
    assert resolve_config(model="x", domains=["a", "b"], gate_classifier="domain").gate_classifier == "domain"


@pytest.mark.parametrize("candidate", [CANDIDATES[0], CANDIDATES[3], CANDIDATES[-1]], ids=lambda c: c.name)
def test_a_rows_out_of_fold_probability_never_sees_its_own_target(candidate):
    """Whatever one row's target is, its out-of-fold probability stays: each fold's gate is fitted without it (the
    domain gate's means included). The other rows' do move: the target is used."""
    features, domains = _two_domains(30, seed=3)
    labels = torch.tensor([1 if d == "helped" else 0 for d in domains])
    targets = as_targets(labels, 2)
    changed = targets.clone()
    changed[0] = torch.tensor([1.0, 0.0]) if labels[0] else torch.tensor([0.0, 1.0])
    probabilities = [out_of_fold(candidate, features, labels, lambda rows, t=t: t[rows], GateConfig(input_dim=8),
                                 folds=5, epochs=1, lr=1e-2, seed=0, domains=domains) for t in (targets, changed)]
    assert float(probabilities[0][0]) == pytest.approx(float(probabilities[1][0]), abs=1e-6)
    assert not torch.allclose(probabilities[0][1:], probabilities[1][1:])
