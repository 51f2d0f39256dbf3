"""The public surface: one sorted ``__all__``, documented names, no private optax."""

import ast
import inspect
import pathlib
import re

import optax_warmup as ow

PACKAGE = pathlib.Path(ow.__file__).parent


def test_all_is_sorted_and_resolves():
    names = [name for name in ow.__all__ if name != "__version__"]
    assert names == sorted(names)
    assert len(set(ow.__all__)) == len(ow.__all__)
    for name in ow.__all__:
        assert hasattr(ow, name), name


def test_every_public_name_is_documented():
    for name in ow.__all__:
        if name == "__version__":
            continue
        obj = getattr(ow, name)
        doc = inspect.getdoc(obj)
        assert doc and len(doc.splitlines()[0]) > 10, f"{name} has no docstring"
        if inspect.isfunction(obj):
            assert "Example" in doc, f"{name}'s docstring has no runnable example"
            assert "Args:" in doc or not inspect.signature(obj).parameters, name


def test_version_is_a_string():
    assert isinstance(ow.__version__, str) and ow.__version__.count(".") == 2


def test_no_private_optax_imports():
    for path in PACKAGE.glob("*.py"):
        assert "optax._src" not in path.read_text(), path.name


def test_chex_is_for_tests_only():
    # pyproject.toml, read without tomllib (Python >= 3.11): the two lists.
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    lists = dict(re.findall(r"(?ms)^(dependencies|test) = \[$(.*?)^\]", text))
    runtime = re.findall(r'"([\w-]+)', lists["dependencies"])
    assert runtime and "chex" not in runtime
    assert "chex" in re.findall(r'"([\w-]+)', lists["test"])
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert "chex" not in imported, path
