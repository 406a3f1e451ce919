"""Group paths into few layers so that a version bump breaks few bytes.

Cost model: a bump of path z renames z and everything above it, so it breaks
(forces a re-upload of) every layer holding a path whose closure contains z.
Over bumps of each path in turn, layer L costs size(L) * |closure(L)|, where
closure(L) is the union of its paths' closures. Starting from one path per
layer, merge the cheapest pair (by the increase of that cost) until the budget
is met. Candidate pairs are layers joined by a reference, evaluated lazily
(a stale pair is re-priced when it reaches the top of the heap); whatever is
left disconnected is merged pairwise at the end.

Closures are Python-int bitsets (OR and bit_count run in C): O(n^2 / 8) bytes
for n paths, so this is for image-sized graphs; bigger graphs fall back to
auto-layer's grouping.
"""

from __future__ import annotations

import heapq

import numpy as np

from fastlayer._native import rank as _rank
from fastlayer.graph import ClosureGraph
from fastlayer.plan.auto import auto_groups

MAX_PATHS = 40_000  # 200 MB of bitsets


def closure_bitsets(graph: ClosureGraph) -> list[int]:
    """bits[x] has bit y set when y is x or something x references, transitively."""
    order = _rank.topo_order(graph.indptr, graph.indices).tolist()
    ip, ix = graph.indptr.tolist(), graph.indices.tolist()
    bits = [0] * graph.n
    for v in reversed(order):
        b = 1 << v
        for c in ix[ip[v] : ip[v + 1]]:
            b |= bits[c]
        bits[v] = b
    return bits


class _Groups:
    """Union-find over paths with each group's size, closure bitset and popcount."""

    def __init__(self, rows: list[int], sizes: list[int], bits: list[int]) -> None:
        self.parent = {r: r for r in rows}
        self.members = {r: [r] for r in rows}
        self.size = {r: sizes[r] for r in rows}
        self.bits = {r: bits[r] for r in rows}
        self.count = {r: bits[r].bit_count() for r in rows}
        self.version = dict.fromkeys(rows, 0)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def penalty(self, a: int, b: int) -> int:
        union = (self.bits[a] | self.bits[b]).bit_count()
        return self.size[a] * (union - self.count[a]) + self.size[b] * (union - self.count[b])

    def merge(self, a: int, b: int) -> None:
        self.parent[b] = a
        self.members[a] += self.members.pop(b)
        self.size[a] += self.size.pop(b)
        self.bits[a] |= self.bits.pop(b)
        self.count[a] = self.bits[a].bit_count()
        del self.count[b]
        self.version[a] += 1


def agglomerate(
    graph: ClosureGraph, rows: np.ndarray, budget: int, bits: list[int] | None = None
) -> list[list[int]]:
    """Partition `rows` into at most `budget` groups of row ids (see module doc)."""
    row_list = [int(r) for r in rows]
    if len(row_list) <= budget:
        return [[r] for r in row_list]
    if graph.n > MAX_PATHS:
        sub = graph.subgraph(rows)
        return [[row_list[j] for j in g] for g in auto_groups(sub, budget)]
    bits = bits if bits is not None else closure_bitsets(graph)
    g = _Groups(row_list, graph.nar_size.tolist(), bits)
    inside = np.zeros(graph.n, dtype=bool)
    inside[rows] = True
    ip, ix = graph.indptr, graph.indices
    heap = [
        (g.penalty(v, c), v, c, 0, 0)
        for v in row_list
        for c in ix[ip[v] : ip[v + 1]][inside[ix[ip[v] : ip[v + 1]]]].tolist()
    ]
    heapq.heapify(heap)
    groups = len(row_list)
    while groups > budget and heap:
        _, a, b, va, vb = heapq.heappop(heap)
        ra, rb = g.find(a), g.find(b)
        if ra == rb:
            continue
        if (ra, rb, g.version[ra], g.version[rb]) != (a, b, va, vb):
            heapq.heappush(heap, (g.penalty(ra, rb), ra, rb, g.version[ra], g.version[rb]))
            continue
        g.merge(ra, rb)
        groups -= 1
    roots = sorted({g.find(r) for r in row_list}, key=lambda r: min(g.members[r]))
    while len(roots) > budget:
        # Disconnected leftovers: merge the cheapest pair (few groups by now).
        _, i, j = min(
            (g.penalty(roots[i], roots[j]), i, j)
            for i in range(len(roots))
            for j in range(i + 1, len(roots))
        )
        g.merge(roots[i], roots[j])
        roots.pop(j)
    return [sorted(g.members[r]) for r in roots]
