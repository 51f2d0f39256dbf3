"""Sphinx extension: the API reference, generated from ``__all__``.

The page ``api.md`` holds the line ``<!-- public-api -->``; when Sphinx reads the page,
the line is replaced by one section per group of ``public_api.sections``: an
``autosummary`` table, then the ``autofunction``/``autoclass``/``autodata`` entry of
each name, from its docstring (Google style, read by napoleon). A new public name
appears without editing any page. The build warns (an error under ``-W``) when a
public name has no docstring of its own, and, once every page is read, when a public
name has no entry in the Python domain.
"""

from __future__ import annotations

import public_api
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

logger = logging.getLogger(__name__)

API_PAGE = "api"
MARKER = "<!-- public-api -->"
# Data entries that no source comment documents.
_DATA_DOCS = {f"{public_api.PACKAGE}.__version__": "The package version, a string."}


def _data_documented(name: str) -> bool:
    if name in _DATA_DOCS:
        return True
    module, attr = name.rsplit(".", 1)
    try:
        docs = ModuleAnalyzer.for_module(module).find_attr_docs()
    except Exception:  # no source to read: no documentation either
        return False
    return ("", attr) in docs


def _entry(entry: public_api.Entry, module: str) -> list[str]:
    short = entry.name.removeprefix(module + ".")
    if entry.kind == "data":
        if not _data_documented(entry.name):
            logger.warning(
                "public name %s has no documentation (add a '#:' comment above it)",
                entry.name,
                location=API_PAGE,
            )
        if entry.name in _DATA_DOCS:
            return [
                f".. py:data:: {short}",
                f"   :value: {entry.obj!r}",
                "",
                f"   {_DATA_DOCS[entry.name]}",
                "",
            ]
        return [f".. autodata:: {short}", ""]
    if not entry.has_docstring:
        logger.warning(
            "public name %s has no docstring of its own", entry.name, location=API_PAGE
        )
    return [f".. auto{entry.kind}:: {short}", ""]


def generate() -> str:
    """The Markdown of the reference: one section per group of public names.

    Each section is a Markdown heading and an ``eval-rst`` block (autodoc's
    directives need reStructuredText).
    """
    lines: list[str] = []
    for section in public_api.sections():
        lines += [f"## {section.title}", ""]
        intro = section.summary
        if section.guide:
            intro += f" Guide: {{doc}}`/{section.guide}`."
        if intro.strip():
            lines += [intro.strip(), ""]
        module = section.module or public_api.PACKAGE
        lines += ["```{eval-rst}"]
        if section.module:
            lines += [f".. py:module:: {section.module}", ""]
        lines += [f".. currentmodule:: {module}", "", ".. autosummary::", ""]
        lines += [
            "   " + entry.name.removeprefix(module + ".") for entry in section.entries
        ]
        lines += [""]
        for entry in section.entries:
            lines += _entry(entry, module)
        lines += ["```", ""]
    return "\n".join(lines)


def _fill_api_page(app: Sphinx, docname: str, source: list[str]) -> None:
    if docname != API_PAGE:
        return
    if MARKER not in source[0]:
        logger.warning("%s.md lacks the line %s", API_PAGE, MARKER, location=API_PAGE)
        return
    source[0] = source[0].replace(MARKER, generate())


def _check_every_name_documented(app: Sphinx, env) -> None:
    objects = env.get_domain("py").objects
    for name in public_api.public_names():
        if name not in objects:
            logger.warning(
                "public name %s is missing from the API reference",
                name,
                location=API_PAGE,
            )


def setup(app: Sphinx) -> dict:
    app.connect("source-read", _fill_api_page)
    app.connect("env-check-consistency", _check_every_name_documented)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
