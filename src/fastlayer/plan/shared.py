"""`shared`: plan the store layers of several images together, so that they share layers.

Each image's store layers are planned within its own budget, and every layer
that two images both have is *identical* in both (the same paths in the same
order, hence the same bytes and diff_id): a batch produces each such layer once
and a registry stores it once.

1. Paths are matched by name across the graphs. A path's *image set* is the set
   of images whose closure holds it (an image's `exclude`d paths are not in its
   set). Paths with the same image set form a *group*: paths one image alone
   uses form that image's own group and never share a layer with paths other
   images use (budget 1 aside).
2. Groups are ordered most widely used first (bottom), then by bytes
   (descending), then by the image set as a bitmask (image i worth 2**i),
   ascending. Within a group, paths go in the popularity order of the union of
   the graphs (closure-graph.py's order: popularity descending, then the name
   with its hash moved to the end), which does not depend on the order of the
   paths inside the graphs.
3. An image with more groups than its budget keeps its own group as its top
   layer and its most widely used shared groups as they are, and merges its
   least widely used shared groups into one layer, for that image only (with a
   budget of 1, everything is one layer). What is lost: the merged layer is
   that image's alone, so the merged groups' bytes are produced once more for
   it, and a change in any of them rebuilds the whole merged layer.
4. Spare budget splits groups. A split costs one layer in every image that
   holds the group as it is, so it is decided once for all of them, and only
   while each of them has a layer to spare. A split halves one run of the
   group's path order (at first the whole group) by bytes: each path goes to
   the half its byte midpoint falls in, neither half empty. Splits go greedily
   to the run whose halving most lowers the sum of squared layer bytes (by
   2 * left * right: that sum over the total is the bytes a change of one path,
   picked by bytes, rebuilds on average), then to the one that most evens out
   path counts (so paths of unknown size, 0, still spread), then to the more
   widely used group, then to the group and run first in order.

Layers come out bottom first: each image's groups in the order of 2, a split
group's runs in path order, the merged layer after the shared groups kept as
they are, the image's own group last. The same input (graphs in the same
order, same budgets) gives the same plans, however the graphs order their
paths. A path whose narSize or references differ between graphs (which Nix
store paths cannot) counts with those of the first graph holding it.
"""

from __future__ import annotations

import gc
import heapq
import numbers
from bisect import bisect_left
from collections.abc import Collection, Sequence
from itertools import count, pairwise

import numpy as np

from fastlayer.errors import FastlayerError
from fastlayer.graph import ClosureGraph
from fastlayer.plan import popularity
from fastlayer.plan.planfile import Layer, Plan
from fastlayer.untrusted import MAX_INT


def shared_plans(
    graphs: Sequence[ClosureGraph],
    budgets: Sequence[int],
    exclude: Sequence[Collection[str]] | None = None,
) -> list[Plan]:
    """One plan per graph (image), planned together (see the module doc):
    `budgets[i]` store layers for image i, `exclude[i]` paths left out of it."""
    _check_args(graphs, budgets, exclude)
    if not graphs:
        return []
    union = _Union(graphs, exclude)
    groups = _Groups(union)
    layout = _Layout(groups, [int(b) for b in budgets])
    layout.split()
    # The plans are tens of thousands of new lists and objects, none in a cycle:
    # left on, the collector would walk every path list of every graph several
    # times over while they are made (the first batch of a process paid 10x).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return layout.plans(graphs[0].store_dir)
    finally:
        if enabled:
            gc.enable()


def _check_args(
    graphs: Sequence[ClosureGraph],
    budgets: Sequence[int],
    exclude: Sequence[Collection[str]] | None,
) -> None:
    if len(budgets) != len(graphs):
        raise FastlayerError(f"{len(graphs)} graphs but {len(budgets)} layer budgets")
    if exclude is not None and len(exclude) != len(graphs):
        raise FastlayerError(f"{len(graphs)} graphs but {len(exclude)} exclude lists")
    for i, b in enumerate(budgets):
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise FastlayerError(f"layer budget of image {i} must be at least 1, got {b!r}")
    for i, g in enumerate(graphs):
        if g.store_dir != graphs[0].store_dir:
            raise FastlayerError(
                f"the graphs disagree on the store dir: {graphs[0].store_dir} (graph 0) "
                f"and {g.store_dir} (graph {i})"
            )


class _Union:
    """Every path of every graph, once: global ids in order of first appearance,
    each graph's rows as global ids, and the union graph (each path's references
    and narSize as the first graph holding it gives them)."""

    def __init__(self, graphs: Sequence[ClosureGraph], exclude: Sequence[Collection[str]] | None):
        # One dict pass over every name: setdefault hands a new name the running
        # occurrence number, so first appearances get increasing (sparse) ids.
        ids: dict[str, int] = {}
        raw = []
        offset = 0
        for g in graphs:
            raw.append(np.fromiter(map(ids.setdefault, g.names, count(offset)), np.int64, g.n))
            offset += g.n
        first = np.fromiter(ids.values(), np.int64, len(ids))
        lut = np.empty(offset, dtype=np.int64)
        lut[first] = np.arange(len(first))
        self.names = list(ids)
        self.n = len(self.names)
        self.rows = [lut[r] for r in raw]  # graph i's row j is path rows[i][j]
        excluded = exclude if exclude is not None else [()] * len(graphs)
        self.used = [  # global ids of the paths each image keeps
            self._kept(g, rows, ex) for g, rows, ex in zip(graphs, self.rows, excluded, strict=True)
        ]
        self.graph = self._graph(graphs, raw)

    @staticmethod
    def _kept(g: ClosureGraph, rows: np.ndarray, exclude: Collection[str]) -> np.ndarray:
        """Global ids of the paths image g keeps."""
        if not exclude:
            return rows
        keep = np.ones(g.n, dtype=bool)
        index = g.index()
        keep[[index[p] for p in exclude if p in index]] = False
        return rows[keep]

    def _graph(self, graphs: Sequence[ClosureGraph], raw: list[np.ndarray]) -> ClosureGraph:
        counts, cols, sizes = [], [], []
        offset = 0
        for g, r, rows in zip(graphs, raw, self.rows, strict=True):
            new = np.flatnonzero(r == np.arange(offset, offset + g.n))  # first appearances
            offset += g.n
            deg = np.diff(g.indptr)[new].astype(np.int64)
            # The CSR slices of the `new` rows, gathered without a Python loop.
            starts = g.indptr[new].astype(np.int64) - np.cumsum(deg) + deg
            take = np.repeat(starts, deg) + np.arange(int(deg.sum()))
            counts.append(deg)
            cols.append(rows[g.indices[take]])
            sizes.append(g.nar_size[new])
        deg_all = np.concatenate(counts)
        indptr = np.zeros(self.n + 1, dtype=np.int32)
        np.cumsum(deg_all, out=indptr[1:])
        nar_size = np.concatenate(sizes).astype(np.int64)
        if float(nar_size.sum(dtype=np.float64)) > MAX_INT:
            raise FastlayerError("the graphs' narSize values add up to more than 2^63 bytes")
        # Acyclic: every graph is, and holds its paths' references (a cycle
        # would need a path whose references come from a later graph).
        return ClosureGraph(
            names=self.names,
            indptr=indptr,
            indices=np.concatenate(cols).astype(np.int32),
            nar_size=nar_size,
            nar_hash=[None] * self.n,
            store_dir=graphs[0].store_dir,
        )


class _Groups:
    """Paths grouped by image set, groups in plan order (module doc, 2): `paths`
    holds global ids group after group, group g being paths[start[g]:start[g+1]];
    `members[g]` the images using group g, `width[g]` how many."""

    def __init__(self, union: _Union):
        n_img = len(union.rows)
        words = np.zeros((union.n, (n_img + 63) // 64), dtype=np.uint64)
        for i, ids in enumerate(union.used):  # ids are distinct within one image
            words[ids, i // 64] |= np.uint64(1 << (i % 64))
        used = np.flatnonzero(words.any(axis=1))
        sets, inverse = _unique_rows(words[used])
        bits = np.unpackbits(sets.astype("<u8").view(np.uint8), axis=1, bitorder="little")
        members = bits[:, :n_img].astype(bool)
        width = members.sum(axis=1)
        sizes = union.graph.nar_size[used]
        nbytes = np.zeros(len(sets), dtype=np.int64)
        np.add.at(nbytes, inverse, sizes)
        # Plan order: widest first, then bytes descending, then the bitmask ascending.
        order = np.lexsort((*(sets[:, w] for w in range(sets.shape[1])), -nbytes, -width))
        pos = np.empty(len(order), dtype=np.int64)
        pos[order] = np.arange(len(order))
        prank = np.empty(union.n, dtype=np.int64)
        prank[popularity.rank(union.graph)] = np.arange(union.n)
        by = np.lexsort((prank[used], pos[inverse]))
        self.paths = used[by]
        cum = np.concatenate([[0], np.cumsum(union.graph.nar_size[self.paths])])
        self.cum: list[int] = cum.tolist()
        # Twice each path's byte midpoint (uint64: the total is below 2^63).
        self.mid2: list[int] = (cum[:-1].astype(np.uint64) + cum[1:].astype(np.uint64)).tolist()
        counts = np.bincount(pos[inverse], minlength=len(order))
        self.start: list[int] = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.members = members[order]
        self.width: list[int] = width[order].tolist()
        self.names = union.names
        self.k = len(order)

    def halve(self, s: int, e: int) -> tuple[int, int, int]:
        """(cut, gain, count gain) for halving the run paths[s:e] by bytes: the
        cut c (s < c < e) puts each path on the side its byte midpoint falls in;
        gain = bytes^2 - left^2 - right^2 = 2 left right, the same with counts."""
        c = min(max(bisect_left(self.mid2, self.cum[s] + self.cum[e], s, e), s + 1), e - 1)
        left, right = self.cum[c] - self.cum[s], self.cum[e] - self.cum[c]
        return c, 2 * left * right, 2 * (c - s) * (e - c)


def _unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(rows, axis=0, return_inverse=True), by a lexsort (several times
    faster than unique's structured view on uint64 rows)."""
    if not len(rows):
        return rows, np.zeros(0, dtype=np.int64)
    order = np.lexsort(rows.T)
    ranked = rows[order]
    new = np.concatenate([[True], (ranked[1:] != ranked[:-1]).any(axis=1)])
    inverse = np.empty(len(rows), dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ranked[new], inverse


class _Layout:
    """Which groups each image holds as they are, which it merges, and how many
    runs each group is split into (module doc, 3 and 4)."""

    def __init__(self, groups: _Groups, budgets: list[int]):
        self.groups = groups
        self.budgets = budgets
        self.cuts: list[list[int]] = [[] for _ in range(groups.k)]
        self.holders: list[list[int]] = [[] for _ in range(groups.k)]
        # Per image: (kept shared groups, merged groups, own group or None).
        self.units: list[tuple[list[int], list[int], int | None]] = []
        self.slack: list[int] = []
        width = groups.width
        by_image = np.ascontiguousarray(groups.members.T)
        for i, budget in enumerate(budgets):
            mine = np.flatnonzero(by_image[i]).tolist()
            own = mine.pop() if mine and width[mine[-1]] == 1 else None
            total = len(mine) + (own is not None)
            if total <= budget:
                kept, merged = mine, []
            elif budget == 1:
                kept, merged = [], mine + ([own] if own is not None else [])
                own = None
            else:
                room = budget - (own is not None) - 1  # one layer for the merged rest
                kept, merged = mine[:room], mine[room:]
            for g in kept + ([own] if own is not None else []):
                self.holders[g].append(i)
            self.units.append((kept, merged, own))
            self.slack.append(budget - len(kept) - bool(merged) - (own is not None))

    def split(self) -> None:
        """Spend spare layers on splits (module doc, 4): a max-heap of candidate
        halvings, one per run; a group drops out once one of its holders has no
        layer to spare (slack only ever falls)."""
        groups = self.groups
        heap: list[tuple[int, int, int, int, int, int, int]] = []

        def push(g: int, s: int, e: int) -> None:
            if e - s > 1:
                c, gain, by_count = groups.halve(s, e)
                heap.append((-gain, -by_count, -groups.width[g], g, s, c, e))

        for g in range(groups.k):
            if self.holders[g]:
                push(g, groups.start[g], groups.start[g + 1])
        heapq.heapify(heap)
        while heap:
            *_, g, s, c, e = heapq.heappop(heap)
            holders = self.holders[g]
            if not all(self.slack[i] > 0 for i in holders):
                continue
            for i in holders:
                self.slack[i] -= 1
            self.cuts[g].append(c)
            for a, b in ((s, c), (c, e)):
                if b - a > 1:
                    c2, gain, by_count = groups.halve(a, b)
                    heapq.heappush(heap, (-gain, -by_count, -groups.width[g], g, a, c2, b))

    def plans(self, store_dir: str) -> list[Plan]:
        groups = self.groups
        # Names in plan order, as objects: any slice or selection of them is
        # one C-level gather.
        name_at = np.array(groups.names, dtype=object)[groups.paths]
        cum, start = groups.cum, groups.start
        group_at = np.repeat(np.arange(groups.k), np.diff(start))
        cache: dict[int, list[tuple[list[str], int]]] = {}

        def runs(g: int) -> list[tuple[list[str], int]]:
            """Group g's layers (paths, bytes), built once for every image holding it."""
            if g not in cache:
                b = [start[g], *sorted(self.cuts[g]), start[g + 1]]
                cache[g] = [(name_at[s:e].tolist(), cum[e] - cum[s]) for s, e in pairwise(b)]
            return cache[g]

        plans = []
        for budget, (kept, merged, own) in zip(self.budgets, self.units, strict=True):
            layers = [Layer(paths=list(p), size=s) for g in kept for p, s in runs(g)]
            if merged:
                chosen = np.zeros(groups.k, dtype=bool)
                chosen[merged] = True
                at = np.flatnonzero(chosen[group_at])  # ascending: group order, then path order
                size = sum(cum[start[g + 1]] - cum[start[g]] for g in merged)
                layers.append(Layer(paths=name_at[at].tolist(), size=size))
            if own is not None:
                layers += [Layer(paths=list(p), size=s) for p, s in runs(own)]
            plans.append(Plan(strategy="shared", layers=layers, store_dir=store_dir, budget=budget))
        return plans
