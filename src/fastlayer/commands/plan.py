"""`fastlayer plan GRAPH --max-layers N --strategy NAME`: write a layer plan (JSON).

`fastlayer plan GRAPH GRAPH... --strategy shared -o DIR`: plan several images
together (fastlayer.plan.shared), one plan file per graph, DIR/<name>.plan.json
(<name>: the graph's file name without `.json`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from fastlayer import untrusted
from fastlayer.errors import FastlayerError
from fastlayer.graph import load_graph
from fastlayer.plan import STRATEGIES, make_plan, read_plan, shared_plans, store_layer_budget
from fastlayer.sinks.output import write_output
from fastlayer.spec import MAX_LAYERS


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="group the paths of a closure graph into layers (JSON plan)",
        description="Group the paths of a closure graph into store layers and write "
        "the plan as JSON (format: fastlayer.plan.planfile). With --strategy shared "
        "and several graphs, plan those images together and write one plan per "
        "graph, DIR/<name>.plan.json (-o DIR).",
    )
    p.add_argument(
        "graph",
        nargs="+",
        metavar="GRAPH",
        help="exportReferencesGraph JSON, nix path-info JSON or closureInfo dir, "
        "optionally followed by KEY, the key of the graph list in an attrs JSON file; "
        "with --strategy shared, every argument is a graph (a key goes in --key)",
    )
    p.add_argument("--key", help="key of the graph list in attrs JSON files")
    p.add_argument("--store-dir", help="store directory (default $NIX_STORE_DIR or /nix/store)")
    p.add_argument(
        "-o",
        "--output",
        help="write to this file (atomically) instead of stdout; with several graphs, "
        "the directory that gets one <name>.plan.json per graph",
    )
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


def _graph_args(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The graph files and the attrs key: GRAPH [KEY], or with shared GRAPH..."""
    given = args.graph
    if args.strategy == "shared":
        return given, args.key
    if len(given) > 2:
        raise FastlayerError("several graphs need --strategy shared")
    if len(given) == 2 and args.key is not None:
        raise FastlayerError("the graph key is given twice (KEY and --key)")
    return given[:1], given[1] if len(given) == 2 else args.key


def _plan_names(graphs: list[str], directory: str) -> list[str]:
    """DIR/<name>.plan.json for each graph; two graphs may not share a name."""
    outs: dict[str, str] = {}
    for g in graphs:
        name = os.path.basename(os.path.normpath(g))
        name = name.removesuffix(".json") or name
        out = os.path.join(directory, f"{name}.plan.json")
        if out in outs:
            raise FastlayerError(f"graphs {outs[out]} and {g} would both write {out}")
        outs[out] = g
    return list(outs)


def _output_dir(directory: str | None, create: bool) -> str:
    """-o DIR for several plans: an existing directory, or a missing one, made
    when `create` (after planning, so that a failed plan leaves nothing)."""
    if directory is None or directory == "-":
        raise FastlayerError("several graphs need -o DIR (one plan file each)")
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise FastlayerError(f"-o {directory}: not a directory")
    if create and not os.path.isdir(directory):
        try:
            os.mkdir(directory)
        except OSError as e:
            raise FastlayerError(f"cannot create {directory}: {e.strerror}") from None
    return directory


def run(args: argparse.Namespace) -> int:
    if args.strategy != "stable" and args.previous:
        raise FastlayerError("--previous only applies to --strategy stable")
    if args.strategy == "pipeline" and args.pipeline is None:
        raise FastlayerError("--strategy pipeline needs --pipeline JSON (the steps)")
    if args.strategy != "pipeline" and args.pipeline is not None:
        raise FastlayerError("--pipeline applies only to --strategy pipeline")
    files, key = _graph_args(args)
    max_layers = args.max_layers
    if max_layers is None and args.strategy != "pipeline":
        max_layers = 100
    if max_layers is not None:
        untrusted.integer(max_layers, "--max-layers", 1, MAX_LAYERS)
    untrusted.integer(args.base_layers, "--base-layers", 0, MAX_LAYERS)
    outs = _plan_names(files, _output_dir(args.output, False)) if len(files) > 1 else []
    graphs = [load_graph(f, key=key, store_dir=args.store_dir) for f in files]
    budget = None if max_layers is None else store_layer_budget(max_layers, args.base_layers)
    exclude = _read_exclude(args.exclude) if args.exclude else set()
    if len(graphs) > 1:
        assert budget is not None  # shared always has one
        plans = shared_plans(graphs, [budget] * len(graphs), [exclude] * len(graphs))
        _output_dir(args.output, True)
        for out, plan in zip(outs, plans, strict=True):
            write_output(out, plan.dumps().encode())
        return 0
    plan = make_plan(
        graphs[0],
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
