import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import BASE_QUERIES, PERSONA_QUERIES, run_chat
from prism.errors import PrismError
from prism.inference.transformers import PrismModel
from prism.lm.decoding import TextStream


@pytest.fixture(scope="module")
def model(tiny_run):
    return PrismModel.from_run(tiny_run, device="cpu")


def test_each_answer_shows_its_route_and_routes_switch(model):
    text = run_chat(model, [PERSONA_QUERIES[0], BASE_QUERIES[0], "/route base", PERSONA_QUERIES[0], "/route nope"])
    decisions = [line for line in text.splitlines() if line.startswith("[")]
    assert decisions[0].startswith("[persona · gate p(persona)=")
    assert decisions[1].startswith("[base · gate p(persona)=")
    assert decisions[2] == "[base · pinned]"
    assert "(route: base)" in text
    assert text.count("commands: /route") == 2  # banner, then help for the unknown route


def test_ctrl_c_stops_the_answer_not_the_chat(model, monkeypatch):
    original = TextStream.add
    calls = []

    def interrupt_on_third_token(self, token):
        calls.append(token)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, token)

    monkeypatch.setattr(TextStream, "add", interrupt_on_third_token)
    text = run_chat(model, [BASE_QUERIES[0], BASE_QUERIES[1]])
    assert "[interrupted]" in text
    assert text.count("[base · gate") == 2 and "tok/s)" in text  # the second question was answered in full


def test_context_overflow_is_reported_and_the_chat_goes_on(tiny_run):
    small = PrismModel.from_run(tiny_run, device="cpu", max_model_len=60)
    text = run_chat(small, ["word " * 100, BASE_QUERIES[0]])
    assert "maximum context length is 60" in text and "[base · gate" in text


# `prism chat` in a child process whose model, once its reply has begun, waits until the signal arrives: the
# SIGINT always lands mid-answer, however fast or loaded the machine (a long greedy reply could end first)
WAITING_CHAT = """
import sys, time
from prism.lm.decoding import TextStream

original = TextStream.add

def add_then_wait_for_the_signal(self, token):
    delta = original(self, token)
    while True:
        time.sleep(0.05)

TextStream.add = add_then_wait_for_the_signal
from prism.cli import main
sys.exit(main(sys.argv[1:]))
"""


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# "ignored": the chat started as a background job of a non-interactive shell is (`make test &` beside a CPU hog):
# it inherits SIGINT ignored, which Python keeps unless the chat takes SIGINT itself
@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_real_sigint_in_the_terminal_chat(tiny_run, inherited):
    process = subprocess.Popen(
        [sys.executable, "-c", WAITING_CHAT, "chat", str(tiny_run), "--device", "cpu", "--max-tokens", "8",
         "--temperature", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=ignore_sigint if inherited == "ignored" else None)
    try:
        process.stdin.write(BASE_QUERIES[0] + "\n")
        process.stdin.flush()
        seen = ""
        deadline = time.time() + 300  # generous: a loaded CI machine starts Python + torch slowly
        while "[base · gate" not in seen:
            assert time.time() < deadline and process.poll() is None, seen
            seen += process.stdout.readline()
        process.send_signal(signal.SIGINT)  # the reply has begun and waits for this
        process.stdin.write("/quit\n")
        process.stdin.flush()
        rest, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert "[interrupted]" in rest and process.returncode == 0, seen + rest


def test_the_terminal_shows_the_banner_then_only_route_answer_and_footer(tiny_run):
    """What a user sees in the terminal (stdout and stderr together): no library warning, no log line,
    nothing between the route line and the answer."""
    done = subprocess.run(
        [sys.executable, "-m", "prism.cli", "chat", str(tiny_run), "--engine", "transformers", "--device", "cpu",
         "--max-tokens", "8", "--temperature", "0"],
        input=BASE_QUERIES[0] + "\n", capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.split("\n")
    banner, route, answer, footer = lines[0], lines[1], "\n".join(lines[2:-3]), lines[-3]
    assert banner.startswith("PRISM chat: ") and " on transformers " in banner
    assert route.startswith("you> [base · gate p(persona)=") and route.endswith("]")
    assert re.fullmatch(r"\(8 tokens, [0-9.]+ tok/s\)", footer), done.stdout
    assert lines[-2:] == ["you> ", ""]  # the next prompt, then end of input
    assert "warn" not in answer.lower() and "deprecat" not in answer.lower()


def test_a_kway_chat_names_the_persona_and_pins_one_by_name(tiny_kway_run):
    from helpers import REVIEW_QUERY, WRITING_QUERY

    model = PrismModel.from_run(tiny_kway_run, device="cpu")
    text = run_chat(model, [WRITING_QUERY, "/route review", WRITING_QUERY, "/route auto", BASE_QUERIES[0]])
    assert "k-way personas: writing, review" in text
    assert "[persona writing · gate p(persona)=" in text and "(route: review)" in text
    assert "[persona review · pinned]" in text and "[base · gate p(persona)=" in text
    assert "[persona review" not in text.split("(route: review)")[0]
    with pytest.raises(PrismError, match="unknown route 'math'"):
        run_chat(model, [REVIEW_QUERY], route="math")
