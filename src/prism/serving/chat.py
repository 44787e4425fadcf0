"""`prism chat`: a terminal chat with a run's gated model (either engine) that shows each answer's route."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from prism.errors import PrismError
from prism.inference.base import GatedModel, GenerationRequest, RouteDecision
from prism.routes import ROUTES
from prism.serving.config import ChatConfig

HELP = ("commands: /route base|persona|auto|<k-way persona> (pin a route, or let the gate decide per turn), /reset "
        "(forget the conversation), /quit. Ctrl-C stops an answer; Ctrl-D or /quit leaves.")


def route_label(decision: RouteDecision) -> str:
    route = decision.route if decision.persona is None else f"persona {decision.persona}"
    if decision.forced:
        return f"[{route} · pinned]"
    return f"[{route} · gate p(persona)={decision.gate_probability:.2f}]"


def parse_route(model: GatedModel, text: str) -> tuple[str, str | None]:
    """(route, k-way persona) from `auto`, `base`, `persona` or one of the model's k-way personas."""
    if text in ROUTES:
        return text, None
    if text in model.personas:
        return "persona", text
    raise PrismError(f"unknown route {text!r}: choose one of {', '.join([*ROUTES, *model.personas])}")


@contextlib.contextmanager
def ctrl_c_interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in the chat, whatever SIGINT's disposition the process inherited. A process
    started as a background job of a non-interactive shell (`make test &`, a script's `cmd &`) inherits SIGINT
    ignored, and Python then leaves it ignored: Ctrl-C did nothing and an answer could not be stopped. The
    inherited disposition is restored when the chat ends. Off the main thread Python cannot set handlers: as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def chat(model: GatedModel, config: ChatConfig | None = None, *, read: Callable[[str], str] = input,
         out: TextIO = sys.stdout) -> None:
    """Read-answer loop, as `config` says (the route to start on, a system message, sampling). Each answer streams
    as it is generated, after a line naming its route; Ctrl-C stops an answer and keeps the chat."""
    with ctrl_c_interrupts():
        _chat(model, config, read, out)


def _chat(model: GatedModel, config: ChatConfig | None, read: Callable[[str], str], out: TextIO) -> None:
    config = config or ChatConfig()
    params, system = config.sampling(), config.system
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())

    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    history: list[dict[str, str]] = []
    route, persona = parse_route(model, config.route)
    personas = f", k-way personas: {', '.join(model.personas)}" if model.personas else ""
    say(f"PRISM chat: {model.run_path or 'model'} on {model.engine} (route {persona or route}, threshold "
        f"{model.threshold:.2f}{personas}). {HELP}")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            say()
            return
        except KeyboardInterrupt:
            say("\n(Ctrl-D or /quit leaves the chat)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                history.clear()
                say("(conversation cleared)")
            elif command == "/route" and argument.strip() in (*ROUTES, *model.personas):
                route, persona = parse_route(model, argument.strip())
                say(f"(route: {persona or route})")
            else:
                say(HELP)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        answer = []
        started, tokens = time.perf_counter(), 0
        try:
            request = GenerationRequest(messages, route, params, persona=persona)
            with contextlib.closing(model.stream([request])) as events:
                for event in events:
                    if event.decision is not None:
                        say(route_label(event.decision))
                    answer.append(event.delta)
                    say(event.delta, end="")
                    if event.completion is not None:
                        tokens = event.completion.completion_tokens
            seconds = time.perf_counter() - started
            say(f"\n({tokens} tokens, {tokens / seconds:.1f} tok/s)")
        except KeyboardInterrupt:
            say(" [interrupted]")
        except PrismError as exc:  # e.g. the conversation outgrew the context window: keep the chat alive
            history.pop()
            say(f"(error: {exc}; /reset starts a fresh conversation)")
            continue
        history.append({"role": "assistant", "content": "".join(answer)})
