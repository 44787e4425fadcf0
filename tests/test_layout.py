"""The package layout holds: imports run one way between packages, and no module imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "prism"
# What each part of prism may import besides itself (ARCHITECTURE.md draws the same floors).
BASE = {"prism.errors", "prism.config", "prism.runs", "prism.verifiers", "prism.routes"}
ALLOWED = {
    "prism.errors": set(),
    "prism.routes": set(),
    "prism.config": {"prism.errors", "prism.verifiers"},
    "prism.runs": {"prism.errors", "prism.config"},
    "prism.library_warnings": set(),
    "prism.verifiers": {"prism.errors"},
    "prism.lm": BASE,
    "prism.engines": BASE | {"prism.lm"},
    "prism.stages": BASE | {"prism.lm", "prism.engines"},
    "prism.inference": BASE | {"prism.lm"},
    "prism.serving": BASE | {"prism.lm", "prism.inference", "prism.library_warnings"},
    "prism.evaluation": BASE | {"prism.lm", "prism.engines", "prism.stages", "prism.inference"},
    "prism.discovery": BASE | {"prism.lm", "prism.engines", "prism.stages"},
}


def module_imports(src: Path = SRC) -> dict[str, set[str]]:
    """{module: the prism modules it imports anywhere in its file (function-level imports included)}."""
    graph = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prism"):
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names if (src.parent / node.module.replace(
                    ".", "/") / f"{a.name}.py").is_file()}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("prism")}
        graph[module] = targets - {module}
    return graph


def part_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        part = part_of(module)
        if part not in ALLOWED:  # prism, prism.cli: the entry points may use everything
            continue
        for target in sorted(targets):
            if part_of(target) != part and part_of(target) not in ALLOWED[part]:
                found.append(f"{module} imports {target}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "closed"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_packages_import_only_the_floors_below_them():
    assert layer_violations(module_imports()) == []


def test_no_import_circle():
    assert cycles({m: {t for t in ts if t != "prism"} for m, ts in module_imports().items()}) == []


def test_the_checks_see_a_planted_violation_and_circle(tmp_path):
    for module, text in {"prism/__init__.py": "", "prism/errors.py": "",
                         "prism/inference/__init__.py": "", "prism/stages/__init__.py": "",
                         "prism/inference/router.py": "def f():\n    from prism.stages import gate\n",
                         "prism/stages/gate.py": "from prism.inference.router import f\n"}.items():
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text(text)
    graph = module_imports(tmp_path / "prism")
    assert sorted(layer_violations(graph)) == ["prism.inference.router imports prism.stages",
                                               "prism.inference.router imports prism.stages.gate",
                                               "prism.stages.gate imports prism.inference.router"]
    assert cycles(graph) == [["prism.inference.router", "prism.stages.gate", "prism.inference.router"]]
