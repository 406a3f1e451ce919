"""`fastlayer plan GRAPH --max-layers N --strategy NAME`: write a layer plan (JSON)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fastlayer import untrusted
from fastlayer.commands import add_graph_arguments
from fastlayer.errors import FastlayerError
from fastlayer.graph import load_graph
from fastlayer.plan import STRATEGIES, make_plan, read_plan, store_layer_budget
from fastlayer.sinks.output import write_output
from fastlayer.spec import MAX_LAYERS


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="group the paths of a closure graph into layers (JSON plan)",
        description="Group the paths of a closure graph into store layers and write "
        "the plan as JSON (format: fastlayer.plan.planfile).",
    )
    add_graph_arguments(p)
    p.add_argument("--strategy", choices=STRATEGIES, default="popularity")
    p.add_argument(
        "--max-layers",
        type=int,
        help="layers of the whole image, as dockerTools' maxLayers (default 100; "
        "for pipeline, unlimited)",
    )
    p.add_argument(
        "--base-layers", type=int, default=0, help="layers taken by the base image (fromImage)"
    )
    p.add_argument("--previous", help="the plan of the previous build (for --strategy stable)")
    p.add_argument("--pipeline", help="layeringPipeline as a JSON file, or inline JSON")
    p.add_argument("--exclude", help="file of paths to leave out of every layer, one a line")
    p.set_defaults(func=run)


def _read_json_arg(value: str, what: str) -> Any:
    """Inline JSON, or a JSON file (regular, at most 4 MiB)."""
    if value.lstrip().startswith(("[", "{")):
        return untrusted.parse_json(value, f"malformed JSON in {what} {value:.60}")
    with untrusted.open_regular(value, what) as f:
        return untrusted.read_json(f, f"malformed JSON in {what} {value}")


def _read_exclude(path: str) -> set[str]:
    """--exclude: paths one a line (a regular file; no cap, like graphs)."""
    with untrusted.open_regular(path, "exclude list") as f:
        raw = f.read()
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise untrusted.Invalid(f"exclude list {path}: not UTF-8 text: {e}") from None
    return {x.strip() for x in text.splitlines() if x.strip()}


def run(args: argparse.Namespace) -> int:
    if args.strategy != "stable" and args.previous:
        raise FastlayerError("--previous only applies to --strategy stable")
    if (args.strategy == "pipeline") != (args.pipeline is not None):
        raise FastlayerError("--pipeline goes with --strategy pipeline, and only with it")
    max_layers = args.max_layers
    if max_layers is None and args.strategy != "pipeline":
        max_layers = 100
    if max_layers is not None:
        untrusted.integer(max_layers, "--max-layers", 1, MAX_LAYERS)
    untrusted.integer(args.base_layers, "--base-layers", 0, MAX_LAYERS)
    graph = load_graph(args.graph, key=args.key, store_dir=args.store_dir)
    budget = None if max_layers is None else store_layer_budget(max_layers, args.base_layers)
    exclude = _read_exclude(args.exclude) if args.exclude else set()
    plan = make_plan(
        graph,
        args.strategy,
        budget,
        previous=read_plan(args.previous) if args.previous else None,
        steps=_read_json_arg(args.pipeline, "pipeline") if args.pipeline else None,
        exclude=exclude,
    )
    text = plan.dumps()
    if args.output and args.output != "-":
        write_output(args.output, text.encode())  # the -o rules of every command
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0
