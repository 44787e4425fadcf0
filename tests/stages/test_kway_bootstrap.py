"""k-way routing in the bootstrap: the classes from the labels, one adapter per kept persona, a gate over
base and each of them."""

import json

import torch
from safetensors.torch import load_file

from prism.lm.gate import Gate, GateConfig, save_threshold
from prism.runs import RunDir
from prism.stages.inspect import format_summary
from prism.stages.pipeline import bootstrap
from prism.stages.records import Label, read_labels
from prism.stages.verify import kway_classes, kway_label
from stages.test_pipeline import plant_a_judge_that_prefers_some_persona_answers


def label(domain: str, value: int) -> Label:
    return Label(query_id="q", persona_id="p", domain=domain, query="q?", persona="You are.", persona_answer="a",
                 plain_answer="b", label=value, split="distill" if value else "retain")


def test_kway_classes_keep_personas_with_enough_wins_and_merge_the_rest_into_base():
    labels = ([label("Writing", 1)] * 3 + [label("Writing", 0)]
              + [label("safety", 1)] * 1 + [label("factual recall (short)", 1)] * 2)
    classes, merged = kway_classes(labels, min_wins=2)
    assert classes == ["base", "writing", "factual-recall-short"]
    assert merged == {"safety": 1}
    assert [kway_label(r, classes) for r in labels] == [1, 1, 1, 0, 0, 2, 2]


def test_a_kway_gate_routes_to_the_most_probable_adapter_only_when_confident():
    gate = Gate(GateConfig(input_dim=2, hidden=4, classes=["base", "a", "b"], threshold=0.6))
    # P = (0.5, 0.1, 0.4): P(adapter) 0.5 < 0.6 -> base; (0.2, 0.3, 0.5): 0.8 -> b; (0.1, 0.6, 0.3) -> a
    probabilities = torch.tensor([[0.5, 0.1, 0.4], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    gate.class_probabilities = lambda features: probabilities  # the rule alone, on known probabilities
    decisions = gate.decide(torch.zeros(3, 2))
    assert [route for _, route in decisions] == [0, 2, 1]
    assert [round(p, 6) for p, _ in decisions] == [0.5, 0.8, 0.9]
    assert [gate.persona_of(route) for _, route in decisions] == [None, "b", "a"]


def test_kway_bootstrap_trains_one_adapter_per_kept_persona_and_a_gate_over_them(tiny_config, tmp_path,
                                                                                 monkeypatch):
    plant_a_judge_that_prefers_some_persona_answers(monkeypatch)
    config = tiny_config(seed=5, queries_per_persona=8, routing="kway", kway_min_wins=2)
    summary = bootstrap(config, tmp_path / "run")
    run = tmp_path / "run"
    kway = summary["kway"]
    labels = read_labels(RunDir(run))
    expected, merged = kway_classes(labels, 2)
    assert kway["classes"] == expected and len(expected) >= 3, "the planted judge lets two or more personas win"
    assert kway["merged_into_base"] == merged
    assert sum(kway["class_counts"]) == len(labels)
    # the binary routing is there too (what `prism` means in a k-way run's eval)
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "gate" / "config.json").is_file()
    gate = Gate.load(run / "kway" / "gate")
    assert gate.config.classes == expected
    assert gate.class_probabilities(torch.zeros(1, gate.config.input_dim)).shape == (1, len(expected))
    for persona in expected[1:]:
        adapter = run / "kway" / "adapters" / persona
        assert json.loads((adapter / "adapter_config.json").read_text())["layers_to_transform"] == [1, 2]
        weights = load_file(str(adapter / "adapter_model.safetensors"))
        assert weights and not any(".layers.0." in key for key in weights), "block 0 carries no LoRA"
        wins = sum(r.label == 1 and r.domain.lower().replace(" ", "-") == persona for r in labels)
        assert kway["adapters"][persona]["examples"] == wins
        assert kway["adapters"][persona]["steps"] > 0
    assert {r.get("adapter") for r in RunDir(run).read("distill_log")} == {None, *expected[1:]}
    text = format_summary(summary)
    assert "k-way    2 persona adapters" in text or f"k-way    {len(expected) - 1} persona adapters" in text

    # done is done: a second call trains nothing again
    before = {p: p.stat().st_mtime_ns for p in (run / "kway" / "adapters").rglob("*.safetensors")}
    bootstrap(config, run)
    assert {p: p.stat().st_mtime_ns for p in (run / "kway" / "adapters").rglob("*.safetensors")} == before


def test_a_binary_run_becomes_kway_and_back_keeping_its_records_and_binary_adapter(tiny_config, tmp_path,
                                                                                    monkeypatch):
    from prism.inference.artifacts import resolve_routing

    plant_a_judge_that_prefers_some_persona_answers(monkeypatch)
    run = tmp_path / "run"
    bootstrap(tiny_config(seed=5, queries_per_persona=8), run)
    records = {p.name: p.stat().st_mtime_ns for p in run.glob("*.jsonl") if p.name != "distill_log.jsonl"}
    adapter = (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    save_threshold(run / "gate", 0.37)  # as `prism calibrate` would
    summary = bootstrap(tiny_config(seed=5, queries_per_persona=8, routing="kway", kway_min_wins=2), run)
    assert Gate.load(run / "gate").config.threshold == 0.37, "the binary gate and its threshold are kept"
    assert len(summary["kway"]["classes"]) >= 3 and summary["stages"]["distill"] == "done"
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("*.jsonl") if p.name != "distill_log.jsonl"} == records
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter, "the binary adapter is kept"
    assert summary["distill"]["loss_last"] is not None and resolve_routing(run, "auto") == "kway"
    # another minimum of wins: the k-way part is redone, the old one moved aside
    summary = bootstrap(tiny_config(seed=5, queries_per_persona=8, routing="kway", kway_min_wins=100), run)
    assert summary["kway"]["classes"] == ["base"] and list(run.glob("kway.replaced-*"))
    # and back to binary: nothing is trained, the k-way gate is gone, the binary one routes
    summary = bootstrap(tiny_config(seed=5, queries_per_persona=8), run)
    assert "kway" not in summary and resolve_routing(run, "auto") == "binary"
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter
