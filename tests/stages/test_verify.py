import pytest
import torch

from prism.engines.base import options_from_logits
from prism.engines.local import LocalEngine
from prism.lm.models import first_token_ids
from prism.stages.judge_pairwise import (
    OPTIONS,
    ORDERS,
    both_orders_label,
    decide,
    judge_prompt,
    position_prior,
)
from prism.stages.records import Judgment
from prism.stages.verify import judge_quality, judge_warning


def test_both_orders_rule():
    assert both_orders_label({"persona_first": "A", "persona_second": "B"}) == 1
    assert both_orders_label({"persona_first": "A", "persona_second": "A"}) == 0  # won one order only
    assert both_orders_label({"persona_first": "B", "persona_second": "B"}) == 0  # won one order only
    assert both_orders_label({"persona_first": "TIE", "persona_second": "B"}) == 0
    assert both_orders_label({"persona_first": "B", "persona_second": "A"}) == 0


def test_verdict_probs_read_the_option_tokens(tiny_lm):
    ids = {option: first_token_ids(tiny_lm.tokenizer, option) for option in OPTIONS}
    logits = torch.full((tiny_lm.model.config.vocab_size,), -20.0)
    logits[ids["B"][0]] = 5.0
    logits[ids["A"][0]] = 3.0
    verdict = options_from_logits(logits, ids)
    probs, mass = verdict.probs, verdict.mass
    assert decide(probs) == "B"
    assert probs["B"] > probs["A"] > probs["TIE"]
    assert sum(probs.values()) == pytest.approx(1.0)
    assert 0.99 < mass <= 1.0


def test_position_calibration_removes_a_constant_slot_bias():
    # A judge that always leans to slot A: raw verdicts say A in both orders (no winner),
    # but the pair where B-slot probability rises above its average is a real preference for B.
    judgments = [{"A": 0.6, "B": 0.3, "TIE": 0.1}, {"A": 0.5, "B": 0.4, "TIE": 0.1}]
    prior = position_prior(judgments)
    assert prior == pytest.approx({"A": 0.55, "B": 0.35, "TIE": 0.1})
    assert decide(judgments[1]) == "A"
    assert decide(judgments[1], prior) == "B"
    assert decide(judgments[0], prior) == "A"
    assert position_prior([]) == {o: pytest.approx(1 / 3) for o in OPTIONS}


def test_judge_prompt_truncates_answers_and_ends_at_the_verdict(tiny_lm):
    prompt = LocalEngine(tiny_lm).render(judge_prompt("Q?", "a" * 50, "b" * 50, max_chars=10))
    assert "a" * 10 in prompt and "a" * 11 not in prompt
    assert prompt.endswith("<|im_start|>assistant\nVerdict:")


def test_position_calibration_leaves_tie_alone():
    """A judge that rarely says TIE: dividing TIE by its small run mean would turn a verdict with TIE at
    p=0.009 (mean 0.002) into TIE. Only the A/B split may move; TIE keeps its raw probability."""
    judgments = [{"A": 0.89, "B": 0.101, "TIE": 0.009}, {"A": 0.90, "B": 0.099, "TIE": 0.001},
                 {"A": 0.85, "B": 0.149, "TIE": 0.001}, {"A": 0.88, "B": 0.119, "TIE": 0.001}]
    prior = position_prior(judgments)
    assert prior["TIE"] < 0.005
    assert all(decide(j, prior) != "TIE" for j in judgments)
    # a verdict where TIE really is the most probable stays TIE
    assert decide({"A": 0.3, "B": 0.2, "TIE": 0.5}, prior) == "TIE"


def judgment(query_id: str, order: str, probs: dict[str, float], mass: float = 0.4) -> Judgment:
    return Judgment(id=f"{query_id}:{order}", query_id=query_id, order=order, probs=probs, option_mass=mass)


def test_judge_quality_flags_a_position_bound_judge():
    always_a = {"A": 0.85, "B": 0.1, "TIE": 0.05}
    bound = [judgment(f"q{i}", order, always_a) for i in range(4) for order in ORDERS]
    quality = judge_quality(bound, [], {"judge_calibration": "position"})
    assert quality["pairs"] == 4 and quality["order_consistency"] == 0.0 and quality["slot_a_share"] == 1.0
    assert quality["option_mass_mean"] == pytest.approx(0.4)
    assert quality["distill_raw_rule"] == 0 and quality["position_bound"]
    assert "position-bound" in judge_warning(quality) and "--engine openai" in judge_warning(quality)
    # a judge that follows the content: persona wins q0 in both orders, plain wins q1 in both
    fair = [judgment("q0", "persona_first", {"A": 0.8, "B": 0.1, "TIE": 0.1}),
            judgment("q0", "persona_second", {"A": 0.1, "B": 0.8, "TIE": 0.1}),
            judgment("q1", "persona_first", {"A": 0.1, "B": 0.8, "TIE": 0.1}),
            judgment("q1", "persona_second", {"A": 0.8, "B": 0.1, "TIE": 0.1})]
    quality = judge_quality(fair, [], {"judge_calibration": "none"})
    assert quality["order_consistency"] == 1.0 and quality["slot_a_share"] == 0.5
    assert quality["distill_raw_rule"] == 1 == quality["distill_calibrated_rule"]
    assert not quality["position_bound"] and judge_warning(quality) is None
