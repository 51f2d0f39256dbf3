"""Sphinx configuration of the optax_warmup documentation.

Build: ``pip install -e ".[docs]" && python -m sphinx -b html docs docs/_build/html``.
CI builds with ``-W --keep-going`` (every warning is an error).
"""

import functools
import pathlib
import re
import sys

from sphinx.util.inspect import signature as sphinx_signature
from sphinx.util.inspect import stringify_signature

import optax_warmup

sys.path.insert(0, str(pathlib.Path(__file__).parent / "_ext"))

project = "optax_warmup"
author = "the optax_warmup authors"
copyright = "the optax_warmup authors"
release = version = optax_warmup.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "api_reference",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
# docs/demo/ holds the demo's output files (its table is included, not a page).
exclude_patterns = ["_build", "_ext", "demo"]

# A cross-reference to a name of ours that does not exist is an error. Types from other
# packages in the signatures (jax.Array, optax.Schedule, ...) stay plain text: the build
# is offline, with no intersphinx inventories to link them to.
nitpicky = True
nitpick_ignore_regex = [("py:class", r"(?!optax_warmup\.).*")]

# MyST: GitHub-style heading anchors, so that `page.md#a-heading` links work both on
# GitHub and here (and a broken one is a warning).
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
myst_heading_slug_func = "github"

# Our docstrings are Google style (Args:, Returns:, Raises:, Example:, References:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
# Keep the aliases of the signatures as written, not expanded into long unions.
autodoc_type_aliases = {
    name: name
    for name in (
        "ArrayLike",
        "DTypeLike",
        "Initializer",
        "MaskOrFn",
        "optax.Params",
        "optax.ScalarOrSchedule",
        "optax.Schedule",
        "optax.Updates",
    )
}
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autosummary_generate = False
add_module_names = False


def _readable_signature(app, what, name, obj, options, signature, return_annotation):
    """Fixes two autodoc renderings of our signatures.

    - A union with an aliased type shows as ``TypeAliasForwardRef('X') | None``;
      written back as ``X | None``.
    - An ``nnx.Module`` subclass shows its metaclass' ``(*args, **kwargs)``; the
      signature of its ``__init__`` is the one users call.
    """
    if what == "class" and signature == "(*args: Any, **kwargs: Any)":
        init = sphinx_signature(
            obj.__init__,
            bound_method=True,
            type_aliases=app.config.autodoc_type_aliases,
        )
        signature = stringify_signature(
            init, show_return_annotation=False, unqualified_typehints=True
        )
        signature = re.sub(r"~(?:\w+\.)*(\w+)", r"\1", signature)  # ~a.b.C -> C
    fix = functools.partial(re.sub, r"TypeAliasForwardRef\('([^']*)'\)", r"\1")
    if signature:
        signature = fix(signature)
    if return_annotation:
        return_annotation = fix(return_annotation)
    return signature, return_annotation


def setup(app):
    app.connect("autodoc-process-signature", _readable_signature)


html_theme = "furo"
html_title = f"optax_warmup {release}"
html_static_path: list[str] = []
