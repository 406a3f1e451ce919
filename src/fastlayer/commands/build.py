"""`fastlayer build` and `fastlayer stream`: an image from a spec file."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastlayer.commands.cache import add_cache_flags, add_shared_cache_flags, cache_choice
from fastlayer.commands.pull import add_deadlines
from fastlayer.errors import FastlayerError
from fastlayer.sinks import FORMATS

COMPRESS_BY_SUFFIX = {".tar.gz": "gzip", ".tgz": "gzip", ".tar.zst": "zstd", ".tar": "none"}
SUFFIX_FOR = {"gzip": "*.tar.gz", "zstd": "*.tar.zst"}


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="build an image from a spec (TOML or JSON) into a file")
    b.add_argument(
        "spec",
        nargs="+",
        help="the image spec, .toml or .json; several: a batch, planned together, "
        "each image written into the -o directory",
    )
    b.add_argument(
        "-o",
        "--output",
        required=True,
        help="the image file (replaced whole when done; a symlink: the file it names), "
        "a fifo or character device to stream into, '-' for stdout, or an OCI directory; "
        "with several specs, a directory: DIR/<spec name>.tar each, or for --format "
        "oci-dir one layout holding them all",
    )
    b.add_argument(
        "-j", "--jobs", type=int, default=2, help="a batch's images built at once (default 2)"
    )
    b.add_argument(
        "--index",
        action="store_true",
        help="with --format oci-dir: the specs are one image per platform (same name and "
        "tag); write them and one OCI image index naming them under that name:tag",
    )
    b.add_argument(
        "--shard",
        metavar="K/N",
        help="build only shard K of N of the specs (by a hash of each spec's name: "
        "adding specs moves no other), for N CI jobs that together build each once",
    )
    b.add_argument(
        "--strategy",
        default="shared",
        choices=("shared", "popularity", "limit", "auto"),
        help="a batch's plan for specs on the default strategy: shared (default: "
        "layers shared by several images apart from each image's own) or any strategy, "
        "each image alone",
    )
    b.add_argument("--format", choices=FORMATS, default="docker-archive")
    add_shared_cache_flags(b, reads_only=True)
    b.add_argument(
        "--insecure", action="store_true", help="the --cache-repo registry over plain HTTP"
    )
    add_deadlines(b, "reading of the shared cache")
    b.add_argument(
        "--compress",
        choices=("none", "gzip", "zstd"),
        help="compress the archive (OCI formats: each layer); wins over the spec's "
        "compression and -o's extension. Without it, -o's extension (.tar, .tar.gz/.tgz, "
        ".tar.zst) decides, else the spec's compression; a spec compression other than "
        "none that the extension contradicts is refused",
    )
    _common(b)
    b.set_defaults(func=run_build)
    s = sub.add_parser("stream", help="stream an image from a spec to stdout (docker-archive)")
    s.add_argument("spec", help="the image spec, .toml or .json")
    _common(s)
    s.set_defaults(func=run_stream)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metadata", help="write name, tag, image ID and layers as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    add_cache_flags(p)


def compression_for(output: str, given: str | None, spec: str, format: str, where: str) -> str:
    """--compress, else what -o's extension names, else spec (the spec's compression).
    A spec's compression (other than the default none) that the extension
    contradicts is an error rather than silently overridden."""
    if given:
        return given
    by_name = next(
        (kind for suffix, kind in COMPRESS_BY_SUFFIX.items() if output.lower().endswith(suffix)),
        None,
    )
    if format == "oci-dir" or (format == "oci-archive" and by_name == "none"):
        by_name = None  # a directory's name, or an OCI archive's .tar, says nothing of layers
    if by_name is None:
        return spec
    if spec not in ("none", by_name):
        raise FastlayerError(
            f'{where}: compression = "{spec}" but -o {output} names '
            f"{'an uncompressed' if by_name == 'none' else 'a ' + by_name} archive; "
            f"name it {SUFFIX_FOR[spec]} or choose with --compress"
        )
    return by_name


def run_build(args: argparse.Namespace) -> int:
    from fastlayer.builder import build
    from fastlayer.sinks.output import is_stdout
    from fastlayer.spec import load_spec

    if args.index:
        return run_index(args)
    if len(args.spec) > 1 or args.shard:
        return run_batch(args)
    args.spec = args.spec[0]
    spec = load_spec(args.spec)
    _check_metadata(args.metadata, args.output)
    where = f"spec {args.spec}"
    compress = compression_for(args.output, args.compress, spec.compression, args.format, where)
    # decided before the build: a replaced file is no longer the one stdout names
    args.tag_to_stderr = is_stdout(args.output)
    result = build(
        spec,
        args.output,
        format=args.format,
        compress=compress,
        progress=not args.quiet and sys.stderr.isatty(),
        cache=cache_choice(args),
        **shared_build_cache(args),
    )
    if (args.cache_repo or args.cache_from) and not args.quiet:
        print(f"fastlayer: {shared_cache_line(result, compress)}", file=sys.stderr)
    _report(args, result)
    return 0


def shared_cache_line(result, compress: str) -> str:
    """What the shared cache gave a build: a flag that did nothing says why."""
    if not result.remote_fetch:
        return ("shared layer cache not asked: this output stores layers uncompressed, "
                "and reading the store was measured faster than downloading them")  # fmt: skip
    if not result.remote_asked:
        return ("shared layer cache: no layer asked for (each known to the local cache, "
                "or without a portable key: no narHash in the graph)")  # fmt: skip
    return (
        f"shared layer cache: {result.remote_hits} of {result.remote_asked} layers "
        f"downloaded ({compress} blobs), the rest built from the store"
    )


def shared_build_cache(args: argparse.Namespace) -> dict:
    """build's keyword arguments for the shared cache and its registry."""
    return {"cache_repo": args.cache_repo, "cache_from": args.cache_from,
            "cache_to": args.cache_to, "insecure": args.insecure, "timeout": args.timeout,
            "stall": args.stall_timeout}  # fmt: skip


def run_batch(args: argparse.Namespace) -> int:
    """Several specs: every image into the -o directory; a bad spec does not stop
    the others, it makes the exit status 1."""
    from fastlayer.batch import build_many, parse_shard
    from fastlayer.sinks.output import is_stdout

    if is_stdout(args.output):
        raise FastlayerError("a batch (several specs) needs -o DIRECTORY, not stdout")
    if os.path.lexists(args.output) and not os.path.isdir(args.output):
        raise FastlayerError(f"-o {args.output}: a batch writes into a directory; this is not one")
    if args.metadata:
        raise FastlayerError("--metadata takes one spec; a batch prints a line per image")
    shard = parse_shard(args.shard) if args.shard else None
    result = build_many(
        args.spec, args.output, format=args.format, compress=args.compress,
        cache=cache_choice(args), jobs=args.jobs, strategy=args.strategy, shard=shard,
        on_done=lambda item: _report_item(item, args.quiet), **shared_build_cache(args),
    )  # fmt: skip
    print(f"fastlayer: {result.summary()}", file=sys.stderr)
    return 1 if result.failed else 0


def run_index(args: argparse.Namespace) -> int:
    """--index: the platforms' images and their index into one OCI layout."""
    from fastlayer.batch import build_index

    if args.format != "oci-dir":
        raise FastlayerError("--index writes an OCI image index: use it with --format oci-dir")
    if args.shard or args.metadata:
        raise FastlayerError("--index takes neither --shard nor --metadata")

    def done(item) -> None:
        item.output = args.output  # not the temporary layout it is built in
        _report_item(item, args.quiet)

    result, digest = build_index(
        args.spec,
        args.output,
        compress=args.compress,
        cache=cache_choice(args),
        on_done=done,
        **shared_build_cache(args),
    )
    if digest is None:
        print(f"fastlayer: {result.summary()}; no index written", file=sys.stderr)
        return 1
    print(digest)
    return 0


def _report_item(item, quiet: bool) -> None:
    from fastlayer.batch import batch_error
    from fastlayer.cli import one_line

    if item.error is not None:
        print(f"fastlayer: error: {one_line(batch_error(item))}", file=sys.stderr)
    elif not quiet:
        r = item.result
        print(f"{item.source}: {r.name}:{r.tag} -> {item.output}", file=sys.stderr)


def run_stream(args: argparse.Namespace) -> int:
    from fastlayer.builder import stream

    if sys.stdout.isatty():
        raise FastlayerError("refusing to write an image to a terminal; pipe it or use build -o")
    _check_metadata(args.metadata, None)
    result = stream(
        args.spec, progress=not args.quiet and sys.stderr.isatty(), cache=cache_choice(args)
    )
    _report(args, result)
    return 0


def _check_metadata(metadata: str | None, output: str | None) -> None:
    """Refuse a --metadata target before the image is built, not after it is in place."""
    if not metadata:
        return
    from fastlayer.sinks.output import output_target

    target = output_target(metadata)  # a directory, socket, ... is refused here
    if (
        output
        and not target.stream
        and os.path.abspath(target.path)
        == os.path.abspath(output_target(output).path if os.path.lexists(output) else output)
    ):
        raise FastlayerError(f"--metadata {metadata} is the image's own -o path")


def _report(args: argparse.Namespace, result) -> None:
    if args.metadata:
        from fastlayer.sinks.output import write_output

        # as -o: a fifo or device is written into, never replaced
        write_output(args.metadata, (json.dumps(result.metadata(), indent=2) + "\n").encode())
    # the tag: on stdout after a build, on stderr when stdout carries the image
    on_stderr = args.func is run_stream or getattr(args, "tag_to_stderr", False)
    print(result.tag, file=sys.stderr if on_stderr else sys.stdout)
