"""The OpenAI-compatible engine against a live `prism serve` of the tiny model on loopback (a real server),
including a server that goes away mid-stage and comes back."""

import json
import threading
import time
from types import SimpleNamespace

import pytest

from helpers import BASE_QUERIES, PERSONA_QUERIES, LiveServer
from prism.engines.base import Prompt
from prism.engines.openai import OpenAIEngine, options_from_text, options_from_top_logprobs
from prism.errors import PrismError
from prism.inference.base import GenerationRequest
from prism.inference.transformers import PrismModel
from prism.lm.decoding import SamplingParams
from prism.runs import STAGES, RunDir
from prism.serving.server import create_app
from prism.stages import answers
from prism.stages.context import StageContext
from prism.stages.judge_pairwise import OPTIONS
from prism.stages.judge_pointwise import RATING_TOKENS
from prism.stages.pipeline import bootstrap

# `prism-base` serves the tiny base model: the same weights the run's config names as its model.
SERVED = "prism-base"


@pytest.fixture(scope="module")
def served(tiny_run):
    model = PrismModel.from_run(tiny_run, device="cpu", max_model_len=512)
    live = LiveServer(create_app(model, max_batch_size=8)).start()
    yield SimpleNamespace(model=model, live=live, url=live.url + "/v1")
    if live.thread.is_alive():
        live.stop()


def test_generation_matches_the_served_model(served):
    engine = OpenAIEngine(served.url, SERVED, concurrency=3, max_retries=0)
    prompts = [Prompt(q) for q in PERSONA_QUERIES + BASE_QUERIES] + [Prompt(BASE_QUERIES[0], system="Be brief.")]
    results = {}
    for indices, generations in engine.generate(prompts, max_new_tokens=8, temperature=0.0, seeds=[0] * len(prompts),
                                                     batch_size=4):
        assert len(indices) == 1  # handed back one by one, as each finishes
        results[indices[0]] = generations[0]
    assert sorted(results) == list(range(len(prompts)))
    for index, prompt in enumerate(prompts):
        expected = served.model.generate_batch([GenerationRequest(prompt.messages(), "base",
                                                                  SamplingParams(max_tokens=8))])[0]
        assert results[index].text == expected.text
        assert results[index].new_tokens == expected.completion_tokens
    assert engine.describe() == {"kind": "openai", "base_url": served.url, "model": SERVED, "concurrency": 3}


def test_the_nucleus_reaches_the_server(served):
    engine = OpenAIEngine(served.url, SERVED, max_retries=0)
    prompts = [Prompt(q) for q in PERSONA_QUERIES + BASE_QUERIES]

    def texts(**sampling) -> list[str]:
        replies = {}
        for indices, generations in engine.generate(prompts, max_new_tokens=8, seeds=list(range(len(prompts))),
                                                    batch_size=4, **sampling):
            replies[indices[0]] = generations[0].text
        return [replies[i] for i in range(len(prompts))]

    greedy = texts(temperature=0.0)
    assert texts(temperature=2.0, top_p=1e-3) == greedy  # a nucleus of the most likely token alone
    assert texts(temperature=2.0) != greedy


def test_verdicts_come_from_the_servers_logprobs(served):
    engine = OpenAIEngine(served.url, SERVED, max_retries=0)
    prompts = [Prompt(f"{q} Reply with exactly one of: A, B, TIE.", assistant_prefix="Verdict:")
               for q in PERSONA_QUERIES + BASE_QUERIES]
    verdicts = engine.option_probs(prompts, OPTIONS, batch_size=4)
    for prompt, verdict in zip(prompts, verdicts):
        # what the server should have read: the in-process model's top-20 after the same prefix
        request = GenerationRequest(prompt.messages(), "base", assistant_prefix=prompt.assistant_prefix)
        logprobs, _ = served.model.next_token_logprobs([request])
        top = logprobs[0].topk(20)
        tokenizer = served.model.lm.tokenizer
        entries = [SimpleNamespace(token=tokenizer.decode([i]), logprob=v)
                   for i, v in zip(top.indices.tolist(), top.values.tolist())]
        expected = options_from_top_logprobs(entries, OPTIONS)
        if expected is None:  # no option among the top tokens: the reply text decides
            reply = served.model.generate_batch([GenerationRequest(prompt.messages(), "base", SamplingParams(
                max_tokens=3), assistant_prefix=prompt.assistant_prefix)])[0]
            expected = options_from_text(reply.text, OPTIONS)
        assert verdict.source == expected.source
        assert verdict.probs == pytest.approx(expected.probs, abs=1e-4)


def test_reading_verdicts_from_logprobs_and_text():
    top = [SimpleNamespace(token=" A", logprob=-1.0), SimpleNamespace(token="A", logprob=-2.0),
           SimpleNamespace(token="T", logprob=-1.5), SimpleNamespace(token="Yes", logprob=-0.1),
           SimpleNamespace(token=" ", logprob=-3.0)]
    verdict = options_from_top_logprobs(top, OPTIONS)
    a, tie = 2.718281828 ** -1 + 2.718281828 ** -2, 2.718281828 ** -1.5
    assert verdict.probs == pytest.approx({"A": a / (a + tie), "B": 0.0, "TIE": tie / (a + tie)})
    assert verdict.mass == pytest.approx(a + tie) and verdict.source == "logprobs"
    assert options_from_top_logprobs([SimpleNamespace(token="Yes", logprob=0.0)], OPTIONS) is None
    assert options_from_text(" [[B]] because", OPTIONS).probs == {"A": 0.0, "B": 1.0, "TIE": 0.0}
    assert options_from_text("Verdict: TIE.", OPTIONS).probs["TIE"] == 1.0
    assert options_from_text("Answer A is better", OPTIONS).source == "text-unparsed"  # "Answer" is no verdict
    # a token counts for the option it spells out: "1" for the rating 1, not 10 (a tokenizer with a "10" token)
    ratings = options_from_top_logprobs([SimpleNamespace(token="1", logprob=-1.0),
                                         SimpleNamespace(token="10", logprob=-2.0),
                                         SimpleNamespace(token="7", logprob=-0.5)], RATING_TOKENS)
    total = sum(2.718281828 ** v for v in (-1.0, -2.0, -0.5))
    assert ratings.probs["1"] == pytest.approx(2.718281828 ** -1.0 / total)
    assert ratings.probs["10"] == pytest.approx(2.718281828 ** -2.0 / total) and ratings.probs["0"] == 0.0


def test_bootstrap_with_the_remote_engine(served, tiny_config, tmp_path):
    config = tiny_config(engine="openai", base_url=served.url, engine_model=SERVED, domains=["math", "safety"],
                         queries_per_persona=3, engine_concurrency=4, engine_max_retries=0)
    summary = bootstrap(config, tmp_path / "run")
    # (whether the random judge lets a persona win, and so whether distill trains or skips, is up to chance)
    assert all(summary["stages"][s] == "done" for s in STAGES if s not in ("distill", "adapter_outcomes"))
    assert summary["stages"]["distill"] in ("done", "skipped")
    assert summary["counts"]["answers"] == 2 * summary["counts"]["queries"] > 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for stage in ("personas", "queries", "answers", "verify"):
        assert manifest["stages"][stage]["engine"]["kind"] == "openai"
    for stage in ("gate", "distill"):
        assert manifest["stages"][stage]["engine"]["kind"] == "transformers"
    judgments = RunDir(tmp_path / "run").read("judgments")
    assert {j["verdict_source"] for j in judgments} <= {"logprobs", "text", "text-unparsed"}
    # the engine is how a run is executed, not what it computes: the same run resumes with the local model
    assert bootstrap(tiny_config(domains=["math", "safety"], queries_per_persona=3), tmp_path / "run")["counts"] \
        == summary["counts"]


def _stop_when(path, lines: int, live: LiveServer, restart_after: float | None) -> tuple[threading.Thread, dict]:
    """Stop the server once `path` holds `lines` records; start it again after `restart_after` seconds.
    Returns the watcher and what it saw: the records saved when the server was down."""
    seen: dict[str, int] = {}

    def watch() -> None:
        while not path.is_file() or len(path.read_text().splitlines()) < lines:
            time.sleep(0.01)
        live.stop()
        seen["saved_when_down"] = len(path.read_text().splitlines())
        if restart_after is not None:
            time.sleep(restart_after)
            live.start()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


def test_a_server_that_goes_away_mid_stage_loses_nothing(served, tiny_config, tmp_path):
    run = RunDir(tmp_path)
    queries = [f"Question number {i} about {topic}?" for i in range(6) for topic in ("math", "poems")]
    run.append("personas", [{"id": "p", "domain": "math", "persona": "You are a mathematician."}])
    run.append("queries", [{"id": f"q{i}", "persona_id": "p", "domain": "math", "query": q, "status": "kept"}
                           for i, q in enumerate(queries)])
    config = tiny_config(answer_max_tokens=24, answer_temperature=0.0)
    expected_ids = {f"q{i}:{v}" for i in range(len(queries)) for v in answers.VARIANTS}

    # 1. the server restarts within the retry window: the stage does not even notice
    patient = OpenAIEngine(served.url, SERVED, concurrency=2, max_retries=8, timeout_s=30)
    watcher, seen = _stop_when(run.file("answers"), 3, served.live, restart_after=1.0)
    answers.run(StageContext(run=run, config=config, engine=patient))
    watcher.join()
    assert seen["saved_when_down"] < len(expected_ids)  # the server really was down mid-stage
    records = run.read("answers")
    assert {r["id"] for r in records} == expected_ids and len(records) == len(expected_ids)

    # 2. the server stays away: the stage stops with a message, what finished is saved, a re-run completes
    run.file("answers").unlink()
    hasty = OpenAIEngine(served.url, SERVED, concurrency=2, max_retries=1, timeout_s=30)
    watcher, seen = _stop_when(run.file("answers"), 5, served.live, restart_after=None)
    with pytest.raises(PrismError, match="unreachable.*re-run the same command to resume"):
        answers.run(StageContext(run=run, config=config, engine=hasty))
    watcher.join()
    saved = run.read("answers")
    assert 5 <= len(saved) < len(expected_ids) and seen["saved_when_down"] < len(expected_ids)
    served.live.start()
    answers.run(StageContext(run=run, config=config, engine=hasty))
    records = run.read("answers")
    assert {r["id"] for r in records} == expected_ids and len(records) == len(expected_ids)  # nothing twice
    assert records[: len(saved)] == saved  # what was saved before stayed as it was


def test_remote_engine_errors_are_clear(served, tiny_config):
    with pytest.raises(PrismError, match="--base-url"):
        tiny_config(engine="openai")
    engine = OpenAIEngine(served.url, "no-such-model", max_retries=0)
    with pytest.raises(PrismError, match="answered 404: the model 'no-such-model' does not exist"):
        list(engine.generate([Prompt("hi")], max_new_tokens=2, temperature=0.0, seeds=[0], batch_size=1))


def test_the_remote_eval_judge_rides_out_a_server_restart(served):
    """`prism eval --judge-base-url` goes through this engine, so it retries like the stages do: a judge
    server that is down for 3 s (longer than the openai client's default 2 retries wait) costs nothing."""
    from prism.evaluation.config import EvalConfig
    from prism.evaluation.judge import Judge

    judge = Judge(served.model, EvalConfig(judge_base_url=served.url, judge_model=SERVED))
    served.live.stop()
    restart = threading.Timer(3.0, served.live.start)
    restart.start()
    try:
        replies = judge.complete([("You judge.", f"Rate answer {i}. Reply [[rating]].") for i in range(3)],
                                 prefix="", max_tokens=4)
    finally:
        restart.join()
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
