"""The documentation pages: their code runs, their links resolve, their copies match.

The rules that the Markdown pages under docs/ (and, for links and copies, README.md,
CHANGELOG.md and CONTRIBUTING.md) follow:

- Every ```python block of a page runs: the blocks of one page in order, in one
  namespace, as a reader would paste them.
- A block whose opening fence is preceded by the line ``<!-- skip-test -->`` is not
  run (launch lines, a block that needs a GPU or a cluster).
- A ```text block preceded by ``<!-- expected-output -->`` is what the Python block
  just before it prints.
- The lines after ``<!-- copy-of: PATH -->``, up to the next blank line (a table),
  appear verbatim in PATH (relative to the page): a copy of a generated file, such as
  the demo's table or the benchmarks' results, that cannot drift from it.
- Every relative link and image names an existing file, and a ``#anchor`` a heading of
  the target page (GitHub's slugs, which the Sphinx build uses too).

The Sphinx build (``.ci/run``) checks the cross-references; here the API reference is
checked to cover every public name with a docstring, without needing Sphinx.
"""

import contextlib
import dataclasses
import io
import json
import pathlib
import re
import sys

import pytest

import optax_warmup

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
import public_api  # noqa: E402  (docs/_ext, plain Python)

SKIP = "<!-- skip-test -->"
OUTPUT = "<!-- expected-output -->"
COPY = re.compile(r"^<!-- copy-of: (\S+) -->$")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^\s`]*)")


def _pages() -> list[pathlib.Path]:
    skip = {"_build", "_ext", "demo"}
    return sorted(
        p for p in DOCS.rglob("*.md") if not skip & set(p.relative_to(DOCS).parts[:-1])
    )


PAGES = _pages()
LINKED = [
    *PAGES,
    *(ROOT / name for name in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md")),
]


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int  # the 1-based line of the code's first line
    marker: str  # the non-blank line before the opening fence, or ""


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with the line before each fence."""
    result, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.groups()
        marker = lines[i - 1].strip() if i else ""
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        result.append(Block(lang, "\n".join(lines[i + 1 : end]) + "\n", i + 2, marker))
        i = end + 1
    return result


def _prose(text: str, code_spans: bool = False) -> str:
    """The text without its fenced blocks (and inline code spans, unless asked)."""
    kept, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.startswith(fence):
            fence = None
        elif fence is None:
            kept.append(line if code_spans else re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def github_slug(title: str) -> str:
    """GitHub's heading anchor (myst's "github" preset) of a Markdown heading."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link: its text
    title = re.sub(r"[`*]", "", title)
    return re.sub(r"[^\w\u4e00-\u9fff\- ]", "", title.strip().lower().replace(" ", "-"))


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors of a page's headings of levels 1 to 3 (``myst_heading_anchors``)."""
    seen: dict[str, int] = {}
    text = _prose(path.read_text(), code_spans=True)
    if path == DOCS / "api.md":  # its sections are generated from __all__
        text += "".join(f"\n## {section.title}" for section in public_api.sections())
    for line in text.splitlines():
        match = re.match(r"^#{1,3}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def links(path: pathlib.Path) -> list[str]:
    targets = re.findall(
        r"\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)", _prose(path.read_text())
    )
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def _page_id(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


RUNNABLE = [
    page
    for page in PAGES
    if any(b.lang == "python" and b.marker != SKIP for b in blocks(page.read_text()))
]


# Pages whose code compiles several models' train steps (over 5 s each on two cores).
SLOW_PAGES = {
    "docs/getting_started.md",
    "docs/guides/models.md",
    "docs/guides/noise_scale.md",
    "docs/guides/recipes.md",
    "docs/guides/weight_decay.md",
}


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=pytest.mark.slow) if _page_id(p) in SLOW_PAGES else p
        for p in RUNNABLE
    ],
    ids=_page_id,
)
def test_page_code_runs(page):
    namespace: dict = {"__name__": f"docs:{page.stem}"}
    page_blocks = blocks(page.read_text())
    for i, block in enumerate(page_blocks):
        if block.lang != "python" or block.marker == SKIP:
            continue
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, namespace)
        following = page_blocks[i + 1] if i + 1 < len(page_blocks) else None
        if following is not None and following.marker == OUTPUT:
            printed = [line.rstrip() for line in out.getvalue().rstrip().splitlines()]
            expected = [line.rstrip() for line in following.code.rstrip().splitlines()]
            assert printed == expected, f"{page}:{following.line}: output differs"


def test_markers_are_well_placed():
    for page in PAGES:
        page_blocks = blocks(page.read_text())
        for i, block in enumerate(page_blocks):
            where = f"{page}:{block.line - 1}"
            if block.marker == SKIP:
                assert block.lang == "python", (
                    f"{where}: skip-test before a non-Python block"
                )
            if block.marker == OUTPUT:
                previous = page_blocks[i - 1] if i else None
                assert previous is not None and previous.lang == "python", (
                    f"{where}: expected-output must follow a Python block"
                )
                assert previous.marker != SKIP, f"{where}: output of a skipped block"


@pytest.mark.parametrize("page", LINKED, ids=_page_id)
def test_relative_links_resolve(page):
    for target in links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        assert resolved.exists(), f"{page}: link to a missing file: {target}"
        if anchor:
            assert resolved.suffix == ".md", f"{page}: anchor into a non-page: {target}"
            assert anchor in anchors(resolved), f"{page}: no heading for {target}"


COPIES = [
    (page, match.group(1), lineno)
    for page in LINKED
    for lineno, line in enumerate(page.read_text().splitlines(), 1)
    for match in [COPY.match(line.strip())]
    if match
]


@pytest.mark.parametrize(
    "page, source, lineno", COPIES, ids=[f"{_page_id(p)}:{n}" for p, _, n in COPIES]
)
def test_copies_match_their_source(page, source, lineno):
    lines = page.read_text().splitlines()[lineno:]
    copy = []
    for line in lines:
        if not line.strip():
            break
        copy.append(line.rstrip())
    assert copy, f"{page}:{lineno}: nothing after the copy-of marker"
    original = [
        line.rstrip() for line in (page.parent / source).read_text().splitlines()
    ]
    found = any(
        original[i : i + len(copy)] == copy
        for i in range(len(original) - len(copy) + 1)
    )
    assert found, f"{page}:{lineno}: the lines differ from {source}: copy it again"


def test_readme_links_into_the_docs():
    readme_links = links(ROOT / "README.md")
    assert any(target.startswith("docs/") for target in readme_links)


def test_api_reference_covers_every_public_name():
    documented = [entry.name for s in public_api.sections() for entry in s.entries]
    assert len(documented) == len(set(documented)), "a name in two sections"
    expected = {f"optax_warmup.{name}" for name in optax_warmup.__all__}
    expected.discard("optax_warmup.models")
    expected |= {f"optax_warmup.models.{name}" for name in optax_warmup.models.__all__}
    assert set(documented) == expected
    assert set(public_api.public_names()) == expected
    assert "<!-- public-api -->" in (DOCS / "api.md").read_text()


def test_every_public_name_has_a_docstring():
    missing = [
        entry.name
        for section in public_api.sections()
        for entry in section.entries
        if entry.kind != "data" and not entry.has_docstring
    ]
    assert not missing, f"no docstring of their own: {missing}"


def test_guides_of_the_api_sections_exist():
    for section in public_api.sections():
        if section.guide:
            assert (DOCS / f"{section.guide}.md").exists(), section.guide


def test_every_page_is_in_the_toctree():
    index = (DOCS / "index.md").read_text()
    entries = set()
    for block in blocks(index):
        if block.lang == "{toctree}":
            entries |= {
                line.strip()
                for line in block.code.splitlines()
                if line.strip() and not line.startswith(":")
            }
    pages = {str(p.relative_to(DOCS).with_suffix("")) for p in PAGES} - {"index"}
    assert pages == entries


def test_github_slug():
    assert github_slug("Sweeps with `jax.vmap`") == "sweeps-with-jaxvmap"
    assert github_slug("goyal_sgd_step") == "goyal_sgd_step"
    assert github_slug("Warmup as a transformation, and `current_lr`") == (
        "warmup-as-a-transformation-and-current_lr"
    )


def test_parser_sees_markers():
    text = "a\n<!-- skip-test -->\n```python\nx = 1\n```\n\n````text\n```\n````\n"
    parsed = blocks(text)
    assert [(b.lang, b.marker, b.line) for b in parsed] == [
        ("python", SKIP, 4),
        ("text", "", 8),
    ]
    assert parsed[1].code == "```\n"


def test_experiment_page_per_seed_numbers_are_the_results():
    page = (DOCS / "experiments" / "warmup.md").read_text()
    line = next(
        x for x in page.split("\n\n") if x.startswith("Per seed (test error %):")
    )
    summary = json.loads((DOCS / "demo" / "results.json").read_text())["summary"]
    found = re.findall(r"(\w[\w ]*?) ([\d.]+(?:, [\d.]+)*)[;.]", line)
    assert {label.replace(" ", "_") for label, _ in found} == set(summary)
    for label, numbers in found:
        errors = summary[label.replace(" ", "_")]["test_errors"]
        assert numbers == ", ".join(f"{100 * e:.2f}" for e in errors), label
