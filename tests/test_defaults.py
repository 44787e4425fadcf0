"""Every option's default is written in one module: where its config defines it. A function parameter, a
hand-written flag or another config with the same name does not write the literal again (it takes the config,
or the option's constant). A default of None or a bool (an absence, a switch off) is not counted."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "prism"


def _literal(node: ast.AST | None) -> bool:
    """A number or a text written out (a negative number too); None and booleans are no default worth sharing."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and node.value is not None and not isinstance(node.value, bool)


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def option_defaults(tree: ast.AST) -> dict[str, ast.Constant]:
    """{field: its literal default} of the config fields made with `option(...)` in a module."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(node.value, ast.Call):
            call = node.value
            if isinstance(call.func, ast.Name) and call.func.id == "option" and _literal(_keyword(call, "default")):
                found[node.target.id] = _keyword(call, "default")  # type: ignore[assignment]
    return found


def repeated_defaults(src: Path = SRC) -> list[str]:
    trees = {path: ast.parse(path.read_text()) for path in sorted(src.rglob("*.py"))}
    owners: dict[str, dict[Path, object]] = {}
    for path, tree in trees.items():
        for name, default in option_defaults(tree).items():
            owners.setdefault(name, {})[path] = ast.literal_eval(default)
    # two configs may give one name different defaults (different commands); the same literal twice is a repeat
    found = []
    for name, defined in owners.items():
        for value in {repr(v) for v in defined.values()}:
            paths = [p for p, v in defined.items() if repr(v) == value]
            if len(paths) > 1:
                found.append(f"option {name!r} has the literal default {value} in {len(paths)} modules: "
                             f"{', '.join(str(p.relative_to(src.parent)) for p in paths)}")
    for path, tree in trees.items():
        where = path.relative_to(src.parent)
        own = set(option_defaults(tree))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                found += [f"{where}:{node.lineno} {node.name}({a.arg}=...) repeats the default of the option "
                          f"{a.arg!r}" for a, d in pairs if a.arg in owners and a.arg not in own and _literal(d)]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "add_argument" and _literal(_keyword(node, "default"))):
                flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                dest = _keyword(node, "dest")
                names = {f.lstrip("-").replace("-", "_") for f in flags} | (
                    {dest.value} if isinstance(dest, ast.Constant) else set())
                found += [f"{where}:{node.lineno} the flag {n!r} repeats the option's default" for n in names
                          if n in owners]
    return found


def test_no_option_default_is_written_in_two_modules():
    assert repeated_defaults() == []


def test_the_check_sees_a_planted_repeat(tmp_path):
    package = tmp_path / "prism"
    (package / "serving").mkdir(parents=True)
    (package / "serving" / "config.py").write_text(
        "class ServeConfig:\n    port: int = option('TCP port', default=8000)\n")
    (package / "serving" / "server.py").write_text(
        "def serve(model, port: int = 8000, host=None):\n    pass\n"
        "def flags(parser):\n    parser.add_argument('--port', type=int, default=8000)\n")
    (package / "export.py").write_text("class ExportConfig:\n    port: int = option('vllm port', default=8000)\n"
                                       "    merged: bool = option('merge', default=False)\n")
    found = repeated_defaults(package)
    assert len(found) == 3 and "'port' has the literal default 8000 in 2 modules" in found[0]
    assert "serve(port=...)" in found[1] and "the flag 'port'" in found[2]
