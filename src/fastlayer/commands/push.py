"""`fastlayer push`: build a spec into a registry, or push an image file/OCI dir,
sending only the blobs the registry lacks."""

from __future__ import annotations

import argparse
import os
import sys

from fastlayer.commands.cache import (
    add_cache_flags,
    add_shared_cache_flags,
    cache_choice,
    shared_cache,
)
from fastlayer.commands.pull import add_deadlines


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help="build SPEC (or take IMAGE) and push it, uploading only missing blobs"
    )
    p.add_argument(
        "source",
        nargs="+",
        help="a spec (.toml/.json), or an image: docker-archive, OCI dir/archive; several "
        "specs: a batch, each image pushed to PREFIX/<last part of its name>:<tag>",
    )
    p.add_argument(
        "destination", help="docker://REGISTRY/NAME[:TAG] (a batch: docker://REG/PREFIX)"
    )
    p.add_argument(
        "--compress", choices=("gzip", "zstd", "none"),
        help="layer compression for new blobs (default gzip)",
    )  # fmt: skip
    p.add_argument("--image-tag", help="pick one image of a multi-image archive or layout")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (a local registry)")
    p.add_argument("-j", "--jobs", type=int, default=3, help="parallel uploads (default 3)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument("--shard", metavar="K/N", help="a batch: push only shard K of N of the specs")
    p.add_argument(
        "--index",
        action="store_true",
        help="the specs are one image per platform: push each by digest, then one OCI "
        "image index naming them with their platforms, tagged as the destination says",
    )
    add_deadlines(p, "push")
    add_cache_flags(p)
    add_shared_cache_flags(p)
    p.set_defaults(func=run)


def is_spec(path: str) -> bool:
    """A spec file by its suffix; anything else (a tar, a directory) is an image."""
    return not os.path.isdir(path) and path.endswith((".toml", ".json"))


def run(args: argparse.Namespace) -> int:
    from fastlayer.errors import FastlayerError
    from fastlayer.publish import push_spec
    from fastlayer.registry.push import push_image

    common = dict(
        insecure=args.insecure,
        workers=max(1, args.jobs),
        progress=not args.quiet and sys.stderr.isatty(),
        timeout=args.timeout,
        stall=args.stall_timeout or None,
    )
    if args.index:
        return run_index(args, common)
    if len(args.source) > 1 or args.shard:
        return run_batch(args, common)
    args.source = args.source[0]
    if is_spec(args.source):
        result = push_spec(
            args.source, args.destination, compress=args.compress, cache=cache_choice(args),
            **shared_cache(args), **common,
        )  # fmt: skip
    else:
        if any(shared_cache(args).values()):
            raise FastlayerError("--cache-repo/--cache-from/--cache-to: push a spec, not an image")
        result = push_image(
            args.source, args.destination, image_tag=args.image_tag,
            compress=args.compress or "gzip", cache=cache_choice(args), **common,
        )  # fmt: skip
    if not args.quiet:
        print(f"fastlayer: {result.reference.name}:{result.tag}: {result.stats.summary()}",
              file=sys.stderr)  # fmt: skip
    print(result.digest)
    return 0


def run_batch(args: argparse.Namespace, common: dict) -> int:
    """Several specs, each to PREFIX/<name>:<tag>; a failure does not stop the others."""
    from fastlayer.batch import batch_error, parse_shard, push_many
    from fastlayer.cli import one_line
    from fastlayer.errors import FastlayerError

    images = [s for s in args.source if not is_spec(s)]
    if images:
        raise FastlayerError(f"a batch push takes specs (.toml/.json), not {images[0]}")
    if args.image_tag:
        raise FastlayerError("--image-tag picks one image of an archive; a batch takes specs")

    def done(item) -> None:
        if item.error is not None:
            print(f"fastlayer: error: {one_line(batch_error(item))}",
                  file=sys.stderr)  # fmt: skip
        else:
            print(item.output)

    common["progress"] = False  # two pushes at once: per-image lines instead of bars
    shard = parse_shard(args.shard) if args.shard else None
    result = push_many(
        args.source, args.destination, compress=args.compress, cache=cache_choice(args),
        jobs=2, on_done=done, shard=shard, **shared_cache(args), **common,
    )  # fmt: skip
    if not args.quiet:
        print(f"fastlayer: {result.summary()}", file=sys.stderr)
    return 1 if result.failed else 0


def run_index(args: argparse.Namespace, common: dict) -> int:
    """--index: one image per platform, then the index that names them."""
    from fastlayer.errors import FastlayerError
    from fastlayer.publish import push_index

    images = [s for s in args.source if not is_spec(s)]
    if images:
        raise FastlayerError(f"push --index takes specs (.toml/.json), not {images[0]}")
    if args.shard:
        raise FastlayerError(
            "--shard splits a batch; --index pushes one image of several platforms"
        )
    result = push_index(args.source, args.destination, compress=args.compress,
                        cache=cache_choice(args), **common)  # fmt: skip
    if not args.quiet:
        print(f"fastlayer: {result.reference.name}:{result.tag}: index of {len(args.source)} "
              f"platforms; {result.stats.summary()}", file=sys.stderr)  # fmt: skip
    print(result.digest)
    return 0
