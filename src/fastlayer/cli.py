"""The `fastlayer` command: one subcommand per module in fastlayer.commands.

Each command module has `register(subparsers)` adding its parser, with
`func(args) -> int` set as the default `func`. User errors (FastlayerError,
OSError on user-named files) print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Subcommand modules, in the order `fastlayer --help` lists them.
COMMANDS = ["stream_nix", "rank", "plan", "nar_hash", "graph"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlayer", description="Build layered container images, fast."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        if importlib.util.find_spec(f"fastlayer.commands.{name}") is None:  # TEMP while in progress
            continue
        importlib.import_module(f"fastlayer.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fastlayer.errors import FastlayerError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FastlayerError as e:
        print(f"fastlayer: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not our error to report.
        return 1
    except OSError as e:
        # Environment failures (disk full, unwritable output): one line, no traceback.
        where = f": {e.filename}" if e.filename else ""
        print(f"fastlayer: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
