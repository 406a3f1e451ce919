"""`fastlayer rank GRAPH [KEY]`: a drop-in for nixpkgs' closure-graph.py."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fastlayer.commands import add_graph_arguments
from fastlayer.graph import load_graph
from fastlayer.plan import ranked_lines
from fastlayer.sinks.output import write_output


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rank",
        help="print the paths of a closure graph, most popular first",
        description="Print the paths of a closure graph one a line, in the order of "
        "nixpkgs' closure-graph.py (referencesByPopularity).",
    )
    add_graph_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    graph = load_graph(args.graph, key=args.key, store_dir=args.store_dir)
    text = ranked_lines(graph) if graph.n else b"\n"
    if args.output and args.output != "-":
        write_output(args.output, text)  # the -o rules of every command
    else:
        # stdout's buffer writes it all or raises (cli: _whole_writes)
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
    return 0
