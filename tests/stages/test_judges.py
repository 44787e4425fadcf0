"""The three judges of the verify stage: a verifier labels exactly the queries whose persona answer it scores
higher, the pointwise score is the expected rating, pointwise judging has no slot, and a run made before
judges other than pairwise existed loads, serves and resumes unchanged."""

import json
import shutil

import pytest

from helpers import BASE_QUERIES, PERSONA_QUERIES
from prism.config import BootstrapConfig, with_new_defaults
from prism.engines.base import OptionProbs
from prism.engines.local import LocalEngine
from prism.errors import PrismError
from prism.inference.base import GenerationRequest
from prism.inference.transformers import PrismModel
from prism.lm.decoding import SamplingParams
from prism.runs import RunDir
from prism.stages import judge_pointwise, verify
from prism.stages.context import StageContext
from prism.stages.inspect import format_summary, inspect_run
from prism.stages.personas import slug
from prism.stages.pipeline import bootstrap

# (domain, persona answer, plain answer): persona short and plain long, the reverse, both short, both long
PAIRS = [("alpha", "Paris.", "The capital of France is Paris, a large city on the Seine."),
         ("alpha", "It is a long story with many words in it.", "Short."),
         ("alpha", "Yes.", "No."),
         ("beta", "One two three four five six seven.", "Eight nine ten eleven twelve thirteen fourteen."),
         ("beta", "Brief.", "A much longer plain answer that goes on and on."),
         ("beta", "A wordy persona answer, far above the limit of five.", "Tiny.")]


def prepared_run(path, tiny_config, pairs=PAIRS, **overrides) -> StageContext:
    """A run directory whose personas, queries and answers are written by hand, ready for the verify stage."""
    domains = list(dict.fromkeys(d for d, _, _ in pairs))
    config = tiny_config(domains=domains, **overrides)
    run = RunDir(path)
    run.save_manifest({"config": config.to_dict(), "stages": {}})
    run.append("personas", [{"id": slug(d), "domain": d, "persona": f"You answer {d} questions.", "source": "user"}
                            for d in domains])
    run.append("queries", [{"id": f"q{i}", "persona_id": slug(d), "domain": d, "round": 0, "query": f"Question {i}?",
                            "status": "kept"} for i, (d, _, _) in enumerate(pairs)])
    run.append("answers", [{"id": f"q{i}:{variant}", "query_id": f"q{i}", "variant": variant, "answer": answer}
                           for i, (_, persona, plain) in enumerate(pairs)
                           for variant, answer in (("persona", persona), ("plain", plain))])
    return StageContext(run=run, config=config)


def labelled(ctx: StageContext) -> dict[str, int]:
    verify.run(ctx)
    return {r["query_id"]: r["label"] for r in ctx.run.read("labels")}


def verifier_file(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return f"{path}:check"


SHORT = "def check(domain, query, answer):\n    return len(answer.split()) <= 5\n"
NOT_SHORT = "def check(domain, query, answer):\n    return not len(answer.split()) <= 5\n"


def test_a_verifier_labels_exactly_the_queries_whose_persona_answer_it_scores_higher(tiny_config, tmp_path):
    words = [(len(p.split()) <= 5, len(q.split()) <= 5) for _, p, q in PAIRS]
    preferred = {f"q{i}" for i, (persona, plain) in enumerate(words) if persona and not plain}
    assert preferred == {"q0", "q4"}
    for spec in ("max-words:5", verifier_file(tmp_path, "short", SHORT)):
        ctx = prepared_run(tmp_path / spec.split(":")[0].replace("/", "_"), tiny_config, judge="verifier",
                           verifier=spec)
        labels = labelled(ctx)
        assert {q for q, label in labels.items() if label} == preferred
        outcomes = {r["query_id"]: r["outcome"] for r in ctx.run.read("labels")}
        assert outcomes == {"q0": "win", "q1": "loss", "q2": "tie", "q3": "tie", "q4": "win", "q5": "loss"}
    # negative control: the same verifier inverted labels the queries it preferred the plain answer on
    inverted = labelled(prepared_run(tmp_path / "inverted", tiny_config, judge="verifier",
                                     verifier=verifier_file(tmp_path, "not_short", NOT_SHORT)))
    assert {q for q, label in inverted.items() if label} == {"q1", "q5"}


def test_per_domain_verifiers_and_what_inspect_reports(tiny_config, tmp_path):
    ctx = prepared_run(tmp_path / "run", tiny_config, judge="verifier", verifier="max-words:5",
                       verifiers={"Beta": "min-words:7"})
    labels = labelled(ctx)
    # beta: more words wins; q3 has 7 vs 7 words (tie), q4 1 vs 10 (plain wins), q5 10 vs 1 (persona wins)
    assert labels == {"q0": 1, "q1": 0, "q2": 0, "q3": 0, "q4": 0, "q5": 1}
    ctx.run.update_stage("verify", status="done")
    summary = inspect_run(ctx.run.path)
    judge = summary["verify"]
    assert judge["kind"] == "verifier" and judge["pairs"] == 6
    assert judge["domains"]["alpha"] == {"n": 3, "verifier": "max-words:5", "persona_pass_rate": pytest.approx(2 / 3),
                                         "plain_pass_rate": pytest.approx(2 / 3), "persona_wins": 1, "plain_wins": 1}
    assert judge["domains"]["beta"]["verifier"] == "min-words:7"
    assert judge["domains"]["beta"]["persona_pass_rate"] == pytest.approx(2 / 3)
    text = format_summary(summary)
    assert "alpha (max-words:5): persona 67%, plain 67% of 3" in text and "beta (min-words:7)" in text


def test_a_verifier_that_raises_names_the_domain_and_query_and_keeps_what_was_judged(tiny_config, tmp_path):
    spec = verifier_file(tmp_path, "fragile", "def check(domain, query, answer):\n"
                                              "    if answer == 'Brief.':\n        raise ValueError('cannot parse')\n"
                                              "    return len(answer) < 20\n")
    ctx = prepared_run(tmp_path / "run", tiny_config, judge="verifier", verifier=spec)
    with pytest.raises(PrismError) as failure:
        verify.run(ctx)
    message = str(failure.value)
    assert "'beta'" in message and "'Question 4?'" in message and "ValueError: cannot parse" in message
    assert "re-run" in message
    kept = ctx.run.read("judgments")
    assert [j["id"] for j in kept] == [f"q{i}:{v}" for i in range(4) for v in ("persona", "plain")]
    (tmp_path / "fragile.py").write_text("def check(domain, query, answer):\n    return len(answer) < 20\n")
    verify.run(ctx)
    ids = [j["id"] for j in ctx.run.read("judgments")]
    assert len(ids) == len(set(ids)) == 2 * len(PAIRS) and ids[:8] == [j["id"] for j in kept]


class FixedRatings:
    """An engine whose rating distribution is fixed by hand: the persona answer's prompt gets FIRST, the plain
    answer's PLAIN, and the prompts continued by "1" get a "0" with the probability AFTER_ONE gives."""

    FIRST = OptionProbs({"1": 0.2, "7": 0.5, "9": 0.2, "10": 0.1}, 0.8, "logits")
    PLAIN = OptionProbs({"5": 1.0}, 0.5, "logits")
    AFTER_ONE = {"persona": OptionProbs({"0": 1.0}, 0.25, "logits"), "plain": OptionProbs({"0": 1.0}, 0.0, "logits")}

    def option_probs(self, prompts, options, **_kwargs):
        assert tuple(options) == judge_pointwise.RATING_TOKENS
        out = []
        for prompt in prompts:
            side = "persona" if "PERSONA" in prompt.user else "plain"
            if prompt.assistant_prefix.endswith("[[1"):
                out.append(self.AFTER_ONE[side])
            else:
                chosen = self.FIRST if side == "persona" else self.PLAIN
                out.append(OptionProbs({o: chosen.probs.get(o, 0.0) for o in options}, chosen.mass, chosen.source))
        return out


def test_the_pointwise_score_is_the_expected_rating_of_the_judges_distribution(tiny_config, tmp_path):
    ctx = prepared_run(tmp_path / "run", tiny_config, [("alpha", "PERSONA answer", "plain answer")],
                       judge="pointwise", pointwise_margin=1.9)
    ctx.engine = FixedRatings()
    labels = labelled(ctx)
    judged = {j["variant"]: j for j in ctx.run.read("judgments")}
    # by hand: P(1) = 0.2 * 0.8 * (1 - 0.25) = 0.12, P(10) = 0.1 * 0.8 + 0.2 * 0.8 * 0.25 = 0.12, P(7) = 0.4,
    # P(9) = 0.16; over 0.8 in all: 0.15, 0.15, 0.5, 0.2 -> 1 * 0.15 + 10 * 0.15 + 7 * 0.5 + 9 * 0.2 = 6.95
    assert judged["persona"]["rating_probs"] == pytest.approx({str(r): p for r, p in zip(
        range(1, 11), [0.15, 0, 0, 0, 0, 0, 0.5, 0, 0.2, 0.15])})
    assert judged["persona"]["score"] == pytest.approx(6.95)
    assert judged["persona"]["rating_mass"] == pytest.approx(0.8)
    assert judged["plain"]["score"] == pytest.approx(5.0)
    assert labels == {"q0": 1}  # 6.95 - 5.0 = 1.95 beats the margin of 1.9
    ctx.run.update_stage("verify", status="done")
    judge = inspect_run(ctx.run.path)["verify"]
    assert judge["kind"] == "pointwise" and judge["pairs"] == 1 and judge["margin"] == 1.9
    assert (judge["score_min"], judge["score_max"]) == pytest.approx((5.0, 6.95))
    assert judge["score_std"] == pytest.approx(0.975) and judge["within_margin_share"] == 0.0
    assert judge["persona_wins"] == 1 and judge["rating_mass_mean"] == pytest.approx((0.8 + 0.5) / 2)
    ctx = prepared_run(tmp_path / "wide", tiny_config, [("alpha", "PERSONA answer", "plain answer")],
                       judge="pointwise", pointwise_margin=2.0)
    ctx.engine = FixedRatings()
    assert labelled(ctx) == {"q0": 0} and ctx.run.read("labels")[0]["outcome"] == "tie"


def test_a_pointwise_judge_refuses_replies_without_probabilities(tiny_config, tmp_path):
    class TextOnly:
        def option_probs(self, prompts, options, **_kwargs):
            return [OptionProbs({o: float(o == "7") for o in options}, None, "text") for _ in prompts]

    ctx = prepared_run(tmp_path / "run", tiny_config, judge="pointwise")
    ctx.engine = TextOnly()
    with pytest.raises(PrismError, match="needs the judge's token probabilities"):
        verify.run(ctx)


def test_pointwise_judging_has_no_slot(tiny_config, tiny_lm, tmp_path, monkeypatch):
    """Scoring the plain answers first instead of the persona answers first changes no score and no verdict."""
    pairs = [(d, f"{d} persona answer number {i}", f"plain {d} answer {i}") for i, d in enumerate(["alpha"] * 3)]
    runs = {}
    for name, slots in (("persona_first", ("persona", "plain")), ("plain_first", ("plain", "persona"))):
        monkeypatch.setattr(judge_pointwise, "SLOTS", slots)
        ctx = prepared_run(tmp_path / name, tiny_config, pairs, judge="pointwise", pointwise_margin=0.0,
                           batch_size=16)
        ctx.engine = LocalEngine(tiny_lm)
        verify.run(ctx)
        runs[name] = ctx.run.read("labels")
        assert [j["variant"] for j in ctx.run.read("judgments")][:2] == list(slots)
    first, second = runs["persona_first"], runs["plain_first"]
    assert [r["outcome"] for r in first] == [r["outcome"] for r in second]
    for a, b in zip(first, second):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    assert len({round(r["scores"]["persona"], 6) for r in first}) > 1  # the scores do depend on the answer


def test_a_run_made_before_the_judge_option_loads_serves_and_resumes_unchanged(tiny_run, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(tiny_run, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("judge", "verifier", "verifiers", "pointwise_margin"):  # fields this change added
        manifest["config"].pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    before, after = PrismModel.from_run(tiny_run, device="cpu"), PrismModel.from_run(old, device="cpu")
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    requests = [GenerationRequest([{"role": "user", "content": q}], params=params)
                for q in (*PERSONA_QUERIES, *BASE_QUERIES)]
    for a, b in zip(before.generate_batch(requests), after.generate_batch(requests)):
        assert (a.text, a.route, a.gate_probability) == (b.text, b.route, b.gate_probability)
    config = BootstrapConfig(**with_new_defaults(manifest["config"]))
    assert config.judge == "pairwise"
    assert bootstrap(config, old)["stages"]["distill"] == "done"
    assert "verify" in inspect_run(old)  # inspect reads the old run's (empty) judgments as pairwise


def test_changing_the_judge_keeps_the_answers_and_judges_again(tiny_config, tmp_path):
    config = tiny_config(domains=["math"], queries_per_persona=2)
    run = tmp_path / "run"
    bootstrap(config, run)
    answers = (run / "answers.jsonl").read_text()
    rejudged = tiny_config(domains=["math"], queries_per_persona=2, judge="verifier", verifier="max-words:3")
    summary = bootstrap(rejudged, run)
    assert (run / "answers.jsonl").read_text() == answers
    assert summary["verify"]["kind"] == "verifier" and summary["stages"]["verify"] == "done"
    assert {j["kind"] for j in RunDir(run).read("judgments")} == {"verifier"}
    aside = list(run.glob("replaced-*"))
    assert len(aside) == 1 and (aside[0] / "judgments.jsonl").is_file() and (aside[0] / "gate").is_dir()
    with pytest.raises(PrismError, match="different config"):  # anything else still needs --force
        bootstrap(tiny_config(domains=["math"], queries_per_persona=3, judge="verifier", verifier="max-words:3"), run)


def test_a_run_judges_again_when_its_verifiers_code_changes(tiny_config, tmp_path):
    spec = verifier_file(tmp_path, "mine", "def check(domain, query, answer):\n    return True\n")
    config = tiny_config(domains=["math"], queries_per_persona=2, judge="verifier", verifier=spec)
    run = tmp_path / "run"
    bootstrap(config, run)
    assert all(j["score"] == 1.0 for j in RunDir(run).read("judgments"))
    before = (run / "judgments.jsonl").stat().st_mtime_ns
    bootstrap(config, run)  # the same code: nothing is judged again
    assert (run / "judgments.jsonl").stat().st_mtime_ns == before and not list(run.glob("replaced-*"))
    (tmp_path / "mine.py").write_text("def check(domain, query, answer):\n    return False\n")
    bootstrap(config, run)
    assert all(j["score"] == 0.0 for j in RunDir(run).read("judgments"))
    assert len(list(run.glob("replaced-*"))) == 1


def test_records_written_before_the_judge_option_read_as_pairwise(tmp_path):
    from prism.stages.records import read_judgments, read_labels

    run = RunDir(tmp_path)
    run.append("judgments", [{"id": "q0:persona_first", "query_id": "q0", "order": "persona_first",
                              "probs": {"A": 0.7, "B": 0.2, "TIE": 0.1}, "option_mass": 0.5,
                              "verdict_source": "logits", "raw_verdict": "A", "a_field_from_later": 1}])
    run.append("labels", [{"query_id": "q0", "persona_id": "p", "domain": "d", "query": "q?", "persona": "You are.",
                           "persona_answer": "a", "plain_answer": "b", "label": 0, "split": "retain",
                           "verdicts": {}, "position_prior": None}])
    judgment, label = read_judgments(run)[0], read_labels(run)[0]
    assert (judgment.kind, judgment.slot, judgment.raw_verdict) == ("pairwise", "persona_first", "A")
    assert (label.judge, label.outcome, label.label) == ("pairwise", None, 0)
    assert "a_field_from_later" not in judgment.to_record()
