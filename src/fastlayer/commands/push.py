"""`fastlayer push`: build a spec into a registry, or push an image file/OCI dir,
sending only the blobs the registry lacks."""

from __future__ import annotations

import argparse
import os
import sys

from fastlayer.commands.pull import add_deadlines


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help="build SPEC (or take IMAGE) and push it, uploading only missing blobs"
    )
    p.add_argument(
        "source", help="a spec (.toml/.json), or an image: docker-archive, OCI dir/archive"
    )
    p.add_argument("destination", help="docker://REGISTRY/NAME[:TAG]")
    p.add_argument(
        "--compress", choices=("gzip", "zstd", "none"),
        help="layer compression for new blobs (default gzip)",
    )  # fmt: skip
    p.add_argument("--image-tag", help="pick one image of a multi-image archive or layout")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (a local registry)")
    p.add_argument("-j", "--jobs", type=int, default=3, help="parallel uploads (default 3)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    add_deadlines(p, "push")
    p.set_defaults(func=run)


def is_spec(path: str) -> bool:
    """A spec file by its suffix; anything else (a tar, a directory) is an image."""
    return not os.path.isdir(path) and path.endswith((".toml", ".json"))


def run(args: argparse.Namespace) -> int:
    from fastlayer.registry.push import push_image, push_spec

    common = dict(
        insecure=args.insecure,
        workers=max(1, args.jobs),
        progress=not args.quiet and sys.stderr.isatty(),
        timeout=args.timeout,
        stall=args.stall_timeout or None,
    )
    if is_spec(args.source):
        result = push_spec(args.source, args.destination, compress=args.compress, **common)
    else:
        result = push_image(
            args.source, args.destination, image_tag=args.image_tag,
            compress=args.compress or "gzip", **common,
        )  # fmt: skip
    if not args.quiet:
        print(f"fastlayer: {result.reference.name}:{result.tag}: {result.stats.summary()}",
              file=sys.stderr)  # fmt: skip
    print(result.digest)
    return 0
