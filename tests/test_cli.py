"""The command line mirrors the configs: each config field is a flag, and an unset flag leaves the
dataclass's own default, so defaults live in one place."""

import dataclasses

import pytest

from prism.cli import EVAL_LOAD_OPTIONS, build_parser, flag_values, main
from prism.config import BootstrapConfig
from prism.evaluation.calibrate import Objective
from prism.evaluation.config import EvalConfig
from prism.evaluation.persona_ab import SHARED_OPTIONS as AB_SHARED_OPTIONS
from prism.evaluation.persona_ab import ABConfig
from prism.evaluation.replicate import ReplicateConfig
from prism.inference.config import LoadConfig
from prism.serving.config import ChatConfig, ExportConfig, ServeConfig, SidecarConfig

# each command, the configs its flags are generated from (with the fields it takes of each, when not all)
CONFIGS = {"bootstrap": ([(BootstrapConfig, None)], []), "eval": ([(EvalConfig, None), (LoadConfig, EVAL_LOAD_OPTIONS)],
                                                                 ["RUN"]),
           "calibrate": ([(Objective, None)], ["RUN"]), "replicate": ([(ReplicateConfig, None)], []),
           "chat": ([(LoadConfig, None), (ChatConfig, None)], ["RUN"]),
           "serve": ([(LoadConfig, None), (ServeConfig, None), (SidecarConfig, None)], ["RUN"]),
           "export": ([(ExportConfig, None)], ["gguf", "RUN"]),
           "ab": ([(ABConfig, None), (BootstrapConfig, AB_SHARED_OPTIONS)], [])}


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_unset_flags_leave_every_default_to_the_config(command, monkeypatch):
    configs, positional = CONFIGS[command]
    for variable in ("PRISM_JUDGE_API_KEY", "PRISM_API_KEY", "PRISM_UPSTREAM_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    args = build_parser().parse_args([command, *positional])
    for config_class, only in configs:
        assert flag_values(args, config_class, only) == {}
        for field in dataclasses.fields(config_class):
            if only is None or field.name in only:
                python_only = field.metadata.get("cli") is False
                assert hasattr(args, field.name) != python_only, f"{command}: {config_class.__name__}.{field.name}"


def test_the_serving_flags_reach_their_configs():
    args = build_parser().parse_args(["serve", "RUN", "--port", "9001", "--max-batch-size", "4", "--threshold", "0.7",
                                      "--persona-model", "lora", "--upstream", "http://x/v1", "--api-key", "k"])
    assert LoadConfig(**flag_values(args, LoadConfig)) == LoadConfig(threshold=0.7, persona_model="lora")
    assert ServeConfig(**flag_values(args, ServeConfig)) == ServeConfig(port=9001, max_batch_size=4, api_key="k")
    assert SidecarConfig(**flag_values(args, SidecarConfig)) == SidecarConfig(upstream="http://x/v1")
    chat = build_parser().parse_args(["chat", "RUN", "--max-tokens", "9", "--route", "base", "--temperature", "0"])
    assert ChatConfig(**flag_values(chat, ChatConfig)) == ChatConfig(max_tokens=9, route="base", temperature=0.0)


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


def test_version_prints_the_installed_version(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"prism {importlib.metadata.version('prism-routing')}"
