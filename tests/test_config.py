import pytest

from prism.config import DEFAULT_DOMAINS, PRESETS, load_config_file, resolve_config
from prism.errors import PrismError


def test_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "prism.yaml"
    path.write_text("preset: tiny\nanswer_max_tokens: 77\nseed: 5\nout: runs/x\n")
    config = resolve_config(load_config_file(path), seed=9)
    assert config.queries_per_persona == PRESETS["tiny"]["queries_per_persona"]  # from the preset
    assert config.answer_max_tokens == 77  # the file beats the preset
    assert config.seed == 9  # a flag beats the file


def test_defaults_follow_the_method():
    config = resolve_config()
    assert config.preset == "small"
    assert config.domains == DEFAULT_DOMAINS and len(config.domains) == 10
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert (config.distill_top_k, config.distill_temperature) == (64, 2.0)
    assert (config.query_temperature, config.answer_temperature) == (0.9, 0.7)
    assert config.query_top_p == 0.9
    paper = resolve_config(preset="paper")
    assert (paper.queries_per_persona, paper.answer_max_tokens, paper.distill_epochs) == (50, 512, 10)


def test_domains_from_comma_string():
    assert resolve_config(domains="creative writing, code review,safety").domains == [
        "creative writing", "code review", "safety"]


@pytest.mark.parametrize("overrides, message", [
    ({"domains": []}, "domain list is empty"),
    ({"domains": ",, "}, "domain list is empty"),
    ({"domains": ["a", "A"]}, "duplicate domain"),
    ({"preset": "huge"}, "unknown preset"),
    ({"queries_per_persona": 0}, "queries_per_persona must be at least 1"),
    ({"routing": "3way"}, "unknown routing '3way'"),
    ({"routing": "kway", "domains": ["code review", "Code-Review!"]}, "the same name twice"),
    ({"routing": "kway", "kway_min_wins": 0}, "kway_min_wins must be at least 1"),
    ({"judge": "vibes"}, "unknown judge 'vibes'"),
    ({"judge": "verifier"}, "--judge verifier needs a check"),
    ({"verifier": "max-words:5"}, "add --judge verifier"),
    ({"judge": "verifier", "verifier": "max-words:many"}, "needs a whole number"),
    ({"judge": "verifier", "verifier": "regex:("}, "does not compile"),
    ({"judge": "verifier", "verifier": "shortness"}, "unknown verifier 'shortness'"),
    ({"judge": "verifier", "domains": ["math", "safety"], "verifiers": {"math": "json"}},
     "no verifier for the domain.*safety"),
    ({"judge": "verifier", "domains": ["math"], "verifiers": {"maths": "json"}},
     "domains the run does not have: maths"),
    ({"judge": "pointwise", "pointwise_margin": -1}, "must not be negative"),
    ({"query_top_p": 0}, r"query_top_p is a probability mass: pass a value in \(0, 1\]"),
    ({"query_top_p": 1.5}, r"query_top_p is a probability mass"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(PrismError, match=message):
        resolve_config(**overrides)


def test_unknown_file_option_is_named(tmp_path):
    path = tmp_path / "prism.yaml"
    path.write_text("queries_per_personaa: 3\n")
    with pytest.raises(PrismError, match="unknown option.*queries_per_personaa"):
        load_config_file(path)


def test_fingerprint_ignores_runtime_fields():
    assert resolve_config(device="cpu").fingerprint() == resolve_config(device="cuda").fingerprint()
    assert resolve_config(seed=1).fingerprint() != resolve_config(seed=2).fingerprint()


def test_judge_settings_are_part_of_the_identity_of_the_judge_they_belong_to():
    assert resolve_config(judge="pointwise").fingerprint() != resolve_config().fingerprint()
    assert resolve_config(pointwise_margin=1).fingerprint() == resolve_config(pointwise_margin=2).fingerprint()
    assert (resolve_config(judge="pointwise", pointwise_margin=1).fingerprint()
            != resolve_config(judge="pointwise", pointwise_margin=2).fingerprint())
    verifier = {"judge": "verifier", "domains": ["math"]}
    assert (resolve_config(verifier="json", **verifier).fingerprint()
            != resolve_config(verifier="refusal", **verifier).fingerprint())
    assert (resolve_config(judge="verifier", verifier="json", judge_calibration="none").fingerprint()
            == resolve_config(judge="verifier", verifier="json").fingerprint())


def test_a_config_file_maps_domains_to_verifiers(tmp_path):
    path = tmp_path / "prism.yaml"
    path.write_text("domains: [math, writing]\njudge: verifier\nverifier: max-words:20\nverifiers:\n  math: json\n")
    config = resolve_config(load_config_file(path))
    assert config.verifiers == {"math": "json"} and config.verifier == "max-words:20"


def test_kway_min_wins_is_part_of_a_kway_runs_identity_only():
    assert resolve_config(kway_min_wins=2).fingerprint() == resolve_config(kway_min_wins=9).fingerprint()
    assert (resolve_config(routing="kway", kway_min_wins=2).fingerprint()
            != resolve_config(routing="kway", kway_min_wins=9).fingerprint())


def test_every_list_option_takes_a_yaml_list_or_a_comma_separated_string(tmp_path):
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"query": "What is the capital of France?", "domain": "facts"}\n')
    path = tmp_path / "prism.yaml"
    path.write_text(f"domains: facts\nqueries: {queries}\nqueries_mix: real\nlora_target_modules: q_proj, v_proj\n")
    config = resolve_config(load_config_file(path))
    assert config.queries_mix == ["real"] and config.domains == ["facts"]
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    path.write_text(f"domains: [facts]\nqueries: {queries}\nqueries_mix: [real, synthetic]\n")
    assert resolve_config(load_config_file(path)).queries_mix == ["real", "synthetic"]
    assert resolve_config(domains=["facts"], queries_file=str(queries), queries_mix="real,synthetic").queries_mix == [
        "real", "synthetic"]  # the Python API and the command line's text alike


def test_a_config_file_maps_domains_to_personas_and_example_queries(tmp_path):
    path = tmp_path / "prism.yaml"
    path.write_text("domains:\n  geography:\n    persona: You are a geographer.\n    examples:\n"
                    "      - What is the capital of Peru?\n      - Which river flows through Cairo?\n  cooking:\n")
    config = resolve_config(load_config_file(path))
    assert config.domains == ["geography", "cooking"]
    assert config.domain_personas == {"geography": "You are a geographer."}
    assert config.domain_examples == {"geography": ["What is the capital of Peru?", "Which river flows through Cairo?"]}
    path.write_text("domains:\n  geography:\n    persona: x\n    exemples: [a]\n")
    with pytest.raises(PrismError, match="domain 'geography': give a mapping with 'persona'"):
        resolve_config(load_config_file(path))
    with pytest.raises(PrismError, match="examples name domains the run does not have: cooking"):
        resolve_config(domains=["geography"], domain_examples={"cooking": ["How do I boil an egg?"]})


def test_the_gate_layer_defaults_to_a_fifteenth_of_the_depth_and_is_checked():
    config = resolve_config(domains=["facts"])
    assert config.gate_layer is None and config.gate_pool == "mean" and config.gate_classifier == "auto"
    assert [config.gate_layer_of(n) for n in (3, 24, 30, 80)] == [0, 2, 2, 5]
    assert resolve_config(domains=["facts"], gate_layer=7).gate_layer_of(30) == 7
    with pytest.raises(PrismError, match="gate_layer is a decoder block, 0 or more; got -1"):
        resolve_config(domains=["facts"], gate_layer=-1)
    with pytest.raises(PrismError, match="gate_pool"):
        resolve_config(domains=["facts"], gate_pool="max")
