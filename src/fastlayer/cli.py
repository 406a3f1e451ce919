"""The `fastlayer` command: one subcommand per module in fastlayer.commands.

Each command module has `register(subparsers)` adding its parser, with
`func(args) -> int` set as the default `func`. User errors (FastlayerError,
OSError on user-named files) print one line on stderr and exit non-zero.
SIGTERM and SIGHUP clean up as SIGINT does and exit 128 + the signal number.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import signal
import sys

from fastlayer import interrupts

# Subcommand name -> module in fastlayer.commands, in the order --help lists them.
COMMANDS = {
    "stream-nix": "stream_nix",
    "build": "build",
    "stream": "build",
    "inspect": "inspect",
    "merge": "merge",
    "rank": "rank",
    "plan": "plan",
    "nar-hash": "nar_hash",
    "nix-db": "nix_db",
    "graph": "graph",
    "pull": "pull",
    "push": "push",
    "cache": "cache",
    "nix-conf": "nix_conf",
    "fake-nss": "nix_conf",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with a known command, only that command's module is imported
    (keeps heavy imports such as numpy out of `stream-nix`)."""
    parser = argparse.ArgumentParser(
        prog="fastlayer", description="Build layered container images, fast."
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command == "--version":
        modules = []  # nothing to import: the version is all that is asked
    elif command in COMMANDS:
        modules = [COMMANDS[command]]
    else:
        modules = list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(f"fastlayer.commands.{name}").register(sub)
    return parser


class _Version(argparse.Action):
    """--version: `fastlayer X.Y.Z` from the installed package's metadata, looked
    up only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kw: object):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        import fastlayer

        print(f"fastlayer {fastlayer.__version__}")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process's own command line: its stdout is ours to wrap
        _whole_writes()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    with interrupts.handled():
        try:
            return _run(args)
        except interrupts.Terminated as e:  # one that came while _run was reporting
            return 128 + e.signo
        except KeyboardInterrupt:
            return 130


def one_line(message: str) -> str:
    """message with newlines and other control characters escaped: a name read
    from outside (a path, a member, a server's text) cannot split the error
    line or write escape sequences to the terminal."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _whole_writes() -> None:
    """With PYTHONUNBUFFERED (common in containers) stdout's binary layer is raw:
    one write() may take only part of the data, and print() drops the rest. A
    buffered layer in between writes all of it or raises."""
    out = sys.stdout
    if out is None:  # started with stdout closed: what it would print goes nowhere
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
        return
    raw = getattr(out, "buffer", None)
    if isinstance(raw, io.RawIOBase):
        sys.stdout = io.TextIOWrapper(
            io.BufferedWriter(raw), encoding=out.encoding, errors=out.errors,
            line_buffering=True,
        )  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from fastlayer.errors import FastlayerError

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a full disk is reported here, not at exit
        return code
    except FastlayerError as e:
        print(f"fastlayer: error: {one_line(str(e))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not our error to report. What is
        # still buffered goes nowhere, or its flush at exit fails again, loudly.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        # Environment failures (disk full, unwritable output): one line, no traceback.
        where = f": {e.filename}" if e.filename else ""
        print(f"fastlayer: error: {one_line(f'{e.strerror or e}{where}')}", file=sys.stderr)
        return 1
    except interrupts.Terminated as e:
        with contextlib.suppress(OSError):  # after SIGHUP stderr may be gone
            print(f"fastlayer: stopped by {signal.Signals(e.signo).name}", file=sys.stderr)
        return 128 + e.signo
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
