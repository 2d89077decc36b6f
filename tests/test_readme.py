"""README's setup, main-job and test commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_command(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {section}\n.*?```bash\n(.*?)\n```", text, re.S | re.M)
    assert match, f"README has no bash block under '## {section}'"
    return match.group(1).strip()


@pytest.mark.parametrize("section", ["Set up", "Run", "Test"])
def test_ci_runs_the_readme_commands(section):
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_command(section) in ci
