"""README's quickstart commands are the ones CI runs, and each is a Makefile target."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Quickstart\n.*?```bash\n(.*?)\n```", text, re.S | re.M)
    assert match, "README has no bash block under '## Quickstart'"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines()]


def test_ci_runs_exactly_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = quickstart_commands()
    assert commands == ["make demo", "make test"]
    assert [line for line in ci if line.startswith("make ")] == commands


def test_each_command_is_a_makefile_target_that_sets_up_first():
    makefile = (ROOT / "Makefile").read_text()
    for command in quickstart_commands():
        target = command.split()[1]
        rule = re.search(rf"^{target}: (.*)$", makefile, re.M)
        assert rule and "$(VENV)/installed" in rule.group(1), f"{target} does not set up first"
    assert "pip install torch==2.13.0" in makefile  # pinned before the project
