"""`fastlayer graph ACTION`: closure graph tools (`graph scan` so far)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "graph", help="closure graph tools", description="Closure graph tools."
    )
    actions = p.add_subparsers(dest="graph_action", metavar="ACTION", required=True)
    _register_scan(actions)


def _register_scan(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "scan",
        help="references of store paths by scanning their contents, as Nix does",
        description="Scan store paths for references to other store paths (their hash "
        "parts in file contents, symlink targets and names) and write the closure "
        "graph as exportReferencesGraph JSON, with narHash, narSize and closureSize.",
    )
    p.add_argument("store_dir", metavar="STORE_DIR", help="directory holding the store paths")
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="roots whose closure to scan (default: every store path in STORE_DIR)",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write the JSON here (default: stdout)")
    p.add_argument(
        "--print-store-dir",
        metavar="DIR",
        help="store directory to write in paths, e.g. /nix/store for a copied store "
        "(default: STORE_DIR)",
    )
    p.add_argument(
        "-j", "--jobs", type=int, default=None, help="paths scanned in parallel (default: CPUs)"
    )
    p.set_defaults(func=_run_scan)


def _run_scan(args: argparse.Namespace) -> int:
    from fastlayer import untrusted
    from fastlayer.errors import FastlayerError
    from fastlayer.nix.scan import scan_store, write_graph

    if args.jobs is not None:
        untrusted.integer(args.jobs, "--jobs", 1, 4096)
    infos = scan_store(
        args.store_dir, args.paths or None, jobs=args.jobs, print_dir=args.print_store_dir
    )
    if not infos:  # only with no PATHS given: a named path that is not one is an error already
        raise FastlayerError(_no_store_paths(args.store_dir))
    if not args.output:
        write_graph(infos, sys.stdout)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            write_graph(infos, out)
    except OSError as e:
        raise FastlayerError(f"{args.output}: {e.strerror}") from None
    return 0


def _no_store_paths(store_dir: str) -> str:
    """Why `graph scan` found nothing: what a store path's name looks like, and
    what the directory holds instead."""
    import os

    from fastlayer.untrusted import short

    names = sorted(os.listdir(store_dir))
    held = (
        f"; none of its {len(names)} entries is one (e.g. {short(names[0], 60)})"
        if names
        else "; it is empty"
    )
    return (
        f"{store_dir}: no store paths to scan: a store path's name is 32 nix-base32 "
        "characters (0-9 and a-z without e, o, t, u), a dash and a name, "
        f"e.g. 0c7pqrk3bn2yz8z3nb8vvvk1i4ka0x1n-hello-2.12{held}"
    )
