import pytest
import torch

from prism.engine import LocalEngine, options_from_logits
from prism.models import first_token_ids
from prism.verify import OPTIONS, both_orders_label, decide, judge_prompt, position_prior


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
