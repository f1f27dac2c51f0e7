"""The test kit as a user meets it: the README's example, pasted into a fresh test file and run
by pytest in a subprocess, with the plugin found through its ``pytest11`` entry point."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_testing_example_runs_as_pasted(pytester: pytest.Pytester) -> None:
    section = README.read_text().split("## Testing your application", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example is not None
    assert len(example.group(1).strip().splitlines()) <= 12
    pytester.makepyfile(test_pasted=example.group(1))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
