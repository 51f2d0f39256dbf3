"""Citations of Goyal et al. 2017 (arXiv:1706.02677) that were once wrong stay right.

Checked against the paper: the warmup comparison (no, constant and gradual warmup at
kn = 8k) is its Table 1 (section 5.2), while Table 2a compares learning-rate rules; the
momentum correction is section 3 ("Subtleties and Pitfalls of Distributed SGD"),
remark 2, while section 2.3 is BatchNorm. These tests read every text file of the
repository (code, docs, the demo's stored results, benchmarks, tests) and fail where
"Table 2a" is written next to "warmup" (or anywhere in a file named after the warmup),
or "section 2.3" next to "momentum".
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".json", ".toml", ".txt", ".rst", ".cfg", ".yml", ".yaml"}
SKIP_DIRS = {"_build", "__pycache__", ".git", ".venv", "build", "dist"}
WINDOW = 250  # characters either side of a match: "next to"

TABLE_2A = re.compile(r"table[\s_]*2\s*\(?a\)?(?![a-z0-9])", re.I)
SECTION_2_3 = re.compile(r"(?:§|\bsec(?:tion)?s?\.?)\s*2\.3(?!\d)", re.I)


def _text_files() -> list[pathlib.Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "pyproject.toml"]
    for top in ("optax_warmup", "docs", "benchmarks", "tests", ".ci"):
        for path in (ROOT / top).rglob("*"):
            rel = path.relative_to(ROOT)
            if SKIP_DIRS & set(rel.parts) or not path.is_file():
                continue
            if path.suffix in SUFFIXES or (top == ".ci" and not path.suffix):
                files.append(path)
    this = pathlib.Path(__file__).resolve()
    return sorted(p for p in files if p.exists() and p.resolve() != this)


FILES = _text_files()


def near(
    pattern: re.Pattern[str], word: str, text: str, everywhere: bool = False
) -> list[int]:
    """1-based lines where ``pattern`` matches within WINDOW characters of ``word``.

    With ``everywhere``, every match counts (a file that is about ``word``).
    """
    lines = []
    for match in pattern.finditer(text):
        lo, hi = max(0, match.start() - WINDOW), match.end() + WINDOW
        if everywhere or word in text[lo:hi].lower():
            lines.append(text.count("\n", 0, match.start()) + 1)
    return lines


def test_the_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    for name in (
        "README.md",
        "optax_warmup/_recipes.py",
        "optax_warmup/demo/warmup.py",
        "docs/experiments/warmup.md",
    ):
        assert name in names


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Goyal's warmup comparison (Table 2a)", True),
        ('"goyal_2017_table_2a": {"no warmup (kn=8k)": "24.84"}', True),
        ("the warmup comparison of Goyal et al. (their Table 1)", False),
        ("Table 2a compares learning-rate rules.", False),  # no warmup in sight
    ],
)
def test_the_table_check_finds_what_it_should(text, found):
    assert bool(near(TABLE_2A, "warmup", text)) is found


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Goyal et al.'s section 2.3 prescribe the momentum correction", True),
        ("the momentum correction (Goyal et al. §2.3)", True),
        ("momentum as in Goyal et al., Sec. 2.3", True),
        ("the momentum correction of their section 3, remark 2", False),
        ('BatchNorm per worker (Sec. 2.3, "Batch Normalization")', False),
        ("momentum, section 2.31 of another paper", False),
    ],
)
def test_the_section_check_finds_what_it_should(text, found):
    assert bool(near(SECTION_2_3, "momentum", text)) is found


def offenders(pattern: re.Pattern[str], word: str, by_name: bool = False) -> list[str]:
    """``path:line`` of each match next to ``word`` (anywhere in a file named so)."""
    found = []
    for path in FILES:
        text = path.read_text("utf-8", errors="replace")
        everywhere = by_name and word in path.name
        found += [
            f"{path.relative_to(ROOT)}:{n}"
            for n in near(pattern, word, text, everywhere)
        ]
    return found


def test_the_warmup_comparison_is_table_1():
    found = offenders(TABLE_2A, "warmup", by_name=True)
    assert not found, (
        f"{found}: Goyal et al.'s warmup comparison is their Table 1 (section 5.2); "
        "Table 2a compares learning-rate rules"
    )


def test_momentum_correction_is_section_3():
    found = offenders(SECTION_2_3, "momentum")
    assert not found, (
        f"{found}: Goyal et al.'s momentum correction is section 3, remark 2 (eq. (9) "
        "is optax's form, eq. (10) the one that needs the correction); section 2.3 is "
        "BatchNorm"
    )
