"""The one registry of route names, read by inference, serving, the sidecar, `prism export vllm`, the metrics and
the request log.

A request asks for a route: `auto` (the gate decides), `base` or `persona`. A persona route runs on an adapter,
named by its key: `persona` (the binary adapter) or `persona-<p>` (a k-way run's adapter for persona p); the key
is also the name of its llama.cpp context, its PEFT adapter and its upstream model. `prism serve` serves each route
as a model: `prism` (auto), `prism-base`, `prism-persona`, `prism-persona-<p>`; vLLM serves the same names."""

from __future__ import annotations

from collections.abc import Sequence

AUTO, BASE, PERSONA = "auto", "base", "persona"
ROUTES = (AUTO, BASE, PERSONA)
SERVED = "prism"  # the gated model's served name, and the prefix of every other


def adapter_key(persona: str | None) -> str:
    """The key of a persona route's adapter: `persona` (the binary adapter) or `persona-<k-way persona>`."""
    return PERSONA if persona is None else f"{PERSONA}-{persona}"


def is_adapter_key(name: str) -> bool:
    return name == PERSONA or name.startswith(PERSONA + "-")


def persona_of(key: str) -> str | None:
    """The k-way persona an adapter key names (None: the binary adapter)."""
    return None if key == PERSONA else key.removeprefix(PERSONA + "-")


def route_key(route: str, persona: str | None = None) -> str:
    """What runs a forced route: `base`, or the key of its adapter."""
    return BASE if route == BASE else adapter_key(persona)


def served_name(route: str, persona: str | None = None) -> str:
    """The model name a client sends for a route: `prism` (auto), `prism-base`, `prism-persona[-<persona>]`."""
    return SERVED if route == AUTO else f"{SERVED}-{route_key(route, persona)}"


def served_names(has_adapter: bool, personas: Sequence[str] = ()) -> list[str]:
    """Every model a run serves: prism, prism-base, prism-persona (with the binary adapter), one per k-way persona."""
    names = [served_name(AUTO), served_name(BASE)] + ([served_name(PERSONA)] if has_adapter else [])
    return names + [served_name(PERSONA, persona) for persona in personas]


def route_of(name: str) -> tuple[str, str | None] | None:
    """(route, k-way persona) a served model name asks for; None for a name that is no route's."""
    if name == SERVED:
        return AUTO, None
    key = name.removeprefix(SERVED + "-")
    if key == name:
        return None
    if key == BASE:
        return BASE, None
    return (PERSONA, persona_of(key)) if is_adapter_key(key) else None
