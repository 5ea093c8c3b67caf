"""The house rules of ``src/bksdm`` (issue 12), checked on the source: every module at most 450 lines, no import
cycle (function-level imports included), no ``argparse.Namespace`` below ``cli/``, no library module importing a
``bksdm.cli`` module, and ``python -m bksdm.cli`` still the entry point that ``accelerate launch`` runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "bksdm").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The bksdm modules ``path`` imports anywhere in its body."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bksdm"):
            targets.update(t for t in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if t in known)
        elif isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name in known)
    return targets


def test_no_module_is_over_450_lines() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert len(sizes) > 80  # the walk found the package
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_no_import_cycle() -> None:
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    assert graph["bksdm.train.distill"] >= {"bksdm.train.runtime", "bksdm.train.kd"}  # the walk sees imports
    state: dict[str, int] = {}

    def cycle_from(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if not state.get(nxt) and (found := cycle_from(nxt, stack)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for name in sorted(graph):
        if not state.get(name):
            assert cycle_from(name, []) is None


def test_the_library_takes_typed_arguments_and_never_imports_the_cli() -> None:
    known = modules()
    library = {name: path for name, path in known.items() if not name.startswith("bksdm.cli")}
    namespace = [name for name, path in library.items() if "Namespace" in path.read_text(encoding="utf-8")]
    assert namespace == []
    assert {name: sorted(t for t in imports(path, known) if t.startswith("bksdm.cli")) for name, path in library.items()
            if any(t.startswith("bksdm.cli") for t in imports(path, known))} == {}  # fmt: skip


@pytest.mark.parametrize("entry", [["-m", "bksdm.cli"], ["-c", "from bksdm.cli import main; main()"]])
def test_the_cli_entry_points(entry: list[str]) -> None:
    done = subprocess.run([sys.executable, *entry, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("bksdm "), done.stderr
