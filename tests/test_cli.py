"""The command line: help, version, import cost, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from llmkit import __version__
from tests.conftest import run_python


def test_help_lists_commands(cli):
    result = cli("--help")
    assert result.code == 0
    for command in ("init", "inspect", "quantize"):
        assert command in result.out


def test_version(cli):
    result = cli("--version")
    assert result.code == 0
    assert result.out.strip() == f"llmkit {__version__}"


def test_cli_import_does_not_import_torch():
    # The issue's own measure: `-X importtime` lists every module the import pulls in.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import llmkit.cli.app"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert "llmkit" in imported
    assert not imported & {"torch", "transformers", "safetensors", "numpy"}


def test_help_and_version_work_when_torch_cannot_import():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from llmkit.cli.app import main\n"
        "for args in (['--help'], ['--version'], ['quantize', '--help']):\n"
        "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, e\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr


def test_usage_error_exits_2(cli, tmp_path):
    result = cli("init", tmp_path / "x", "--preset", "no-such-preset")
    assert result.code == 2
    assert not (tmp_path / "x").exists()


def test_missing_path_is_one_line_error(cli, tmp_path):
    result = cli("inspect", tmp_path / "missing")
    assert result.code == 1
    assert result.err.startswith("error: ")
    assert len(result.err.strip().splitlines()) == 1
    assert "Traceback" not in result.err


def test_directory_without_config_is_one_line_error(cli, tmp_path):
    result = cli("inspect", tmp_path)
    assert result.code == 1
    assert "no config.json" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_verbose_shows_traceback(cli, tmp_path):
    result = cli("--verbose", "inspect", tmp_path / "missing")
    assert result.code == 1
    assert "Traceback" in result.err
    assert result.err.strip().splitlines()[-1].startswith("error: ")


def test_offline_hub_id_names_the_id():
    code = "from llmkit.cli.app import main; main(['inspect', 'some-org/some-model'])"
    proc = run_python(code, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "some-org/some-model" in lines[0]
    assert lines[0].startswith("error: ")


def test_init_json_report(cli, tmp_path):
    result = cli("init", tmp_path / "m", "--preset", "tiny-llama", "--seed", "3", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["preset"] == "tiny-llama"
    assert report["seed"] == 3
    assert (tmp_path / "m" / "model.safetensors").is_file()
