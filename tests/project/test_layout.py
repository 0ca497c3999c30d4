"""The package's layout: rooms by concern, imports pointing down only, no import circle.

The order is the one written in rrhf_lite/__init__.py's docstring; a test here fails on any
import (at module level or inside a function) that points up, and on a circle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rrhf_lite"

# top to bottom; a module may import its own room and the rooms after it
LAYERS = ["cli", "pipeline", "plan", "stages", "training", "generation", "builtin", "models",
          "data", "config", "utils", "errors"]
TOP_LEVEL_MODULES = {"__init__.py", "cli.py", "errors.py", "py.typed"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str | None:
    """rrhf_lite.training.trainer -> "training"; rrhf_lite -> None (the lazy public API)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported rrhf_lite module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "rrhf_lite":  # from rrhf_lite import x: x is a room or a name
                found += [(f"rrhf_lite.{a.name}", node.lineno, id(node) in top_level)
                          for a in node.names]
            elif node.module.startswith("rrhf_lite."):
                found.append((node.module, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top_level) for a in node.names
                      if a.name.startswith("rrhf_lite.")]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_rooms_are_the_documented_ones():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms == set(LAYERS) - {"cli", "errors"}
    doc = (PACKAGE / "__init__.py").read_text(encoding="utf-8")
    listed = [line.split()[0] for line in doc.splitlines() if line.startswith("    ") and
              line.split() and line.split()[0] in LAYERS]
    assert listed == LAYERS, "the docstring's order is the test's"


def test_top_level_holds_only_the_entry_points():
    files = {p.name for p in PACKAGE.iterdir() if p.is_file()}
    assert files <= TOP_LEVEL_MODULES, f"move into a room: {sorted(files - TOP_LEVEL_MODULES)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_points_up(path):
    importer = _room(_module_name(path))
    if importer is None:  # rrhf_lite/__init__.py re-exports lazily from every room
        return
    level = LAYERS.index(importer)
    for module, line, _ in _imports(path):
        room = _room(module)
        assert room is not None and room in LAYERS, f"line {line}: {module} is in no room"
        assert LAYERS.index(room) >= level, (
            f"{path.relative_to(PACKAGE)} line {line}: {importer} imports {module}, a room above it")


def test_no_import_circle_between_modules():
    """Module-level imports between modules form no circle (a circle is what made
    generation and prefill import each other)."""
    graph = {}
    for path in MODULES:
        graph[_module_name(path)] = {m for m, _, top in _imports(path) if top}
    state: dict[str, int] = {}

    def visit(module, stack):
        state[module] = 1
        for target in graph.get(module, ()):
            if state.get(target) == 1:
                raise AssertionError(" -> ".join(stack[stack.index(target):] + [target])
                                     if target in stack else f"{module} -> {target}")
            if target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_checks_catch_an_upward_import(tmp_path):
    """The rule above is not vacuous: an upward import in a module is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rrhf_lite.pipeline.run import run_recipe\n")
    ((module, line, top),) = _imports(bad)
    assert (module, line, top) == ("rrhf_lite.pipeline.run", 2, False)
    assert LAYERS.index(_room(module)) < LAYERS.index("training")


# the public API before the move into rooms: every name still comes from `import rrhf_lite`
PUBLIC_NAMES = ["RRHFConfig", "RRHFTrainer", "UserInputError", "rank_loss", "rrhf_loss", "sft_loss"]


def test_public_api_names_and_a_light_import():
    import subprocess
    import sys

    code = ("import sys, rrhf_lite; heavy = [m for m in ('torch', 'transformers', 'peft') "
            "if m in sys.modules]; print(heavy); "
            f"print(all(callable(getattr(rrhf_lite, n)) for n in {PUBLIC_NAMES!r})); "
            "print(set(rrhf_lite.__all__) >= set(" + repr(PUBLIC_NAMES) + "))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, resolved, exported = out.stdout.splitlines()
    assert heavy == "[]", f"`import rrhf_lite` loads {heavy}: keep heavy imports lazy"
    assert resolved == "True"
    assert exported == "True", "a public name left __all__"
