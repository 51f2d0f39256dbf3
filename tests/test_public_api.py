"""The public surface: one sorted ``__all__``, documented names, no private optax."""

import inspect
import pathlib

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
