"""`fastlayer nar-hash PATH...`: NAR sha256 and size of paths, like nix-hash --type sha256."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "nar-hash",
        help="NAR sha256 (nix-base32 and SRI) and narSize of paths",
        description="Print `sha256:<nix-base32> sha256-<base64> NAR_SIZE PATH` for each "
        "path: the hash of its NAR serialisation, as Nix's narHash, "
        "computed in one pass without writing the NAR.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="file, directory or symlink")
    p.add_argument(
        "-j", "--jobs", type=int, default=None, help="paths hashed in parallel (default: CPUs)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastlayer import untrusted
    from fastlayer.nix.nar import nar_hash_many

    if args.jobs is not None:
        untrusted.integer(args.jobs, "--jobs", 1, 4096)
    infos = nar_hash_many(args.paths, jobs=args.jobs)
    if args.json:
        rows = [
            {"path": path, "narHash": i.nar_hash, "sri": i.sri, "narSize": i.nar_size}
            for path, i in zip(args.paths, infos, strict=True)
        ]
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for path, i in zip(args.paths, infos, strict=True):
            sys.stdout.write(f"{i.nar_hash} {i.sri} {i.nar_size} {path}\n")
    return 0
