"""`fastlayer stream-nix`: nixpkgs' streamLayeredImage script, as a drop-in."""

from __future__ import annotations

import argparse
import sys

from fastlayer.commands.cache import add_cache_flags, cache_choice
from fastlayer.nixconf import load_conf, stream_conf
from fastlayer.sinks.output import output_fd


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stream-nix",
        help="stream an image from nixpkgs' stream_layered_image.py conf JSON",
        description="Take the conf JSON of nixpkgs' streamLayeredImage script and write "
        "the same docker-archive (same layers, config and manifest), reading each file once.",
    )
    p.add_argument("conf", help="the conf JSON (store_layers, config, customisation_layer, ...)")
    p.add_argument(
        "-t", "--repo_tag", "--repo-tag", dest="repo_tag", help="override the RepoTags of the conf"
    )
    p.add_argument(
        "-o",
        "--output",
        help="the archive (replaced whole when done; a symlink: the file it names), "
        "a fifo or character device to stream into, or '-' (default: stdout)",
    )
    p.add_argument(
        "--root",
        help="read every path of the conf under this directory (a chroot store: "
        "/nix/store/x is read from ROOT/nix/store/x and archived as /nix/store/x)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="progress lines even when stderr is no terminal",
    )
    add_cache_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    conf = load_conf(args.conf)
    show = not args.quiet and (args.verbose or sys.stderr.isatty())
    log = (lambda msg: print(msg, file=sys.stderr)) if show else None
    if args.output in (None, "-") and sys.stdout.isatty():
        from fastlayer.errors import FastlayerError

        raise FastlayerError("refusing to write an image to a terminal; use -o FILE or a pipe")
    from fastlayer.builder import layer_cache

    cache = layer_cache(cache_choice(args))
    with output_fd(args.output) as fd:
        stream_conf(conf, fd, repo_tag=args.repo_tag, root=args.root, log=log, cache=cache)
    return 0
