"""Continuous batching on llama.cpp (prism.lm.llama_batch): a request's tokens do not depend on what is decoded
beside it (routes mixed), a cancelled request frees its slot, a prompt beyond a slot is refused without touching
the others, and a bootstrap on this engine resumes to the records of an uninterrupted one.

The base GGUF here is the tiny model in Q4_1, as the embedded model is: llama.cpp's quantized kernels give a
row the same result whatever the batch, where F32 matrices round differently by batch size (6th digit)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx2
import pytest
import torch

from gguf_helpers import write_tiny_gguf
from helpers import BASE_QUERIES, PERSONA_QUERIES, LiveServer, whole_and_resumed
from prism.errors import ContextLengthError
from prism.inference.base import GenerationRequest
from prism.inference.gguf_export import export_gguf
from prism.inference.llamacpp import LlamaCppModel
from prism.lm.decoding import SamplingParams
from prism.lm.llama_batch import Sequence

pytest.importorskip("llama_cpp")
QUERIES = PERSONA_QUERIES + BASE_QUERIES + ["Name three colors.", "Why is the sky blue? Tell me in detail."]


@pytest.fixture(scope="module")
def q4_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf", quantized=True)


@pytest.fixture(scope="module")
def q4_run(tiny_run: Path, q4_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("q4-run") / "run"
    shutil.copytree(tiny_run, run)
    export_gguf(run, base_gguf=q4_gguf, merged=True)  # the merged persona model in Q8_0: quantized kernels too
    return run


def load(run: Path, gguf: Path, **options) -> LlamaCppModel:
    return LlamaCppModel.from_run(run, gguf=gguf, persona_model="merged", max_model_len=256, **options)


def requests() -> list[GenerationRequest]:
    """Greedy and seeded sampled requests on every route (gate-routed, forced base, forced persona)."""
    made = []
    for i, query in enumerate(QUERIES):
        route = ("auto", "base", "persona")[i % 3]
        sampling = {"temperature": 0.9, "top_p": 0.9, "seed": i} if i % 2 else {}
        made.append(GenerationRequest([{"role": "user", "content": query}], route,
                                      SamplingParams(max_tokens=12 + 3 * i, ignore_eos=True, logprobs=0, **sampling)))
    return made


def reply(completion) -> tuple:
    return completion.route, completion.text, [entry["logprob"] for entry in completion.logprobs]


@pytest.mark.parametrize("weights", ["auto", "as-is"])  # re-encoded to Q8_0 (prompts prefill together), Q4_1
def test_a_batch_of_requests_gets_what_each_gets_alone(q4_run, q4_gguf, weights):
    together = load(q4_run, q4_gguf, max_num_seqs=8, gguf_weights=weights)
    assert together.weights_type == {"auto": "q8_0", "as-is": "as-is"}[weights]
    batched = [reply(c) for c in together.generate_batch(requests())]
    together.close()
    alone = []
    for request in requests():
        model = load(q4_run, q4_gguf, max_num_seqs=8, gguf_weights=weights)  # a fresh model each: nothing cached
        alone.append(reply(model.generate_batch([request])[0]))
        model.close()
    assert {route for route, *_ in batched} == {"base", "persona"}
    assert batched == alone  # the same tokens and the same log-probabilities, to the last bit


def test_each_decode_step_is_one_run_of_sequences_and_leaves_each_slot_its_own_tokens(q4_run, q4_gguf, monkeypatch):
    """llama.cpp computes a batch in one graph only over consecutive sequence ids: once requests of different
    lengths finish, with nobody waiting, the highest decoding sequences move down into the freed slots, so no
    step decodes a placeholder in a gap, and every slot's cells hold exactly the tokens it keeps."""
    import llama_cpp

    decoded = llama_cpp.llama_decode
    steps: list[list[int]] = []
    placeholders = []

    def recording(ctx, batch):
        if all(batch.pos[i] >= 0 for i in range(batch.n_tokens)):
            seq_ids = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
            if len(set(seq_ids)) == len(seq_ids):  # one token per sequence: a decode step
                steps.append(seq_ids)
                placeholders.extend(seq_ids[i] for i in range(batch.n_tokens) if not batch.logits[i])
        return decoded(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    model = load(q4_run, q4_gguf, max_num_seqs=8)
    try:
        assert model.llama.route("base").shared_prefill  # the tiny Q4_1 re-encoded to Q8_0 for 8 sequences
        made = [GenerationRequest([{"role": "user", "content": q}], "base", SamplingParams(max_tokens=3 + 5 * (i % 3),
                                  ignore_eos=True)) for i, q in enumerate(QUERIES[:6])]
        assert [c.completion_tokens for c in model.generate_batch(made)] == [r.params.max_tokens for r in made]
        assert any(len(step) < 6 and len(step) > 1 for step in steps)  # some finished before the others
        assert all(step == list(range(len(step))) for step in steps), steps
        assert placeholders == []
        context = model.llama.route("base")
        for slot in context.slots:  # each slot's cells hold exactly the tokens it keeps for the next prompt
            assert llama_cpp.llama_memory_seq_pos_max(context.context.memory, slot.seq_id) == len(slot.cached) - 1
    finally:
        model.close()


def within(seconds: float, work):
    """work()'s result, or a failure when it has not returned in time (a request stuck in its slot waits forever)."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(work()), daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    assert result, f"still waiting after {seconds} s: a slot was never freed"
    return result[0]


def test_a_cancelled_request_frees_its_slot(q4_run, q4_gguf):
    model = load(q4_run, q4_gguf, max_num_seqs=1)  # one slot per route: a request left in it blocks the next
    try:
        cancel = threading.Event()
        long = GenerationRequest([{"role": "user", "content": BASE_QUERIES[0]}], "base",
                                 SamplingParams(max_tokens=200, ignore_eos=True), cancel=cancel)
        stream = model.stream([long])
        assert next(stream).decision is not None and next(stream).delta is not None
        cancel.set()
        done = within(60, lambda: next(e.completion for e in stream if e.completion is not None))
        assert done.finish_reason == "cancelled" and done.completion_tokens < 200
        abandoned = model.stream([GenerationRequest([{"role": "user", "content": BASE_QUERIES[1]}], "base",
                                                    SamplingParams(max_tokens=200, ignore_eos=True))])
        assert next(abandoned).decision is not None
        assert within(60, lambda: next(abandoned)).delta is not None
        abandoned.close()  # the caller stops listening: its sequence is cancelled at the next step
        finished = within(60, lambda: model.generate(QUERIES[4], route="base", max_tokens=4))
        assert finished.completion_tokens == 4
        assert model.llama.route("base").active() == 0
    finally:
        model.close()


def test_a_prompt_beyond_a_slot_is_refused_and_the_others_decode_unchanged(q4_run, q4_gguf):
    from prism.serving.server import create_app

    model = load(q4_run, q4_gguf, max_num_seqs=4)
    expected = model.generate(PERSONA_QUERIES[0], route="persona", max_tokens=60).text
    live = LiveServer(create_app(model, default_max_tokens=60)).start()
    try:
        with httpx2.Client(base_url=live.url, timeout=120) as http:
            texts = []

            def streamed() -> None:
                body = {"model": "prism-persona", "stream": True, "max_tokens": 60, "temperature": 0,
                        "messages": [{"role": "user", "content": PERSONA_QUERIES[0]}]}
                with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    events = [json.loads(line[6:]) for line in response.iter_lines()
                              if line.startswith("data: {")]
                texts.append("".join(c["choices"][0]["delta"].get("content", "") for c in events if c["choices"]))

            worker = threading.Thread(target=streamed)
            worker.start()
            time.sleep(0.2)
            too_long = http.post("/v1/chat/completions", json={
                "model": "prism-persona", "max_tokens": 8, "messages": [{"role": "user", "content": "word " * 400}]})
            worker.join(timeout=120)
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        assert texts == [expected]
        with pytest.raises(ContextLengthError, match="256-token sequences"):
            model.llama.submit("persona", Sequence(list(range(250)), lambda _logits: None, max_new_tokens=10))
    finally:
        live.stop()
        model.close()


def test_requests_submitted_together_share_one_gate_forward_and_a_refused_one_holds_back_none(q4_run, q4_gguf,
                                                                                              monkeypatch):
    """`prism serve` submits the requests waiting at once together: their routes come from one gate forward, and
    one refused (beyond the context) gets its error while the others decode; once they are done the engine says
    nothing runs (the server's running gauge falls back to 0)."""
    import queue

    model = load(q4_run, q4_gguf, max_num_seqs=4)
    forwards = []
    decide = model.router.decide_each

    def counted(conversations, routings):
        forwards.append(len(conversations))
        return decide(conversations, routings)

    monkeypatch.setattr(model.router, "decide_each", counted)
    made = [GenerationRequest([{"role": "user", "content": q}], "auto", SamplingParams(max_tokens=4, ignore_eos=True))
            for q in QUERIES[:3]]
    too_long = GenerationRequest([{"role": "user", "content": "word " * 400}], "auto", SamplingParams(max_tokens=4))
    submitted = [made[0], too_long, *made[1:]]
    received = [queue.Queue() for _ in submitted]
    steps: list[int] = []
    model.observe_steps(steps.append)
    try:
        model.submit(submitted, [r.put for r in received])
        ends = []
        for events in received:
            while True:
                event = events.get(timeout=120)
                if isinstance(event, BaseException) or event.completion is not None:
                    ends.append(event)
                    break
        deadline = time.monotonic() + 30
        while steps[-1] != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        model.close()
    assert steps[-1] == 0
    assert forwards == [3]
    assert isinstance(ends[1], ContextLengthError)
    assert [ends[i].completion.completion_tokens for i in (0, 2, 3)] == [4, 4, 4]


def test_a_bootstrap_on_llama_cpp_killed_midway_resumes_to_the_records_of_an_uninterrupted_one(
        tiny_config, q4_gguf, tmp_path, monkeypatch):
    config = tiny_config(domains=["math", "safety"], queries_per_persona=4, batch_size=3, answer_temperature=1.0,
                         engine="llamacpp", gguf=str(q4_gguf), distill_epochs=1)
    whole, resumed = whole_and_resumed(config, tmp_path, monkeypatch)
    for name in ("personas", "queries", "answers", "judgments", "labels"):
        assert sorted(resumed.read(name), key=lambda r: json.dumps(r, sort_keys=True)) == \
            sorted(whole.read(name), key=lambda r: json.dumps(r, sort_keys=True)), name


def last_logits(llama, prompts: list[list[int]], new_tokens: int = 0) -> list[torch.Tensor]:
    """Each prompt's next-token logits, then those after each of `new_tokens` greedy tokens, all decoded at once."""
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}

    def keep(index: int):
        def on_logits(logits: torch.Tensor) -> int | None:
            rows[index].append(logits[-1].clone())
            return int(logits[-1].argmax()) if len(rows[index]) <= new_tokens else None
        return on_logits

    llama.run("base", [Sequence(ids, keep(i), max_new_tokens=new_tokens) for i, ids in enumerate(prompts)])
    return [torch.stack(rows[i]) for i in range(len(prompts))]


@pytest.mark.e2e
@pytest.mark.parametrize("weights", ["as-is", "q8_0"])
def test_prompts_of_unequal_lengths_prefilled_together_get_the_logits_they_get_alone(weights):
    """On the embedded model: llama.cpp splits three prompts of 32-34 tokens sharing one decode into ubatches of
    equal ones, and on its Q4_1 weights the third came out 0.46 off in a logit, so there each prompt prefills in a
    decode of its own; re-encoded to Q8_0 (what several sequences decode with), they prefill in one decode."""
    from prism.lm.llama_batch import BatchedLlama, RouteSpec
    from prism.lm.llama_weights import decode_weights
    from prism.lm.models import embedded_gguf_path

    path, made = decode_weights(embedded_gguf_path(), weights, sequences=3)
    assert made == weights

    system = "<|im_start|>system\nYou are a careful expert who answers briefly.<|im_end|>\n"
    texts = [f"{system}<|im_start|>user\nTell me about topic number {i} and {'more ' * i}.<|im_end|>\n"
             "<|im_start|>assistant\n" for i in range(3)]
    llama = BatchedLlama({"base": RouteSpec(path)}, slots=3, slot_tokens=256, threads=2, kv_type="f16")
    try:
        assert llama.route("base").shared_prefill == (weights == "q8_0")
        prompts = [llama.weights.tokenize(t.encode(), False, True) for t in texts]
        assert [len(p) for p in prompts] == [32, 33, 34]
        together = last_logits(llama, prompts)
    finally:
        llama.close()
    for prompt, batched in zip(prompts, together):
        alone = BatchedLlama({"base": RouteSpec(path)}, slots=3, slot_tokens=256, threads=2, kv_type="f16")
        try:
            assert torch.equal(last_logits(alone, [prompt])[0], batched)
        finally:
            alone.close()


def test_sequences_scored_together_on_mixed_routes_get_their_scores_alone(q4_run, q4_gguf):
    """What `prism lm-eval --engine llamacpp` scores with: each token's log-probability, every route at once."""
    from prism.inference.base import RouteDecision
    from prism.lm.models import encode

    model = load(q4_run, q4_gguf, max_num_seqs=4)
    try:
        ids = [encode(model.tokenizer, q) for q in QUERIES]
        decisions = [RouteDecision(("base", "persona")[i % 2], None, forced=True) for i in range(len(ids))]
        together = model.score_tokens(ids, decisions)
        alone = [model.score_tokens([i], [d])[0] for i, d in zip(ids, decisions)]
        assert [s.logprobs for s in together] == [s.logprobs for s in alone]
        assert all(len(s.logprobs) == len(i) - 1 for s, i in zip(together, ids))
        other_route = model.score_tokens([ids[0]], [RouteDecision("persona", None, forced=True)])[0]
        assert other_route.logprobs != together[0].logprobs  # the routes differ, so equality above is no accident
        logits = model.llama.logits("base", ids[0], logits_from=0)[:-1]
        expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[0][1:])[:, None])[:, 0]
        assert together[0].logprobs == pytest.approx(expected.tolist(), abs=1e-6)
    finally:
        model.close()


# Q8_0 (prompts prefill together) and Q4_1 (one by one), under flash attention (f16) and without it (f32)
@pytest.mark.parametrize(("weights", "kv_type"), [("auto", "f16"), ("as-is", "f16"), ("auto", "f32")])
def test_a_prompt_gets_the_same_logits_prefilled_whole_after_a_cached_prefix_or_beside_others(q4_gguf, weights,
                                                                                               kv_type):
    """Flash attention rounds otherwise for 64 query rows of a sequence or more: prompts prefill in chunks of 63."""
    from prism.lm.llama_batch import BatchedLlama, RouteSpec
    from prism.lm.llama_weights import decode_weights

    path, _ = decode_weights(q4_gguf, weights, sequences=3)
    prefix = [(7 * i) % 200 + 10 for i in range(100)]
    prompt, other = prefix + list(range(20, 50)), prefix + list(range(60, 80))

    def engine() -> BatchedLlama:
        return BatchedLlama({"base": RouteSpec(path)}, slots=3, slot_tokens=256, threads=2, kv_type=kv_type)

    with_engine = engine()
    try:
        whole = last_logits(with_engine, [prompt])[0]
        last_logits(with_engine, [other])  # leaves the 100-token prefix cached
        assert with_engine.route("base").slots[0].cached[:100] == prefix
        after_prefix = last_logits(with_engine, [prompt])[0]
    finally:
        with_engine.close()
    beside_engine = engine()
    try:
        beside = last_logits(beside_engine, [list(range(30, 95)), prompt, list(range(100, 190))])[1]
    finally:
        beside_engine.close()
    assert torch.equal(after_prefix, whole) and torch.equal(beside, whole)


def test_a_long_sequence_decoding_alone_gets_what_it_gets_beside_another(q4_gguf):
    """One query row of one sequence over 512 KV cells or more takes flash attention's split kernel: a sequence
    decoding alone gets a neighbour decoding a placeholder."""
    from prism.lm.llama_batch import BatchedLlama, RouteSpec

    prompt = [(11 * i) % 300 + 5 for i in range(300)]  # 300 cells: llama.cpp attends over 512 of them
    llama = BatchedLlama({"base": RouteSpec(q4_gguf)}, slots=2, slot_tokens=512, threads=2, kv_type="f16")
    try:
        alone = last_logits(llama, [prompt], new_tokens=6)[0]
        beside = last_logits(llama, [prompt[:-1] + [1], prompt], new_tokens=6)[1]
    finally:
        llama.close()
    assert torch.equal(beside, alone)
