"""The command line mirrors the configs: each config field is a flag, and an unset flag leaves the
dataclass's own default, so defaults live in one place."""

import dataclasses

import pytest

from prism.cli import build_parser, flag_values, main
from prism.config import BootstrapConfig
from prism.evaluation.calibrate import Objective
from prism.evaluation.config import EvalConfig
from prism.evaluation.replicate import ReplicateConfig

CONFIGS = {"bootstrap": (BootstrapConfig, []), "eval": (EvalConfig, ["RUN"]), "calibrate": (Objective, ["RUN"]),
           "replicate": (ReplicateConfig, [])}


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_unset_flags_leave_every_default_to_the_config(command, monkeypatch):
    config_class, positional = CONFIGS[command]
    monkeypatch.delenv("PRISM_JUDGE_API_KEY", raising=False)
    args = build_parser().parse_args([command, *positional])
    assert flag_values(args, config_class) == {}
    for field in dataclasses.fields(config_class):
        python_only = field.metadata.get("cli") is False
        assert hasattr(args, field.name) != python_only, f"{config_class.__name__}.{field.name}: flag or not"


def test_eval_flags_reach_the_config_parsed():
    args = build_parser().parse_args(["eval", "RUN", "--bench", "knowledge", "--limit", "mmlu=4,arc=2",
                                      "--data", "mmlu=cais/mmlu", "--batch-size", "3", "--scoring", "cloze"])
    config = EvalConfig(**flag_values(args, EvalConfig))
    assert config == EvalConfig(benches=["mmlu", "arc"], limit={"mmlu": 4, "arc": 2}, data={"mmlu": "cais/mmlu"},
                                batch_size=3, scoring="cloze")
    assert build_parser().parse_args(["calibrate", "RUN", "--max-mmlu-drop", "2"]).max_mmlu_drop == 2.0


def test_the_judge_key_flag_defaults_to_its_environment_variable(monkeypatch):
    monkeypatch.setenv("PRISM_JUDGE_API_KEY", "from-env")
    assert build_parser().parse_args(["eval", "RUN"]).judge_api_key == "from-env"


def test_a_flag_whose_text_does_not_parse_is_a_one_line_error(capsys, tmp_path):
    assert main(["eval", str(tmp_path), "--limit", "mmlu=many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prism: error: --limit 'mmlu=many'") and "Traceback" not in err
