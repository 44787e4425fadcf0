"""The transformers bootstrap engine: a prompt asked several times in one batch (the K samples of a label) is
prefilled once, a prefix every scored prompt shares (a judge's instructions) is run once, and every row still gets
what it gets without the sharing."""

from __future__ import annotations

import torch

from prism.engines.local import MIN_SHARED_PREFIX, generate_batches, last_token_logits, shared_prefix_length
from prism.lm.models import LoadedModel, chat_prompt, encode

QUESTIONS = ("What is a prime number?", "Name a colour.", "Why is the sky blue?")


def _generate(lm: LoadedModel, prompts: list[str], seeds: list[int], temperature: float, share: bool,
              top_p: float = 1.0) -> tuple[list[tuple[str, int, bool]], list[tuple[int, ...]]]:
    """Each prompt's (text, new tokens, finished), and the shape of every input the model's embedding saw."""
    seen: list[tuple[int, ...]] = []
    handle = lm.model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    try:
        results: list = [None] * len(prompts)
        for indices, outputs in generate_batches(lm, prompts, max_new_tokens=6, temperature=temperature, seeds=seeds,
                                                 batch_size=16, share_prompts=share, top_p=top_p):
            for i, out in zip(indices, outputs):
                results[i] = (out.text, out.new_tokens, out.finished)
    finally:
        handle.remove()
    return results, [tuple(shape) for shape in seen]


def test_repeated_prompts_share_one_prefill_and_generate_what_they_generate_alone(tiny_lm: LoadedModel) -> None:
    prompts = [chat_prompt(tiny_lm.tokenizer, q) for q in QUESTIONS for _ in range(3)]  # 3 prompts x 3 samples
    seeds = list(range(len(prompts)))
    for temperature in (0.0, 0.8):
        shared, shared_inputs = _generate(tiny_lm, prompts, seeds, temperature, share=True)
        alone, alone_inputs = _generate(tiny_lm, prompts, seeds, temperature, share=False)
        # exact equality is safe here: the two paths differ by float rounding (~1e-6) and the tiny model's greedy
        # steps on these prompts have top-2 logit gaps of 0.021 at least
        assert shared == alone
        # alone: the 9 rows' whole prompts (9, W) at once; shared: the 3 distinct ones but their last token
        # (3, W - 1), then the 9 rows' last prompt token (9, 1); decoding is the same afterwards
        rows, width = alone_inputs[0]
        assert rows == len(prompts)
        assert shared_inputs[:2] == [(len(QUESTIONS), width - 1), (len(prompts), 1)]
        assert shared_inputs[2:] == alone_inputs[1:]
    # different seeds for the same prompt still sample their own answers
    sampled, _ = _generate(tiny_lm, [prompts[0]] * 6, list(range(6)), 1.5, share=True)
    assert len({text for text, _, _ in sampled}) > 1


def test_distinct_prompts_take_the_plain_path(tiny_lm: LoadedModel) -> None:
    prompts = [chat_prompt(tiny_lm.tokenizer, q) for q in QUESTIONS]
    shared, shared_inputs = _generate(tiny_lm, prompts, [0, 1, 2], 0.0, share=True)
    alone, alone_inputs = _generate(tiny_lm, prompts, [0, 1, 2], 0.0, share=False)
    assert shared == alone
    assert shared_inputs == alone_inputs
    assert shared_inputs[0][0] == len(prompts)


JUDGE = "You are an impartial judge. Compare the two answers below and reply with exactly one of A, B or TIE."


def test_a_prefix_every_prompt_shares_is_run_once_and_the_logits_stay_the_same(tiny_lm: LoadedModel) -> None:
    prompts = [chat_prompt(tiny_lm.tokenizer, q, system=JUDGE) for q in QUESTIONS + ("Yes?",)]
    encoded = [encode(tiny_lm.tokenizer, p) for p in prompts]
    shared = shared_prefix_length(encoded)
    assert shared >= MIN_SHARED_PREFIX
    seen: list[tuple[int, ...]] = []
    handle = tiny_lm.model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: seen.append(tuple(args[0].shape)))
    try:
        with_prefix = last_token_logits(tiny_lm, prompts, batch_size=3)
        prefix_inputs, seen[:] = list(seen), []
        alone = last_token_logits(tiny_lm, prompts, batch_size=3, share_prefix=False)
    finally:
        handle.remove()
    torch.testing.assert_close(with_prefix, alone, atol=1e-5, rtol=1e-4)
    # the prefix once, then each batch only its rows' own tokens
    own = sorted(len(e) - shared for e in encoded)
    assert prefix_inputs == [(1, shared), (3, own[2]), (1, own[3])]
    assert seen == [(3, own[2] + shared), (1, own[3] + shared)]


def test_the_shared_prefix_leaves_every_row_a_token_of_its_own() -> None:
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 5, 3]]) == 1
    assert shared_prefix_length([[7], [7]]) == 0


def test_a_nucleus_of_one_token_samples_what_greedy_decoding_writes(tiny_lm: LoadedModel) -> None:
    prompts = [chat_prompt(tiny_lm.tokenizer, q) for q in QUESTIONS]
    seeds = [0, 1, 2]
    greedy, _ = _generate(tiny_lm, prompts, seeds, 0.0, share=False)
    # a nucleus of mass 0.001 holds only the most likely token, whatever the temperature
    assert _generate(tiny_lm, prompts, seeds, 2.0, share=False, top_p=1e-3)[0] == greedy
    assert _generate(tiny_lm, prompts, seeds, 2.0, share=False)[0] != greedy  # without it, T 2 writes otherwise
