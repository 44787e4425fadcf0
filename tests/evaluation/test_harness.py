"""`prism lm-eval`: the run as lm-evaluation-harness's `prism` model, on the tiny run with local tasks."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import BASE_QUERIES, PERSONA_QUERIES, write_mini_benchmarks
from prism.cli import main
from prism.errors import PrismError
from prism.evaluation.harness import lm_eval
from prism.evaluation.harness_model import PrismLM
from prism.inference.base import RouteDecision
from prism.inference.transformers import PrismModel
from prism.lm.models import encode

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

QUESTIONS = [*PERSONA_QUERIES, *BASE_QUERIES]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture()
def local_task(tmp_path):
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": ["yes", "no", "maybe"], "answer": i % 3}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=data))
    return tasks


def instance(context: str, continuation: str, task: str = "tiny_mc") -> Instance:
    return Instance("loglikelihood", {}, (context, continuation), 0, (task, 0, 1))


def routes_follow_the_gate(model: PrismModel, harness_model: PrismLM) -> bool:
    decided = harness_model._decided
    gate = model.decide([[{"role": "user", "content": context}] for _task, context in decided])
    return [d.route for d in decided.values()] == [d.route for d in gate]


def test_the_prism_system_routes_each_request_as_the_gate_decides(tiny_run, local_task):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model = PrismModel.from_run(tiny_run, device="cpu")
    runs = {}
    for system in ("prism", "lora"):
        runs[system] = PrismLM(system=system, model=model, batch_size=5)
        simple_evaluate(model=runs[system], tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(local_task)),
                        log_samples=False, bootstrap_iters=0)
    prism = runs["prism"]
    assert {context for _task, context in prism._decided} == set(QUESTIONS)
    assert {d.route for d in prism._decided.values()} == {"base", "persona"}  # a mixed task, so the check can fail
    assert routes_follow_the_gate(model, prism)
    assert prism.routing_shares() == {"tiny_mc": len(PERSONA_QUERIES) / len(QUESTIONS)}
    # negative control: every request on the adapter is not what the gate decides
    assert not routes_follow_the_gate(model, runs["lora"])


def test_system_base_scores_what_the_base_model_itself_gives(tiny_run, tiny_lm):
    model = PrismModel.from_run(tiny_run, device="cpu")
    pairs = [(q, " yes") for q in QUESTIONS] + [(QUESTIONS[0], " a longer answer")]
    scored = PrismLM(system="base", model=model, batch_size=4).loglikelihood([instance(c, a) for c, a in pairs])
    for (context, continuation), (logprob, _greedy) in zip(pairs, scored):
        prompt = model.prompt([{"role": "user", "content": context}])
        ids = encode(tiny_lm.tokenizer, prompt + continuation)
        count = len(ids) - len(encode(tiny_lm.tokenizer, prompt))
        with torch.no_grad():
            logits = tiny_lm.model(input_ids=torch.tensor([ids])).logits[0].float()
        own = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[-count:].sum()
        assert logprob == pytest.approx(float(own), abs=1e-4)


def test_a_mixed_batch_scores_what_each_request_scores_alone(tiny_run):
    model = PrismModel.from_run(tiny_run, device="cpu")
    requests = [instance(q, answer) for q in QUESTIONS for answer in (" yes", " no thanks")]
    together = PrismLM(system="prism", model=model, batch_size=len(requests))
    batched = together.loglikelihood(requests)
    assert {d.route for d in together._decided.values()} == {"base", "persona"}
    alone = [PrismLM(system="prism", model=model, batch_size=1).loglikelihood([r])[0] for r in requests]
    assert [g for _, g in batched] == [g for _, g in alone]
    assert torch.allclose(torch.tensor([v for v, _ in batched]), torch.tensor([v for v, _ in alone]), atol=1e-4)
    persona = RouteDecision("persona", None, forced=True)
    base = RouteDecision("base", None, forced=True)
    ids = [encode(model.tokenizer, q) for q in QUESTIONS]
    on_adapter, on_base = model.score_tokens(ids, [persona] * 4), model.score_tokens(ids, [base] * 4)
    assert on_adapter[0].logprobs != on_base[0].logprobs  # the routes really differ, so equality above means something


def test_rolling_loglikelihood_is_the_texts_own_log_probability_on_base(tiny_run, tiny_lm):
    model = PrismModel.from_run(tiny_run, device="cpu")
    text = "The quick brown fox jumps over the lazy dog."
    [rolling] = PrismLM(system="base", model=model).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0, ("tiny_ppl", 0, 1))])
    tokenizer = tiny_lm.tokenizer
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [prefix, *encode(tokenizer, text)]
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    own = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).sum()
    assert rolling == pytest.approx(float(own), abs=1e-4)


def test_prism_lm_eval_writes_the_harness_metrics_per_system_and_the_routing(tiny_run, local_task, tmp_path, capsys):
    out = tmp_path / "out"
    main(["lm-eval", str(tiny_run), "--tasks", "tiny_mc", "--include-path", str(local_task), "--systems",
          "base,lora,prism", "--out", str(out)])
    table = json.loads((out / "lm_eval.json").read_text())
    assert set(table["systems"]) == {"base", "lora", "prism"}
    for system in table["systems"].values():
        assert 0.0 <= system["tiny_mc"]["acc,none"] <= 1.0 and "acc_stderr,none" in system["tiny_mc"]
    assert table["routing"] == {"tiny_mc": 0.5}
    printed = capsys.readouterr().out
    assert "| tiny_mc | acc |" in printed and "prism routes to an adapter: tiny_mc 50.0%" in printed


def test_the_harness_own_command_line_finds_the_prism_model(tiny_run, local_task):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "prism.evaluation.harness_main", "run", "--model", "prism",
                           "--model_args", f"run={tiny_run},system=base", "--tasks", "tiny_mc", "--include_path",
                           str(local_task), "--limit", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_mc" in done.stdout and "acc" in done.stdout


def test_the_shipped_tasks_read_prism_evals_files_offline(tiny_run, tmp_path):
    data = tmp_path / "bench"
    write_mini_benchmarks(data)
    for missing in ("mmlu/dev.jsonl", "arc/challenge_test.jsonl"):  # the mini set leaves them out
        source = "mmlu/test_subset.jsonl" if missing.startswith("mmlu") else "arc/easy_test.jsonl"
        (data / missing).write_text((data / source).read_text())
    table = lm_eval(tiny_run, tasks=["prism_mmlu", "prism_arc"], systems=["base"], data_dir=str(data),
                    out=str(tmp_path / "out"), num_fewshot=0)
    assert {"prism_mmlu", "prism_arc", "prism_arc_easy", "prism_arc_challenge"} <= set(table["systems"]["base"])
    assert "acc_norm,none" in table["systems"]["base"]["prism_arc_easy"]


def test_bad_tasks_are_clear_errors(tiny_run, tmp_path):
    with pytest.raises(PrismError, match="unknown lm-eval task 'no_such_task'"):
        lm_eval(tiny_run, tasks=["no_such_task"], systems=["base"], out=str(tmp_path))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "remote.yaml").write_text("task: remote_only\ndataset_path: someone/not-on-this-machine\n"
                                       "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
                                       "doc_to_choice: ['a', 'b']\ndoc_to_target: 0\n")
    with pytest.raises(PrismError, match="'remote_only' cannot load its data offline.*dataset_path: json"):
        lm_eval(tiny_run, tasks=["remote_only"], systems=["base"], include_path=str(tasks), out=str(tmp_path))
    with pytest.raises(PrismError, match="--systems: unknown nosystem"):
        lm_eval(tiny_run, tasks=["prism_arc"], systems=["nosystem"])


def test_generate_until_answers_the_context_on_its_route_and_stops_at_until(tiny_run):
    model = PrismModel.from_run(tiny_run, device="cpu")
    options = {"until": ["e"], "max_gen_toks": 6}
    requests = [Instance("generate_until", {}, (q, options), 0, ("tiny_gen", 0, 1)) for q in QUESTIONS]
    texts = PrismLM(system="prism", model=model, batch_size=1).generate_until(requests)
    decisions = model.decide([[{"role": "user", "content": q}] for q in QUESTIONS])
    assert {d.route for d in decisions} == {"base", "persona"}
    for question, text, decision in zip(QUESTIONS, texts, decisions):
        assert text == model.generate(question, route=decision.route, max_tokens=6, stop=["e"]).text
        assert "e" not in text


def test_system_persona_scores_with_the_persona_of_the_requests_domain(tiny_run, tmp_path):
    import shutil

    from prism.runs import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    RunDir(run / "eval").append("personas", [{"id": "stem", "domain": "science, technology, engineering and "
                                              "mathematics", "persona": "You are a careful scientist."}])
    model = PrismModel.from_run(run, device="cpu")
    persona = PrismLM(system="persona", model=model)
    arc = Instance("loglikelihood", {}, ("What do plants need?", " light"), 0, ("prism_arc_easy", 0, 1))
    expected = [{"role": "system", "content": "You are a careful scientist."},
                {"role": "user", "content": "What do plants need?"}]
    assert persona._messages(arc) == expected
    ids = encode(model.tokenizer, model.prompt(expected) + " light")
    count = len(ids) - len(encode(model.tokenizer, model.prompt(expected)))
    [own] = model.score_tokens([ids], [RouteDecision("base", None, forced=True)])
    assert persona.loglikelihood([arc])[0][0] == pytest.approx(sum(own.logprobs[-count:]), abs=1e-6)
    virology = Instance("loglikelihood", {"subject": "virology"}, ("Which virus?", " A"), 0, ("prism_mmlu", 0, 1))
    with pytest.raises(PrismError, match="no persona for the domain 'business, medicine and general knowledge'"):
        persona.loglikelihood([virology])
