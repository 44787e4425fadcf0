import numpy as np
import pytest
import torch

from prism.errors import PrismError
from prism.lm.decoding import DRAW_BLOCK, SamplingParams, TextStream, _nucleus, draw, sample_token


def test_greedy_and_nucleus_sampling():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    generator = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(), generator) == 1
    # top_p below the top token's mass keeps only that token, whatever the temperature
    assert {sample_token(logits, SamplingParams(temperature=2.0, top_p=0.3), generator) for _ in range(20)} == {1}
    drawn = {sample_token(logits, SamplingParams(temperature=1.0), generator) for _ in range(200)}
    assert {1, 2} <= drawn


def test_a_draw_follows_the_distribution_and_never_takes_an_entry_without_mass():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])  # massless entries first, between and last
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs * 7.0, generator) for _ in range(20_000)]), minlength=6)
    assert counts[[0, 2, 5]].tolist() == [0, 0, 0]
    # 20,000 draws: each share within 0.015 of its probability (over 4 standard deviations)
    assert torch.allclose(counts / 20_000, probs, atol=0.015), counts
    one_hot = torch.zeros(49_152)
    one_hot[-1] = 1.0  # the whole mass on the last entry: every uniform lands there
    assert {draw(one_hot, generator) for _ in range(50)} == {49_151}


def test_a_draw_takes_the_entry_a_whole_cumulative_sum_would_take():
    """The two-level search (block sums, then one block) picks, for each uniform, the first entry whose
    cumulative sum passes it, as a search over the whole cumulative sum does: lengths that are not a multiple of
    the block, massless entries, mass in one block only."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        size = int(rng.integers(1, 3 * DRAW_BLOCK + 7))
        probs = rng.exponential(size=size) * (rng.random(size) < rng.uniform(0.05, 1.0))
        if trial % 10 == 0:  # everything in one block
            probs[:] = 0.0
            probs[int(rng.integers(size))] = rng.uniform(0.1, 3.0)
        if not probs.any():
            probs[-1] = 1.0
        seed = int(rng.integers(2**31))
        cumulative = np.cumsum(probs)
        uniform = float(torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        expected = int(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"))
        assert draw(probs, torch.Generator().manual_seed(seed)) == expected, (trial, size)


def test_the_nucleus_is_the_most_likely_entries_up_to_top_p_of_the_mass():
    """The nucleus found among the most likely few hundred entries (more when the distribution is flat) is the
    one a sort of the whole vector gives."""
    rng = np.random.default_rng(1)
    for trial in range(200):
        weights = np.exp(rng.standard_normal(int(rng.integers(2, 5000))) * rng.uniform(0.01, 5)).astype(np.float32)
        top_p = float(rng.uniform(0.05, 0.99))
        order = np.argsort(-weights, kind="stable")
        above = np.cumsum(weights[order], dtype=np.float64) - weights[order]
        expected = np.sort(order[above < top_p * weights.sum(dtype=np.float64)])
        kept = _nucleus(weights, top_p)
        assert np.flatnonzero(kept).tolist() == expected.tolist(), trial
        assert np.array_equal(kept[expected], weights[expected])


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(stop=[""])])
def test_sampling_params_reject_bad_values(bad):
    with pytest.raises(PrismError):
        SamplingParams(**bad)


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_at_it(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    tokens = tokenizer("The quick brown fox jumps", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=["fox"])
    shown = "".join(stream.add(t) for t in tokens)
    assert stream.stopped and stream.text == "The quick brown "
    assert shown + stream.flush() == "The quick brown "

    plain = TextStream(tokenizer, stop=[])
    assert "".join(plain.add(t) for t in tokens) + plain.flush() == "The quick brown fox jumps"


def test_a_batch_is_sampled_as_its_rows_would_be_one_by_one():
    """sample_tokens (one argmax for the greedy rows, one copy of the sampled rows) draws what sample_token
    draws row by row, each row from its own seeded generator."""
    import torch

    from prism.lm.decoding import SamplingParams, sample_token, sample_tokens

    logits = torch.randn(6, 50) * 3
    params = [SamplingParams(temperature=t, top_p=p, seed=s)
              for t, p, s in ((0.0, 1.0, 1), (0.8, 1.0, 2), (0.0, 1.0, 3), (1.2, 0.9, 4), (0.7, 0.5, 5), (0.0, 1, 6))]
    batched = sample_tokens(logits, params, [p.generator() for p in params])
    one_by_one = [sample_token(row, p, p.generator()) for row, p in zip(logits, params)]
    assert batched == one_by_one
    assert sample_tokens(logits[:2], params[1:3], [p.generator() for p in params[1:3]]) == \
        [sample_token(logits[0], params[1], params[1].generator()), int(logits[1].argmax())]
