"""nixpkgs' layeringPipeline (`flatten_references_graph`): the same steps, the same output.

A pipeline is a JSON list of steps `[name, *args]`, applied left to right to a
value that starts as the whole graph and may become lists/dicts of graphs:

    popularity_contest          graph -> list of one-path graphs, popularity order
    limit_layers N              list -> first N-1 items, then the rest merged
    split_every N               graph -> list of graphs of N paths (vertex order)
    subcomponent_out PATHS      graph -> {"main": PATHS + deps, "rest": the others}
    subcomponent_in PATHS       graph -> {"main": PATHS + users, "rest": the others}
    split_paths SPECS           graph -> {"main", "common", "rest"} (empty ones left out)
    remove_paths PATHS          graph -> graph without PATHS
    over KEY STEP               dict -> dict with STEP applied to dict[KEY]
    map STEP                    list -> STEP applied to each item
    reverse                     list -> reversed list
    flatten                     nested lists/dicts -> flat list of graphs
    pipe [STEPS]                the steps in turn

The result is flattened into layers (dict values in key order). Vertex order is
nixpkgs': the input sorted by narSize (stable), kept by every subgraph, merged
graphs concatenated. Graphs are vertex/edge arrays over global row ids; walks
run in the native kernels.

Where nixpkgs' script fails (limit_layers with fewer items than N, a bare graph as
the final result) fastlayer returns the obvious answer instead: no merged layer,
and the graph as one layer.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from fastlayer._native import rank as _rank
from fastlayer.errors import FastlayerError
from fastlayer.graph import ClosureGraph
from fastlayer.plan import popularity
from fastlayer.untrusted import short

# Steps nest through map, over and pipe; real pipelines are a few levels deep,
# and compiling recursively must not run out of stack on a crafted one.
MAX_NESTING = 64

STEPS = (
    "popularity_contest",
    "limit_layers",
    "split_every",
    "subcomponent_in",
    "subcomponent_out",
    "split_paths",
    "remove_paths",
    "over",
    "map",
    "reverse",
    "flatten",
    "pipe",
)


class _Ctx:
    """The whole graph, shared by every subgraph (which only holds row ids)."""

    def __init__(self, graph: ClosureGraph, keep: np.ndarray) -> None:
        self.graph = graph
        self.index = graph.index()
        self.n = graph.n
        rows = np.repeat(np.arange(graph.n, dtype=np.int32), np.diff(graph.indptr))
        cols = graph.indices
        ok = keep[rows] & keep[cols]
        self.src, self.dst = rows[ok], cols[ok]
        self.mark = np.zeros(graph.n, dtype=np.int32)
        self.stamp = 0

    def next_stamp(self) -> int:
        self.stamp += 1
        return self.stamp


class Sub:
    """A subgraph: vertices (global row ids, in order) and its own edges."""

    __slots__ = ("ctx", "verts", "src", "dst")

    def __init__(self, ctx: _Ctx, verts: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        self.ctx, self.verts, self.src, self.dst = ctx, verts, src, dst

    @property
    def names(self) -> list[str]:
        return [self.ctx.graph.names[i] for i in self.verts.tolist()]

    def member(self) -> np.ndarray:
        m = np.zeros(self.ctx.n, dtype=bool)
        m[self.verts] = True
        return m

    def find(self, names: Any) -> list[int]:
        """Row ids of the given names that are vertices here (others are ignored)."""
        m = self.member()
        out = []
        for name in names:
            i = self.ctx.index.get(name) if isinstance(name, str) else None
            if i is not None and m[i]:
                out.append(i)
        return out

    def induced(self, keep: np.ndarray) -> Sub:
        ok = keep[self.src] & keep[self.dst]
        return Sub(self.ctx, self.verts[keep[self.verts]], self.src[ok], self.dst[ok])

    def csr(self, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        src, dst = (self.dst, self.src) if reverse else (self.src, self.dst)
        order = np.argsort(src, kind="stable")
        indptr = np.zeros(self.ctx.n + 1, dtype=np.int32)
        np.cumsum(np.bincount(src, minlength=self.ctx.n), out=indptr[1:])
        return indptr, dst[order].astype(np.int32)

    def reach(self, starts: list[int], reverse: bool = False) -> np.ndarray:
        """Boolean mask of the vertices reachable from `starts` (included)."""
        indptr, indices = self.csr(reverse)
        stamp = self.ctx.next_stamp()
        got = _rank.reach(
            indptr, indices, np.array(starts, dtype=np.int32), self.ctx.mark, stamp, True
        )
        m = np.zeros(self.ctx.n, dtype=bool)
        m[got] = True
        return m


def _graph(value: Any, step: str) -> Sub:
    if not isinstance(value, Sub):
        raise FastlayerError(f"pipeline step {step}: expected a graph, got {_what(value)}")
    return value


def _what(value: Any) -> str:
    return "a graph" if isinstance(value, Sub) else type(value).__name__


def _items(value: Any, step: str) -> list[Any]:
    if isinstance(value, Sub) or isinstance(value, str | bytes) or value is None:
        raise FastlayerError(f"pipeline step {step}: expected a list, got {_what(value)}")
    try:
        return list(value)
    except TypeError:
        raise FastlayerError(f"pipeline step {step}: expected a list, got {_what(value)}") from None


def _merge(graphs: list[Sub]) -> Sub:
    ctx = graphs[0].ctx
    return Sub(
        ctx,
        np.concatenate([g.verts for g in graphs]),
        np.concatenate([g.src for g in graphs]),
        np.concatenate([g.dst for g in graphs]),
    )


def _popularity_contest(value: Any) -> list[Sub]:
    g = _graph(value, "popularity_contest")
    ctx = g.ctx
    local = np.full(ctx.n, -1, dtype=np.int64)
    local[g.verts] = np.arange(len(g.verts))
    k = len(g.verts)
    keys = np.unique(local[g.src] * max(k, 1) + local[g.dst])
    indptr = np.zeros(k + 1, dtype=np.int32)
    np.cumsum(np.bincount(keys // max(k, 1), minlength=k), out=indptr[1:])
    sub = ClosureGraph(
        names=g.names,
        indptr=indptr,
        indices=(keys % max(k, 1)).astype(np.int32),
        nar_size=ctx.graph.nar_size[g.verts],
        nar_hash=[None] * k,
    )
    empty = np.empty(0, dtype=np.int32)
    return [Sub(ctx, g.verts[i : i + 1], empty, empty) for i in popularity.rank(sub).tolist()]


def _count(value: Any, step: str) -> int:
    if type(value) is not int or value <= 0:
        raise FastlayerError(f"pipeline step {step}: needs a count > 0, got {short(value)}")
    return value


def _paths(value: Any, step: str) -> list[str]:
    """A path or a list of paths (paths not in the graph are ignored later)."""
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise FastlayerError(f"pipeline step {step}: needs a list of paths, got {short(value)}")
    return value


def _limit_layers(max_count: Any) -> Callable[[Any], list[Sub]]:
    max_count = _count(max_count, "limit_layers")

    def step(value: Any) -> list[Sub]:
        items = _items(value, "limit_layers")
        head, tail = items[: max_count - 1], items[max_count - 1 :]
        return head + [_merge([_graph(t, "limit_layers") for t in tail])] if tail else head

    return step


def _split_every(count: Any) -> Callable[[Any], list[Sub]]:
    count = _count(count, "split_every")

    def step(value: Any) -> list[Sub]:
        g = _graph(value, "split_every")
        out = []
        for i in range(0, len(g.verts), count):
            keep = np.zeros(g.ctx.n, dtype=bool)
            keep[g.verts[i : i + count]] = True
            out.append(g.induced(keep))
        return out

    return step


def _subcomponent(mode: str, paths: Any) -> Callable[[Any], dict[str, Sub]]:
    paths = _paths(paths, f"subcomponent_{mode}")

    def step(value: Any) -> dict[str, Sub]:
        g = _graph(value, f"subcomponent_{mode}")
        main = g.reach(g.find(paths), reverse=(mode == "in"))
        return {"main": g.induced(main), "rest": g.induced(~main)}

    return step


def _split_paths(specs: Any) -> Callable[[Any], dict[str, Sub]]:
    if not isinstance(specs, list):
        raise FastlayerError(f"pipeline step split_paths: needs a list, got {short(specs)}")

    def indices(g: Sub, spec: Any) -> list[int]:
        if isinstance(spec, dict):
            if "children_of" not in spec:
                raise FastlayerError(
                    "pipeline step split_paths: a dict spec needs the key 'children_of'"
                )
            parents = spec["children_of"]
            parents = parents if isinstance(parents, list) else [parents]
            indptr, idx = g.csr()
            return [int(c) for p in g.find(parents) for c in idx[indptr[p] : indptr[p + 1]]]
        return g.find([spec])

    def step(value: Any) -> dict[str, Sub]:
        g = _graph(value, "split_paths")
        split = [i for spec in _items(specs, "split_paths") for i in indices(g, spec)]
        if not split:
            return {"rest": g}
        has_parent = np.zeros(g.ctx.n, dtype=bool)
        has_parent[g.dst] = True
        roots = [int(v) for v in g.verts[~has_parent[g.verts]]]
        is_split = np.zeros(g.ctx.n, dtype=bool)
        is_split[split] = True
        if len(roots) == 1 and is_split[roots[0]]:
            return {"main": g}
        split_off = g.reach(split)
        # Cut every edge into a split path; what the root(s) still reach is "rest".
        ok = ~is_split[g.dst]
        cut = Sub(g.ctx, g.verts, g.src[ok], g.dst[ok])
        rest_with_common = cut.reach([r for r in roots if not is_split[r]])
        common = split_off & rest_with_common
        parts = {
            "main": cut.induced(split_off & ~common),
            "common": cut.induced(common),
            "rest": cut.induced(rest_with_common & ~common),
        }
        return {k: v for k, v in parts.items() if len(v.verts)}

    return step


def _remove_paths(paths: Any) -> Callable[[Any], Sub]:
    paths = _paths(paths, "remove_paths")

    def step(value: Any) -> Sub:
        g = _graph(value, "remove_paths")
        drop = np.zeros(g.ctx.n, dtype=bool)
        drop[g.find(paths)] = True
        return g.induced(~drop)

    return step


def _over(key: Any, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    if not isinstance(key, str):
        raise FastlayerError(f"pipeline step over: the key must be a string, got {short(key)}")

    def step(value: Any) -> Any:
        if not isinstance(value, dict):
            raise FastlayerError(f"pipeline step over: expected a dict, got {_what(value)}")
        if key not in value:
            raise FastlayerError(f"pipeline step over: no key {key!r} (have {list(value)})")
        return {**value, key: fn(value[key])}

    return step


def flatten(value: Any) -> list[Sub]:
    if isinstance(value, Sub):
        return [value]
    out: list[Sub] = []
    for x in value.values() if isinstance(value, dict) else _items(value, "flatten"):
        out.extend(flatten(x))
    return out


def compile_step(step: Any, depth: int = 0) -> Callable[[Any], Any]:
    """Turn one `[name, *args]` step into a function of the current value."""
    if depth > MAX_NESTING:
        raise FastlayerError(f"pipeline: steps nested deeper than {MAX_NESTING} levels")
    if not isinstance(step, list) or not step or not isinstance(step[0], str):
        raise FastlayerError(f"pipeline: a step must be [name, *args], got {short(step)}")
    name, args = step[0], step[1:]
    arity = {"popularity_contest": 0, "reverse": 0, "flatten": 0, "map": 1, "pipe": 1, "over": 2}
    if name not in STEPS:
        raise FastlayerError(f"pipeline: unknown step {name!r} (known: {', '.join(STEPS)})")
    if len(args) != arity.get(name, 1):
        raise FastlayerError(f"pipeline step {name}: expected {arity.get(name, 1)} argument(s)")
    if name == "popularity_contest":
        return _popularity_contest
    if name == "reverse":
        return lambda v: list(reversed(_items(v, "reverse")))
    if name == "flatten":
        return flatten
    if name == "limit_layers":
        return _limit_layers(args[0])
    if name == "split_every":
        return _split_every(args[0])
    if name in ("subcomponent_in", "subcomponent_out"):
        return _subcomponent(name.rsplit("_", 1)[1], args[0])
    if name == "split_paths":
        return _split_paths(args[0])
    if name == "remove_paths":
        return _remove_paths(args[0])
    if name == "over":
        return _over(args[0], compile_step(args[1], depth + 1))
    if name == "map":
        fn = compile_step(args[0], depth + 1)
        return lambda v: [fn(x) for x in _items(v, "map")]
    return compile_pipeline(args[0], depth + 1)  # pipe


def compile_pipeline(steps: Any, depth: int = 0) -> Callable[[Any], Any]:
    if not isinstance(steps, list):
        raise FastlayerError(f"pipeline: expected a list of steps, got {type(steps).__name__}")
    fns = [compile_step(s, depth) for s in steps]

    def run(value: Any) -> Any:
        for fn in fns:
            value = fn(value)
        return value

    return run


def pipeline_layers(
    graph: ClosureGraph, steps: Any, exclude: Collection[str] = ()
) -> list[list[str]]:
    """flatten_references_graph's output: one list of paths per resulting graph
    (empty lists included, as nixpkgs prints them)."""
    run = compile_pipeline(steps)
    keep = np.ones(graph.n, dtype=bool)
    if exclude:
        index = graph.index()
        keep[[index[p] for p in exclude if p in index]] = False
    ctx = _Ctx(graph, keep)
    order = np.argsort(graph.nar_size, kind="stable").astype(np.int32)
    whole = Sub(ctx, order[keep[order]], ctx.src, ctx.dst)
    return [g.names for g in flatten(run(whole))]
