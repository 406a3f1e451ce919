"""`fastlayer cache info|prune`, and the --cache/--no-cache flags other commands take."""

from __future__ import annotations

import argparse
import math
import time

from fastlayer.errors import FastlayerError

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--cache",
        metavar="DIR",
        help="the layer cache directory (default: $FASTLAYER_CACHE, else "
        "$XDG_CACHE_HOME/fastlayer, else ~/.cache/fastlayer)",
    )
    g.add_argument("--no-cache", action="store_true", help="neither use nor fill the layer cache")


def add_shared_cache_flags(p: argparse.ArgumentParser, reads_only: bool = False) -> None:
    """--cache-repo, --cache-from, --cache-to: a layer cache shared through a registry.
    reads_only: a command that only reads it (build), which refuses --cache-to."""
    p.add_argument(
        "--cache-repo", metavar="docker://REG/REPO",
        help="a layer cache shared through this registry repository "
        + ("(read: compressed OCI layers are downloaded from it)" if reads_only
           else "(read and written)"),
    )  # fmt: skip
    p.add_argument("--cache-from", metavar="docker://REG/REPO", help="read the shared cache here")
    p.add_argument(
        "--cache-to", metavar="docker://REG/REPO",
        help="push only: build reads the shared cache, it does not write it" if reads_only
        else "write the shared cache here",
    )  # fmt: skip


def shared_cache(args: argparse.Namespace) -> dict[str, str | None]:
    """push_spec's keyword arguments for the shared-cache flags."""
    return {"cache_repo": args.cache_repo, "cache_from": args.cache_from,
            "cache_to": args.cache_to}  # fmt: skip


def cache_choice(args: argparse.Namespace) -> str | bool | None:
    """What builder.build's cache argument gets from the flags."""
    return False if args.no_cache else args.cache


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="show or prune the layer cache")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    info = verbs.add_parser("info", help="where the cache is, its entries and size")
    info.add_argument("--cache", metavar="DIR", help="the cache directory (default as build)")
    info.set_defaults(func=run_info)
    prune = verbs.add_parser("prune", help="remove the least recently used entries")
    prune.add_argument("--cache", metavar="DIR", help="the cache directory (default as build)")
    prune.add_argument("--max-size", help="keep at most this much (e.g. 100M, 2G; 0: empty it)")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="entries unused so long")
    prune.set_defaults(func=run_prune)


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in UNITS else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        value = -1
    if not number or not math.isfinite(value) or value < 0 or value * UNITS[unit] > 2**62:
        raise FastlayerError(f"--max-size {text!r}: give bytes, or a number with K, M, G or T")
    return int(value * UNITS[unit])


def run_info(args: argparse.Namespace) -> int:
    from fastlayer.cache import open_cache

    cache = open_cache(args.cache)
    assert cache is not None
    entries = cache.entries()
    size = sum(x[1] for x in entries)
    print(f"layer cache: {cache.root}")
    print(f"entries: {len(entries)} ({size} bytes)")
    if entries:
        oldest = min(x[2] for x in entries)
        print(f"least recently used: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(oldest))} UTC")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from fastlayer.cache import open_cache

    if args.max_size is None and args.older_than is None:
        raise FastlayerError("cache prune: give --max-size SIZE and/or --older-than DAYS")
    if args.older_than is not None and not args.older_than >= 0:
        raise FastlayerError(f"--older-than {args.older_than}: give a number of days >= 0")
    cache = open_cache(args.cache)
    assert cache is not None
    limit = parse_size(args.max_size) if args.max_size is not None else None
    older = args.older_than * 86400 if args.older_than is not None else None
    removed = cache.prune(limit, older)
    left = cache.entries()
    print(f"removed {removed} entries; {len(left)} left ({sum(x[1] for x in left)} bytes)")
    return 0
