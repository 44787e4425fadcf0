import json

from prism.cli import main
from prism.evaluation.persona_ab import summarize_ab
from prism.stages.judge_pairwise import outcome_of
from prism.stages.records import Label


def label(domain, first, second):
    outcome = outcome_of({"persona_first": first, "persona_second": second})
    return Label(query_id="q", persona_id="p", domain=domain, query="q?", persona="You are.", persona_answer="a",
                 plain_answer="b", label=int(outcome == "win"), split="retain", outcome=outcome)


def test_outcomes_need_both_orders_and_rates_add_up():
    labels = [label("code", "A", "B"), label("code", "B", "A"), label("code", "A", "A"), label("math", "TIE", "B")]
    assert [x.outcome for x in labels] == ["win", "loss", "tie", "tie"]
    summary = summarize_ab(labels)
    assert summary["code"]["n"] == 3 and summary["overall"]["n"] == 4
    assert abs(summary["code"]["win_rate"] - 1 / 3) < 1e-9 and summary["math"]["tie_rate"] == 1.0
    for row in summary.values():
        assert abs(row["win_rate"] + row["loss_rate"] + row["tie_rate"] - 1) < 1e-9
        assert row["win_rate_ci"][0] <= row["win_rate"] <= row["win_rate_ci"][1]


def test_prism_ab_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    persona = tmp_path / "persona.txt"
    persona.write_text("You are an expert code reviewer.")
    queries = tmp_path / "tasks.jsonl"
    queries.write_text("\n".join(json.dumps(q) for q in [
        {"query": "Review this function.", "category": "code"}, {"query": "Explain recursion.", "category": "code"},
        {"query": "Write a poem.", "category": "writing"}]))
    out = tmp_path / "ab"
    args = ["ab", "--persona", str(persona), "--queries", str(queries), "--model", str(tiny_model_dir),
            "--out", str(out), "--max-tokens", "6", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "code" in printed and "writing" in printed and "overall" in printed
    results = json.loads((out / "ab_results.json").read_text())
    assert results["categories"]["overall"]["n"] == 3 and (out / "ab_results.png").stat().st_size > 1000
    answers_before = (out / "answers.jsonl").read_text()
    assert main(args) == 0 and (out / "answers.jsonl").read_text() == answers_before  # resumed, not redone


def test_prism_ab_explains_a_bad_queries_file(tmp_path, capsys):
    persona = tmp_path / "persona.txt"
    persona.write_text("You are an expert.")
    queries = tmp_path / "tasks.jsonl"
    queries.write_text('{"query": "fine"}\n{"prompt": "wrong key"}\n')
    assert main(["ab", "--persona", str(persona), "--queries", str(queries)]) == 2
    assert f'{queries}:2: each line needs a non-empty "query" string' in capsys.readouterr().err


def test_prism_ab_with_a_verifier_and_then_another_judge(tiny_model_dir, tmp_path, capsys):
    persona = tmp_path / "persona.txt"
    persona.write_text("You are terse.")
    queries = tmp_path / "tasks.jsonl"
    queries.write_text("\n".join(json.dumps({"query": q, "category": "c"}) for q in ["Explain recursion.", "A poem?"]))
    out = tmp_path / "ab"
    args = ["ab", "--persona", str(persona), "--queries", str(queries), "--model", str(tiny_model_dir), "--out",
            str(out), "--max-tokens", "6", "--device", "cpu", "--batch-size", "4"]
    assert main([*args, "--judge", "verifier", "--verifier", "max-words:3"]) == 0
    results = json.loads((out / "ab_results.json").read_text())
    assert results["judge"]["kind"] == "verifier" and results["judge"]["pairs"] == 2
    assert "judge    verifier: pass rate with the persona" in capsys.readouterr().out
    answers = (out / "answers.jsonl").read_text()
    assert main([*args, "--judge", "pairwise"]) == 0  # other judge settings: the answers stay, the verdicts go
    assert (out / "answers.jsonl").read_text() == answers and len(list(out.glob("replaced-*"))) == 1
    assert json.loads((out / "ab_results.json").read_text())["judge"]["kind"] == "pairwise"
