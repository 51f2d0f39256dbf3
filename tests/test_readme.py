"""The README's Python examples run as written (each section in its own namespace)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = re.findall(
    r"<!-- section: ([\w-]+) -->(.*?)<!-- /section: \1 -->", README.read_text(), re.S
)


@pytest.mark.parametrize(
    "body", [body for _, body in SECTIONS], ids=[name for name, _ in SECTIONS]
)
def test_readme_examples_run(body):
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", body, re.S):
        exec(compile(block, str(README), "exec"), namespace)
