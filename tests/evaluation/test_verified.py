"""`prism eval --bench verified` on the tiny run: held-out queries of the run's domains, every system's answers
scored by the run's verifiers, pass rates and routing shares that follow from the records."""

import json
import shutil

import pytest

from helpers import BASE_QUERIES, PERSONA_QUERIES
from prism.errors import PrismError
from prism.evaluation.config import EvalConfig
from prism.evaluation.report import write_report
from prism.evaluation.runner import evaluate
from prism.evaluation.verified import QUERIES_DIR
from prism.inference.transformers import PrismModel
from prism.runs import RunDir
from prism.verifiers import load_verifier

DOMAINS = {"writing": "You are a poet.", "review": "You are a code reviewer."}
SPECS = {"writing": "max-words:6", "review": "min-words:3"}
SYSTEMS = ["base", "persona", "lora", "prism"]


@pytest.fixture()
def verifier_run(tiny_run, tmp_path):
    """The tiny run, bootstrapped (as its manifest now says) with the verifier judge over two domains."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"].update(domains=list(DOMAINS), judge="verifier", verifier=None, verifiers=SPECS)
    (run / "manifest.json").write_text(json.dumps(manifest))
    RunDir(run).append("personas", [{"id": d, "domain": d, "persona": p, "source": "user"} for d, p in DOMAINS.items()])
    RunDir(run).append("queries", [{"id": "writing/r0/0", "persona_id": "writing", "domain": "writing", "round": 0,
                                    "query": "How do I write a poem about the sea?", "status": "kept"}])
    return run


def check_results_follow_the_records(run, results):
    store = RunDir(run / "eval")
    answers = {r["key"]: r for r in store.read("verified_answers")}
    verifiers = {d: load_verifier(s) for d, s in SPECS.items()}
    for system in SYSTEMS:
        mine = [a for a in answers.values() if a["system"] == system]
        assert mine, system
        for domain in DOMAINS:
            rows = [a for a in mine if a["domain"] == domain]
            passed = [verifiers[domain](domain, "", a["text"]) for a in rows]  # the verifier, applied here
            entry = results[system]["verified"]["domains"][domain]
            assert entry["pass_rate"] == pytest.approx(sum(passed) / len(rows)) and entry["pass_rate_n"] == len(rows)
            assert entry["routing_rate"] == pytest.approx(sum(a["route"] == "persona" for a in rows) / len(rows))
    assert results["lora"]["verified"]["routing_rate"] == 1.0 and results["base"]["verified"]["routing_rate"] == 0.0


def test_held_out_queries_are_generated_scored_and_summarized(verifier_run):
    config = EvalConfig(benches=["verified"], systems=list(SYSTEMS), limit={"verified": 3})
    results = evaluate(verifier_run, config, device="cpu")
    check_results_follow_the_records(verifier_run, results)
    held = RunDir(verifier_run / "eval" / QUERIES_DIR).read("queries")
    answered = {a["id"] for a in RunDir(verifier_run / "eval").read("verified_answers")}
    assert answered <= {f"heldout:{q['id']}" for q in held if q["status"] == "kept"}
    bootstrap_query = "How do I write a poem about the sea?"
    assert all(q["query"] != bootstrap_query for q in held if f"heldout:{q['id']}" in answered)
    assert "lm-evaluation-harness" not in write_report(verifier_run)[0].read_text()  # no lm_eval.json yet
    harness = {"systems": {"base": {"prism_arc": {"acc,none": 0.25, "acc_stderr,none": 0.01}},
                           "prism": {"prism_arc": {"acc,none": 0.5, "acc_stderr,none": 0.02}}},
               "routing": {"prism_arc": 0.4}}
    (verifier_run / "eval" / "lm_eval.json").write_text(json.dumps(harness))
    written = write_report(verifier_run)
    report = written[0].read_text()
    assert "## Verified: held-out queries scored by the run's verifiers" in report and "| writing |" in report
    assert any(p.name == "verified.png" for p in written)
    assert "## lm-evaluation-harness" in report and "| prism_arc | acc | 0.2500 ± 0.0100 | 0.5000 ± 0.0200 |" in report
    (verifier_run / "eval" / "lm_eval.json").unlink()


def test_a_user_file_of_queries_and_another_verifier(verifier_run, tmp_path):
    queries = tmp_path / "held.jsonl"
    asked = [("Writing", q) for q in PERSONA_QUERIES] + [("review", q) for q in BASE_QUERIES]
    queries.write_text("\n".join(json.dumps({"domain": d, "query": q}) for d, q in asked))
    config = EvalConfig(benches=["verified"], systems=list(SYSTEMS), data={"verified": str(queries)},
                        verifier="max-words:1000")
    results = evaluate(verifier_run, config, device="cpu")
    assert all(results[s]["verified"]["pass_rate"] == 1.0 for s in SYSTEMS)  # every answer has fewer words
    assert results["base"]["verified"]["pass_rate_n"] == len(asked)
    # the prism rows are routed by the gate, as serving routes them: the fixture's gate sends these queries both ways
    prism = [a for a in RunDir(verifier_run / "eval").read("verified_answers") if a["system"] == "prism"]
    decisions = PrismModel.from_run(verifier_run, device="cpu").decide(
        [[{"role": "user", "content": a["query"]}] for a in prism])
    assert [a["route"] for a in prism] == [d.route for d in decisions]
    assert {a["route"] for a in prism} == {"base", "persona"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"domain": "cooking", "query": "Soup?"}\n')
    with pytest.raises(PrismError, match="bad.jsonl:1: the domain 'cooking' is not one of the run's"):
        evaluate(verifier_run, EvalConfig(benches=["verified"], systems=["base"], data={"verified": str(bad)}),
                 device="cpu")


def test_a_run_without_verifiers_needs_one_named(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    RunDir(run).append("personas", [{"id": "writing", "domain": "writing", "persona": "You write.", "source": "user"}])
    with pytest.raises(PrismError, match="not bootstrapped with --judge verifier.*--verifier SPEC"):
        evaluate(run, EvalConfig(benches=["verified"], systems=["base"], limit={"verified": 1}), device="cpu")
