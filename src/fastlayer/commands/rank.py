"""`fastlayer rank GRAPH [KEY]`: a drop-in for nixpkgs' closure-graph.py."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fastlayer.graph import load_graph
from fastlayer.plan import rank
from fastlayer.plan.planfile import write_atomic


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rank",
        help="print the paths of a closure graph, most popular first",
        description="Print the paths of a closure graph one a line, in the order of "
        "nixpkgs' closure-graph.py (referencesByPopularity).",
    )
    p.add_argument(
        "graph", help="exportReferencesGraph JSON, nix path-info JSON or closureInfo dir"
    )
    p.add_argument("key", nargs="?", help="key of the graph list in an attrs JSON file")
    p.add_argument("--store-dir", help="store directory (default $NIX_STORE_DIR or /nix/store)")
    p.add_argument("-o", "--output", help="write to this file (atomically) instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    graph = load_graph(args.graph, key=args.key, store_dir=args.store_dir)
    text = "\n".join(rank(graph)) + "\n"
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0
