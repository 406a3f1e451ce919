"""`fastlayer nix-db GRAPH ROOT`: the Nix database of a closure, under ROOT."""

from __future__ import annotations

import argparse
import os

from fastlayer import untrusted
from fastlayer.untrusted import MAX_INT


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nix-db",
        help="write /nix/var/nix/db (schema 10) registering a closure, under ROOT",
        description="Register every path of a closure graph in ROOT/nix/var/nix/db/db.sqlite "
        "as nix-store --load-db would, hashes computed from the store and checked.",
    )
    p.add_argument("graph", help="closure graph (exportReferencesGraph, path-info JSON, ...)")
    p.add_argument("root", help="the root the image's / will be (ROOT/nix/var/nix/db)")
    p.add_argument("--store-root", help="read /nix/store/x from STORE_ROOT/nix/store/x")
    p.add_argument("--gcroot", action="append", default=[], help="add a gcroot (repeatable)")
    p.add_argument(
        "--registration-time",
        type=int,
        help="registrationTime (default $SOURCE_DATE_EPOCH, else 1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastlayer.graph import load_graph
    from fastlayer.nix.db import registrations, write_db, write_gcroots

    when = _registration_time(args.registration_time)
    graph = load_graph(args.graph)
    store_root = args.store_root.rstrip("/") if args.store_root else ""
    regs = registrations(graph, on_disk=lambda p: store_root + p)
    write_db(os.path.join(args.root, "nix/var/nix/db"), regs, when)
    write_gcroots(args.root, args.gcroot)
    return 0


def _registration_time(given: int | None) -> int:
    """--registration-time, else $SOURCE_DATE_EPOCH, else 1: seconds since 1970."""
    if given is not None:
        return untrusted.integer(given, "--registration-time", 0, MAX_INT)
    env = os.environ.get("SOURCE_DATE_EPOCH", "1")
    if not env.isascii() or not env.isdigit() or len(env) > 18:
        raise untrusted.Invalid(f"SOURCE_DATE_EPOCH: not epoch seconds: {untrusted.short(env)}")
    return int(env)
