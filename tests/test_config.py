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


def test_kway_min_wins_is_part_of_a_kway_runs_identity_only():
    assert resolve_config(kway_min_wins=2).fingerprint() == resolve_config(kway_min_wins=9).fingerprint()
    assert (resolve_config(routing="kway", kway_min_wins=2).fingerprint()
            != resolve_config(routing="kway", kway_min_wins=9).fingerprint())
