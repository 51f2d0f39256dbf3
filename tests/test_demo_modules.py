"""The shape of the demo's code: every module imports, no two import each other
(even inside a function), and an experiment is its own module over shared ones,
so a new experiment is that module and a line in the command line's registry."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = "optax_warmup.demo"
DEMO = Path(__file__).resolve().parents[1] / "optax_warmup" / "demo"
MODULES = sorted(p.stem for p in DEMO.glob("*.py"))


def _imports(module: str) -> set[str]:
    """The demo modules that ``module`` imports anywhere in its source (at the top,
    in a function or under ``TYPE_CHECKING``), by their short names."""
    tree = ast.parse((DEMO / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .x import y
                base = PACKAGE if node.level == 1 else ""
                parent = ".".join(filter(None, [base, node.module]))
            else:
                parent = node.module or ""
            names = [parent] + [f"{parent}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                short = name[len(PACKAGE) + 1 :].split(".")[0]
                if short in MODULES and short != module:
                    found.add(short)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}  # "open" while on the path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_walker_sees_every_form_of_import():
    assert GRAPH["__main__"] >= {"warmup", "batch_size", "store", "experiment"}
    assert "distributed" in GRAPH["training"]  # imported inside a function


@pytest.mark.parametrize("module", MODULES)
def test_every_demo_module_imports(module):
    importlib.import_module(f"{PACKAGE}.{module}")


def test_no_demo_modules_import_each_other():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_an_experiment_is_its_module_over_shared_ones():
    from optax_warmup.demo.__main__ import EXPERIMENTS

    experiments = {
        e.train_run.__module__.rsplit(".", 1)[1] for e in EXPERIMENTS.values()
    }
    assert {"warmup", "batch_size"} <= experiments <= set(MODULES)
    for name, experiment in EXPERIMENTS.items():
        module = importlib.import_module(experiment.train_run.__module__)
        assert module.EXPERIMENT is experiment, name
        parts = (experiment.settings, experiment.check, experiment.summarize)
        parts += (experiment.table, experiment.notes, experiment.figures)
        assert {part.__module__ for part in parts} == {module.__name__}, name
    for module, imported in GRAPH.items():
        if module == "__main__":  # the registry
            continue
        others = imported & (experiments - {module})
        assert not others, f"{module} imports the experiment(s) {sorted(others)}"
