"""nixpkgs' auto-layer strategy (dockerTools `auto-layer.py`), same layers on the same input.

Repeatedly the largest remaining path (by narSize; among equal sizes the one
latest in the input) becomes a "primary". Each path belongs to the set of
primaries that reach it "exclusively": when primary P arrives, every dependency
d of P drops the primaries that are ancestors of P, and gains P unless one of
d's remaining primaries is itself a dependency of P. Paths with the same set
form a layer. Stop before the number of distinct sets exceeds the limit.

Each step is two native DFS walks plus numpy work per changed path; the sets are
interned, and their transformation is computed once per distinct set, not per
path. Layers come out ordered by closure size ascending; nixpkgs leaves the
order of equal closure sizes to Python's set order, fastlayer breaks such ties
by the layers' first path keys.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from fastlayer._native import rank as _rank
from fastlayer.graph import ClosureGraph


def path_key(path: str) -> tuple[str, str]:
    """auto-layer's sort key for paths in a layer: (name, hash)."""
    first, _, rest = path.partition("-")
    return rest, first


class _Sets:
    """Interned frozensets of primaries, with how many paths carry each one."""

    def __init__(self) -> None:
        self.members: list[frozenset[int]] = [frozenset()]
        self.ids: dict[frozenset[int], int] = {frozenset(): 0}
        self.count = np.zeros(16, dtype=np.int64)

    def intern(self, s: frozenset[int]) -> int:
        i = self.ids.get(s)
        if i is None:
            i = self.ids[s] = len(self.members)
            self.members.append(s)
            if i >= len(self.count):
                self.count = np.concatenate([self.count, np.zeros_like(self.count)])
        return i


def auto_groups(graph: ClosureGraph, limit: int) -> list[list[int]]:
    """Row ids per layer, in auto-layer's layer order (closure size ascending)."""
    n = graph.n
    if n == 0:
        return []
    indptr, indices = graph.indptr, graph.indices
    rindptr, rindices = graph.reverse()
    sets = _Sets()
    group = np.zeros(n, dtype=np.int64)
    sets.count[0] = n
    distinct = 1
    down = np.zeros(n, dtype=np.int32)  # == t: a dependency of the step-t primary
    up = np.zeros(n, dtype=np.int32)  # == t: a user (ancestor) of it
    pop_order = np.argsort(graph.nar_size, kind="stable")[::-1]
    for t, p in enumerate(pop_order.tolist(), start=1):
        start = np.array([p], dtype=np.int32)
        deps = _rank.reach(indptr, indices, start, down, t, False)
        _rank.reach(rindptr, rindices, start, up, t, False)
        changed = np.concatenate([deps, start])
        old = group[changed]
        olds = np.unique(old[:-1])
        news = np.empty(len(olds), dtype=np.int64)
        for j, g in enumerate(olds.tolist()):
            kept = frozenset(m for m in sets.members[g] if up[m] != t)
            if not any(down[m] == t for m in kept):
                kept |= {p}
            news[j] = sets.intern(kept)
        new = np.empty(len(changed), dtype=np.int64)
        new[:-1] = news[np.searchsorted(olds, old[:-1])]
        new[-1] = sets.intern(frozenset({p}))
        # Distinct sets after the step, from the counts of the sets it touches.
        count = sets.count
        aff = np.union1d(old, new)
        delta = np.zeros(len(aff), dtype=np.int64)
        np.subtract.at(delta, np.searchsorted(aff, old), 1)
        np.add.at(delta, np.searchsorted(aff, new), 1)
        before = count[aff]
        after = before + delta
        new_distinct = distinct - int((before > 0).sum()) + int((after > 0).sum())
        if new_distinct > limit:
            break
        count[aff] = after
        group[changed] = new
        distinct = new_distinct
    return _layers(graph, group)


def path_key_ranks(names: list[str]) -> np.ndarray:
    """Rank of each path under `path_key`.

    Fast path (ASCII names whose first dash is at one position, as store paths
    are): the names as a byte matrix, rotated to `name NULs hash`, sorted by
    numpy. NUL padding orders like the tuple: a shorter name is a prefix that
    sorts first, and equal names go on to compare the hashes.
    """
    n = len(names)
    ranks = np.empty(n, dtype=np.int64)
    try:
        raw = np.array(names, dtype=np.bytes_)
    except UnicodeEncodeError:
        raw = None
    if raw is not None and n:
        width = raw.dtype.itemsize
        mat = raw.view(np.uint8).reshape(n, width)
        dash = mat == ord("-")
        k = int(dash[0].argmax()) if dash[0].any() else -1
        if k >= 0 and dash[:, k].all() and not dash[:, :k].any():
            rot = np.zeros((n, width), dtype=np.uint8)
            rot[:, : width - k - 1] = mat[:, k + 1 :]
            rot[:, width - k :] = mat[:, :k]
            keys = rot.view(f"S{width}").ravel()
            ranks[np.argsort(keys)] = np.arange(n)  # keys are distinct: no ties
            return ranks
    keys = sorted(range(n), key=lambda i: path_key(names[i]))
    ranks[np.array(keys, dtype=np.int64)] = np.arange(n)
    return ranks


def _layers(graph: ClosureGraph, group: np.ndarray) -> list[list[int]]:
    ranks = path_key_ranks(graph.names)
    # Rows by (set, path key): each layer comes out already sorted.
    order = np.argsort(group * graph.n + ranks)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(group[order])) + 1, [graph.n]])
    sizes = _rank.group_closure_sizes(
        graph.indptr, graph.indices, order, starts.astype(np.int64), graph.nar_size
    )
    # Closure size ascending; equal sizes: the layer with the smaller first path key.
    layer_order = np.lexsort((ranks[order[starts[:-1]]], sizes))
    rows = order.tolist()
    bounds = starts.tolist()
    return [rows[bounds[g] : bounds[g + 1]] for g in layer_order.tolist()]


def auto_layers(graph: ClosureGraph, limit: int, exclude: Collection[str] = ()) -> list[list[str]]:
    """auto-layer.py's output: layers of paths, `exclude`d paths left out afterwards."""
    name = graph.names.__getitem__
    layers = [list(map(name, ids)) for ids in auto_groups(graph, limit)]
    if exclude:
        layers = [[p for p in layer if p not in exclude] for layer in layers]
    return [layer for layer in layers if layer]
