"""Labels with their uncertainty (K answer pairs per query, win rates, shrinkage), the domain separability probe,
and example queries that guide the query stage without becoming queries."""

import json
import re

import pytest
import torch

from helpers import whole_and_resumed
from prism.config import resolve_config
from prism.engines.base import Generation
from prism.errors import PrismError
from prism.runs import RunDir
from prism.stages import gate, negatives, queries, verify
from prism.stages.context import StageContext
from prism.stages.pipeline import bootstrap
from prism.stages.records import read_labels, win_rate


def verifier_run(tmp_path, outcomes: list[str], **overrides):
    """A run directory whose one query has K = len(outcomes) answer pairs scored by max-words:3: each pair's
    persona answer wins, ties or loses as `outcomes` says."""
    config = resolve_config(domains=["facts"], judge="verifier", verifier="max-words:3",
                            label_samples=len(outcomes), **overrides)
    run = RunDir(tmp_path / "run")
    run.append("personas", [{"id": "facts", "domain": "facts", "persona": "Be terse."}])
    run.append("queries", [{"id": "facts/r0/0", "persona_id": "facts", "domain": "facts", "round": 0,
                            "query": "What is the capital of France?", "status": "kept"}])
    short, long = "Paris.", "The capital city of France is Paris."
    sides = {"win": (short, long), "loss": (long, short), "tie": (short, short)}
    for k, outcome in enumerate(outcomes):
        persona, plain = sides[outcome]
        for variant, text in (("persona", persona), ("plain", plain)):
            run.append("answers", [{"id": f"facts/r0/0:{variant}" + (f":{k}" if k else ""), "query_id": "facts/r0/0",
                                    "variant": variant, **({"sample": k} if k else {}), "answer": text}])
    return StageContext(run=run, config=config)


@pytest.mark.parametrize("outcomes, rate, label", [
    (["win", "win", "win", "loss"], 0.75, 1),
    (["win", "tie", "tie", "loss"], 0.5, 0),
    (["win"], 1.0, 1),
    (["tie"], 0.5, 0),  # one tie: retained, as before K existed
])
def test_a_querys_win_rate_counts_ties_half_and_the_bar_decides_distillation(tmp_path, outcomes, rate, label):
    ctx = verifier_run(tmp_path, outcomes)
    verify.run(ctx)
    [record] = read_labels(ctx.run)
    assert record.persona_win_rate == rate and record.label == label
    if len(outcomes) > 1:
        assert record.sample_outcomes == outcomes
        low, high = record.win_rate_interval
        assert low < rate < high
        assert record.persona_answer == "Paris." and record.plain_answer.startswith("The capital")  # a won pair
    assert win_rate(["win", "tie"]) == 0.75


def test_the_label_reliability_compares_two_disjoint_halves_of_the_samples(tmp_path):
    ctx = verifier_run(tmp_path, ["win", "loss", "win", "loss"])
    info = verify.run(ctx)
    # even samples all won, odd ones all lost: the halves disagree on the one query
    assert info["label_reliability"] == {"queries": 1, "split_half_agreement": 0.0, "split_half_correlation": None}


def test_shrinkage_is_the_formula_by_hand():
    rates = torch.tensor([1.0, 0.5, 0.0, 0.25])
    samples = torch.tensor([4.0, 4.0, 1.0, 4.0])
    domains = ["a", "a", "a", "b"]
    shrunk, means = gate.shrunk_win_rates(rates, samples, domains, strength=2.0)
    assert means == {"a": 0.5, "b": 0.25}
    expected = [(4 * 1.0 + 2 * 0.5) / 6, (4 * 0.5 + 2 * 0.5) / 6, (1 * 0.0 + 2 * 0.5) / 3, (4 * 0.25 + 2 * 0.25) / 6]
    assert shrunk.tolist() == pytest.approx(expected)
    # the domain means come from the training rows alone: a held-out row's own rate does not pull its prior
    held, means = gate.shrunk_win_rates(rates, samples, domains, strength=2.0, fit_rows=torch.tensor([0, 1, 3]))
    assert means == {"a": 0.75, "b": 0.25}
    assert held[2].item() == pytest.approx((0.0 + 2 * 0.75) / 3)


def test_k_samples_come_from_k_streams_and_a_killed_run_resumes_to_the_uninterrupted_records(tiny_config, tmp_path,
                                                                                               monkeypatch):
    config = tiny_config(domains=["math", "safety"], queries_per_persona=2, batch_size=3, answer_temperature=1.0,
                         label_samples=3)
    whole, resumed = whole_and_resumed(config, tmp_path, monkeypatch)
    for name in ("queries", "answers", "judgments", "labels"):
        key = "id" if name != "labels" else "query_id"
        assert sorted(resumed.read(name), key=lambda r: r[key]) == sorted(whole.read(name), key=lambda r: r[key])
    answers = whole.read("answers")
    kept = [q["id"] for q in whole.read("queries") if q["status"] == "kept"]
    assert len(answers) == len(kept) * 2 * 3
    for qid in kept:
        plain = [a["answer"] for a in answers if a["query_id"] == qid and a["variant"] == "plain"]
        assert len(set(plain)) == 3, f"the 3 plain answers to {qid} repeat: the samples share a random stream"
    labels = read_labels(whole)
    assert all(len(r.sample_outcomes) == 3 and r.win_rate is not None for r in labels)


def test_the_separability_probe_never_sees_its_test_fold():
    """Features with no domain signal at all: out of fold the probe is near chance; a probe scored on the rows it
    fitted (the leak) would read them perfectly, high-dimensional as they are."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 64, generator=generator)
    domains = ["a", "b", "c"] * 20
    result = gate.domain_separability(features, domains, seed=0)
    assert result["accuracy"] < 0.6 and result["chance"] == pytest.approx(1 / 3)
    assert result["near_chance"] and "no gate can route" in gate.separability_warning(result)
    # and a feature that carries the domain is read well
    signal = features.clone()
    signal[:, :8] += torch.tensor([{"a": 0.0, "b": 4.0, "c": 8.0}[d] for d in domains])[:, None]
    separated = gate.domain_separability(signal, domains, seed=0)
    assert separated["accuracy"] > 0.9 and not separated["near_chance"] and separated["confused"] == []


class ScriptedEngine:
    """Generates, for every query prompt, the first example it shows when it shows any (a model that copies),
    else a fresh question."""

    def __init__(self):
        self.prompts = []

    def describe(self):
        return {"kind": "scripted"}

    def generate(self, prompts, *, seeds, desc, **_):
        self.prompts += prompts
        outputs = []
        for prompt, seed in zip(prompts, seeds):
            shown = re.findall(r"^\d+\. (.+)$", prompt.assistant_prefix or "", re.M)
            text = shown[0] if shown and seed % 2 == 0 else f"How does topic number {seed} work in practice?"
            outputs.append(Generation(text=text, new_tokens=8, finished=True))
        yield list(range(len(prompts))), outputs


def test_example_queries_are_shown_to_the_model_and_never_become_queries(tmp_path):
    examples = {"geography": ["What is the capital of Peru?", "Which river flows through Cairo?",
                              "How tall is Mount Kilimanjaro?"]}
    geography = {"persona": "You are a geographer.", "examples": examples["geography"]}
    config = resolve_config(domains={"geography": geography, "cooking": None}, queries_per_persona=6)
    run = RunDir(tmp_path / "run")
    engine = ScriptedEngine()
    ctx = StageContext(run=run, config=config, engine=engine)
    from prism.stages import personas

    personas.run(ctx)
    assert [p["source"] for p in run.read("personas") if p["domain"] == "geography"] == ["config"]
    info = queries.run(ctx)
    records = run.read("queries")
    kept = [r["query"] for r in records if r["status"] == "kept"]
    assert not set(kept) & set(examples["geography"])
    assert any(r["status"] == "example_copy" for r in records)  # the copying model was caught
    geography = [r for r in records if r["domain"] == "geography"]
    assert all(set(r["examples_shown"]) <= set(examples["geography"]) for r in geography)
    assert all("examples_shown" not in r for r in records if r["domain"] == "cooking")
    assert all(r["source"] == "synthetic" for r in records) and info["examples"]["per_domain"] == {"geography": 3}
    # the examples open a numbered list the model continues (self-instruct's form)
    shown = [p for p in engine.prompts if "about geography" in p.user]
    assert shown and all(p.assistant_prefix.endswith("\n4.") for p in shown)


def test_gold_questions_the_persona_does_not_help_become_base_examples_for_the_gate(tiny_config, tmp_path):
    gold = tmp_path / "gold.jsonl"
    rows = [{"question": f"Which number is {n}?", "choices": ["one", "two", "three"], "answer": n % 3}
            for n in range(5)]
    rows.append({"question": "Which letter comes first?", "choices": ["A", "B"], "answer": "A"})
    gold.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(domains=["math", "safety"], queries_per_persona=2, negatives=str(gold), negatives_count=5)
    summary = bootstrap(config, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    records = run.read("negatives")
    assert [r["id"] for r in records] == [f"negative/{i}" for i in range(5)]  # the first negatives_count questions
    assert all(r["base_example"] == (not (r["persona_correct"] and not r["plain_correct"])) for r in records)
    info = run.manifest()["stages"]["gate"]["negatives"]
    assert info["questions"] == 5 and info["base_examples"] == sum(r["base_example"] for r in records)
    labels = read_labels(run)
    assert summary["gate"]["examples"] == len(labels) + info["base_examples"]
    gold.write_text('{"question": "Which?", "choices": ["x"], "answer": 0}\n')
    with pytest.raises(PrismError, match="line 1: needs \"question\", \"choices\" \\(2-10\\)"):
        negatives.read_gold_questions(str(gold))
