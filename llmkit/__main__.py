"""`python -m llmkit` and the `llmkit` command."""

import sys


def main() -> None:
    if "serve" in sys.argv[1:]:  # other commands skip the engine process's imports too
        from llmkit.serve.engine_process import prestart

        prestart(sys.argv[1:])  # before the CLI's imports: `llmkit serve` starts on torch at once
    from llmkit.cli.app import main as cli

    cli()


if __name__ == "__main__":
    main()
