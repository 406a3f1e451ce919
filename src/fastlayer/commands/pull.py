"""`fastlayer pull`: an image from a registry, every digest checked, into a file."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="pull an image by digest (or tag) from a registry into a docker-archive or OCI dir",
    )
    p.add_argument("image", help="[docker://]REGISTRY/NAME@sha256:DIGEST (or :TAG, then pin it)")
    p.add_argument("-o", "--output", required=True, help="the image file or OCI directory")
    p.add_argument("--format", choices=("docker-archive", "oci-dir"), default="docker-archive")
    p.add_argument("--os", default="linux", help="platform of a multi-platform image")
    p.add_argument("--arch", help="default: this machine's (amd64, arm64, ...)")
    p.add_argument("--variant", help="e.g. v8 for arm64")
    p.add_argument("--final-name", help="the image name written (default: as pulled)")
    p.add_argument("--final-tag", help="the tag written (default: as pulled, else latest)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (a local registry)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    add_deadlines(p, "pull")
    p.set_defaults(func=run)


def add_deadlines(p: argparse.ArgumentParser, verb: str) -> None:
    """--timeout and --stall-timeout, shared by pull and push."""
    from fastlayer.registry.client import DEADLINE, STALL

    p.add_argument(
        "--timeout", type=_seconds, default=DEADLINE, metavar="SECONDS",
        help=f"give up if the whole {verb} takes longer (default {DEADLINE:g}; 0: no limit)",
    )  # fmt: skip
    p.add_argument(
        "--stall-timeout", type=_seconds, default=STALL, metavar="SECONDS",
        help=f"give up when the registry sends or takes no byte for this long (default {STALL:g})",
    )  # fmt: skip


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < 1e9 or value != value:
        raise argparse.ArgumentTypeError(f"seconds must be in [0, 1e9): {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from fastlayer.registry.pull import pull

    result = pull(
        args.image,
        args.output,
        format=args.format,
        os_name=args.os,
        arch=args.arch,
        variant=args.variant,
        final_name=args.final_name,
        final_tag=args.final_tag,
        insecure=args.insecure,
        progress=not args.quiet and sys.stderr.isatty(),
        timeout=args.timeout,
        stall=args.stall_timeout or None,
    )
    if not result.reference.digest:
        print(
            f"fastlayer: pulled by tag; pin it as {result.reference.name}@{result.digest}",
            file=sys.stderr,
        )
    print(result.digest)
    return 0
