"""The built-in verifiers and the user's own: what each accepts and rejects, and clear errors for bad specs."""

import pytest

from prism.errors import PrismError
from prism.verifiers import load_verifier, verifier_specs


@pytest.mark.parametrize("spec, passes, fails", [
    ("max-words:3", "One two three.", "One two three four."),
    ("min-words:3", "One two three.", "One two."),
    ("json", 'Here it is: {"name": "Ada", "born": 1815} as asked.', "name: Ada, born 1815 {not json}"),
    ("json", '```json\n{"a": [1, 2]}\n```', "[1, 2] is a list, not an object"),
    ("numbered-steps:2", "1. Open the file.\n2) Read it.", "1. Open the file. 2. Read it."),
    ("refusal", "I'm sorry, but I can’t help with that.", "Sure, here is how."),
    ("regex:^Answer:", "Answer: 42", "The answer: 42"),
])
def test_built_in_verifiers(spec, passes, fails):
    verifier = load_verifier(spec)
    assert verifier("d", "q", passes) == 1.0
    assert verifier("d", "q", fails) == 0.0


def test_a_users_function_from_a_module_or_a_file(tmp_path, monkeypatch):
    (tmp_path / "house_style.py").write_text("def score(domain, query, answer):\n"
                                             "    return 0.25 if domain == 'legal' else answer.endswith('!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("house_style:score", f"{tmp_path / 'house_style.py'}:score"):
        verifier = load_verifier(spec)
        assert verifier("legal", "q", "x") == 0.25 and verifier("chat", "q", "Hi!") == 1.0
        assert verifier("chat", "q", "Hi.") == 0.0


@pytest.mark.parametrize("spec, message", [
    ("max-words", "needs a whole number"),
    ("json:strict", "takes no argument"),
    ("regex:", "needs a pattern"),
    ("wordy", "unknown verifier 'wordy'"),
    ("no_such_module_here:check", "importing no_such_module_here failed"),
    ("json_missing/file.py:check", "does not exist"),
])
def test_bad_specs_are_explained(spec, message):
    with pytest.raises(PrismError, match=message):
        load_verifier(spec)


def test_a_function_that_returns_text_is_an_error_the_judge_can_name(tmp_path):
    (tmp_path / "bad.py").write_text("def check(domain, query, answer):\n    return 'yes'\n")
    with pytest.raises(TypeError, match="not a bool or a number"):
        load_verifier(f"{tmp_path / 'bad.py'}:check")("d", "q", "a")


def test_each_domain_gets_its_own_spec_or_the_default():
    assert verifier_specs(["Math", "chat"], "max-words:9", {"math": "json"}) == {"Math": "json", "chat": "max-words:9"}
    with pytest.raises(PrismError, match="no verifier for the domain.*chat"):
        verifier_specs(["Math", "chat"], None, {"math": "json"})
