"""The README's Python examples run as written (each section in its own namespace)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
SECTIONS = re.findall(
    r"<!-- section: ([\w-]+) -->(.*?)<!-- /section: \1 -->", TEXT, re.S
)


@pytest.mark.parametrize(
    "body", [body for _, body in SECTIONS], ids=[name for name, _ in SECTIONS]
)
def test_readme_examples_run(body):
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert blocks, "a section without Python"
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_has_a_runnable_section():
    assert SECTIONS


def test_readme_is_short():
    # What a newcomer reads in two minutes; the rest lives in docs/.
    assert len(TEXT.splitlines()) <= 150
