"""Run GPTQModel scripts one after another in one process, for the interop tests: importing
GPTQModel takes seconds, which each script would pay again in a process of its own.

Runs inside the gptqmodel venv, never inside llmkit's. Imports GPTQModel first, then reads
one JSON request a line from stdin, {"cwd": FOLDER, "argv": [SCRIPT, *ARGS]}: runs SCRIPT as
__main__ with those arguments in FOLDER and answers with one JSON line, {"error": null} or
{"error": "the traceback's end"}. Everything the scripts and GPTQModel print goes to stderr,
so nothing can mix with the answers.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback


def run(request: dict) -> str | None:
    os.chdir(request["cwd"])
    sys.argv = list(request["argv"])
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as done:
        if done.code not in (None, 0):
            return f"{sys.argv[0]} exited with {done.code}"
    except Exception:
        return traceback.format_exc()[-3000:]
    return None


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # prints, and handlers that kept the first stdout, write to stderr
    import gptqmodel  # noqa: F401  (the slow import, once)

    for line in sys.stdin:
        answers.write(json.dumps({"error": run(json.loads(line))}) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
