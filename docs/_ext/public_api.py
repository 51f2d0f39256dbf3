"""The public API of optax_warmup, grouped for its reference page.

Pure Python (no Sphinx): ``api_reference`` turns these sections into the page, and
``tests/test_docs.py`` checks them. Every name in ``optax_warmup.__all__`` and in the
``__all__`` of each public submodule it lists (``models``) lands in exactly one
section. Names defined in the same private module form one section, in the order of
``SECTIONS``; a module that is not listed there gets a section titled after its name,
so a new public name or module is documented without editing the page.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
from typing import Any

PACKAGE = "optax_warmup"

# Private module -> (section title, guide page that explains it, or None).
SECTIONS: dict[str, tuple[str, str | None]] = {
    "_schedules": ("Schedules", "guides/schedules"),
    "_recipes": ("Optimizers", "guides/recipes"),
    "_weight_decay": ("Weight decay", "guides/weight_decay"),
    "_transforms": ("Transformations", "guides/warmup_transform"),
    "_losses": ("Losses", "guides/label_smoothing"),
    "_initializers": ("Initializers", "guides/models"),
    "_plateau": ("Reduce on plateau", None),
    "_noise_scale": ("Gradient noise scale", "guides/noise_scale"),
    "_batch_schedules": ("Batch-size schedules", "guides/growing_batch"),
    "_accumulation": ("Gradient accumulation", "guides/growing_batch"),
    "_batch_rates": ("Rates that follow the batch", "guides/growing_batch"),
    "_adascale": ("AdaScale", "guides/growing_batch"),
}
# Public submodule (a name in ``__all__``) -> its guide page.
SUBMODULE_GUIDES: dict[str, str] = {"models": "guides/models"}


@dataclasses.dataclass
class Entry:
    """One public name: where users reach it, and which autodoc directive shows it."""

    name: str  # the public dotted name, e.g. "optax_warmup.goyal_sgd"
    kind: str  # "function", "class" or "data"
    obj: Any

    @property
    def has_docstring(self) -> bool:
        doc = getattr(self.obj, "__doc__", None)
        if not doc or not doc.strip():
            return False
        # An instance (a functools.partial, a constant) whose only docstring is its
        # type's has none of its own.
        plain = not (inspect.isclass(self.obj) or inspect.isroutine(self.obj))
        return not (plain and doc is type(self.obj).__doc__)


@dataclasses.dataclass
class Section:
    title: str
    summary: str  # the first line of the defining module's docstring
    guide: str | None
    module: str | None  # a public module documented as such (its py:module target)
    entries: list[Entry]


def _kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


def _summary(module: types.ModuleType) -> str:
    doc = inspect.getdoc(module) or ""
    return doc.splitlines()[0] if doc else ""


def _title_from_module(short: str) -> str:
    return short.strip("_").replace("_", " ").capitalize()


def public_names(package: str = PACKAGE) -> list[str]:
    """Every public dotted name: the package's ``__all__`` and its submodules'."""
    root = importlib.import_module(package)
    names = []
    for name in root.__all__:
        obj = getattr(root, name)
        if isinstance(obj, types.ModuleType):
            names += [f"{package}.{name}.{sub}" for sub in obj.__all__]
        else:
            names.append(f"{package}.{name}")
    return names


def sections(package: str = PACKAGE) -> list[Section]:
    """The reference page's sections, their names in ``__all__`` order."""
    root = importlib.import_module(package)
    grouped: dict[str, list[Entry]] = {}
    submodules: list[Section] = []
    package_entries: list[Entry] = []
    for name in root.__all__:
        obj = getattr(root, name)
        if isinstance(obj, types.ModuleType):
            entries = [
                Entry(
                    f"{obj.__name__}.{sub}", _kind(getattr(obj, sub)), getattr(obj, sub)
                )
                for sub in obj.__all__
            ]
            title = f"{name.capitalize()} (``{obj.__name__}``)"
            guide = SUBMODULE_GUIDES.get(name)
            submodules.append(
                Section(title, _summary(obj), guide, obj.__name__, entries)
            )
            continue
        entry = Entry(f"{package}.{name}", _kind(obj), obj)
        home = getattr(obj, "__module__", None) if entry.kind != "data" else None
        if not home or not home.startswith(f"{package}._"):
            package_entries.append(entry)
            continue
        grouped.setdefault(home.rsplit(".", 1)[-1], []).append(entry)
    order = [m for m in SECTIONS if m in grouped] + sorted(set(grouped) - set(SECTIONS))
    result = []
    for short in order:
        title, guide = SECTIONS.get(short, (_title_from_module(short), None))
        module = importlib.import_module(f"{package}.{short}")
        result.append(Section(title, _summary(module), guide, None, grouped[short]))
    result += submodules
    if package_entries:
        result.append(Section("Package", "", None, None, package_entries))
    return result
