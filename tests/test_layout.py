"""The floor plan (README "Layout") is kept: import-linter's contracts hold, the import graph of
the package has no cycle, and every command answers ``--help``."""
from __future__ import annotations

import contextlib
import importlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["search", "train", "infer", "calibrate", "export", "evaluate", "profile", "latency", "random_baseline",
            "data.synthetic", "pnfs.search", "pnfs.train", "pnfs.infer", "pnfs.profile", "pnfs.pckh"]

grimp = pytest.importorskip("grimp", reason="the import-linter package ([dev] extra) is not installed")


def import_graph():
    """grimp's graph of threempose and the kernels folder: files as nodes, every import statement
    (module level and inside functions) as an edge."""
    sys.path.insert(0, str(ROOT))       # kernels/ is read under its folder name (pyproject's note)
    try:
        return grimp.build_graph("threempose", "kernels", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def strongly_connected(graph) -> list[set[str]]:
    """Tarjan's strongly connected components of more than one module (the import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_import_contracts_are_kept():
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                             "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "threempose.nas.fabric" in graph.modules and "kernels.backend" in graph.modules
    assert strongly_connected(graph) == []


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a hand-made graph with one cycle of three modules and a tail."""
    graph = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")]:
        graph.add_import(importer=a, imported=b)
    assert strongly_connected(graph) == [{"p.a", "p.b", "p.c"}]


def test_every_command_answers_help():
    for name in COMMANDS:
        module = importlib.import_module(f"threempose.{name}")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0, name
        assert "usage:" in out.getvalue(), name


def test_search_runs_as_a_script():
    """``python threempose/search.py`` / ``deepspeed threempose/search.py``: the file, not the module."""
    result = subprocess.run([sys.executable, str(ROOT / "threempose" / "search.py"), "--help"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_public_predictor_path():
    from threempose.inference.predictor import Predictor
    from threempose.predictor import Predictor as public

    assert public is Predictor
