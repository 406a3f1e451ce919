"""`stable`: a layering that keeps last build's layers wherever they are still valid.

A layer is re-uploaded (and stops being shared) whenever its exact list of paths
changes. Given the previous plan, every previous layer whose paths all still
exist is kept verbatim (same paths, same order: same bytes, same diff_id). The
remaining paths (new paths and the survivors of broken layers) are laid out
like a first build: the most popular of them alone (an eighth of the budget),
the rest grouped by `agglomerate`, which merges paths whose closures nearly
coincide (they change together), so the next bump breaks few bytes again.

Without a previous plan this is the first-build layout over the whole graph.
"""

from __future__ import annotations

import numpy as np

from fastlayer.graph import ClosureGraph
from fastlayer.plan import popularity
from fastlayer.plan.agglomerate import agglomerate
from fastlayer.plan.planfile import Plan

# One layer in this many goes to a popular path of its own.
POPULAR_SHARE = 8


def stable_groups(
    graph: ClosureGraph, budget: int, previous: Plan | None = None
) -> list[list[int]]:
    """Row ids per layer: the previous plan's still-valid layers first, in their
    order, then the first-build layout of everything else."""
    index = graph.index()
    kept: list[list[int]] = []
    if previous is not None:
        for layer in previous.layers:
            ids = [index.get(p) for p in layer.paths]
            if ids and all(i is not None for i in ids):
                kept.append([i for i in ids if i is not None])
    # A path kept twice (a previous plan that repeated one) stays in the first layer.
    placed = np.zeros(graph.n, dtype=bool)
    unique_kept = []
    for ids in kept:
        if not placed[ids].any():
            placed[ids] = True
            unique_kept.append(ids)
    kept = unique_kept
    # Leave at least one layer for what is new; give up the smallest kept layers.
    leftover_exists = not placed.all()
    while kept and len(kept) > budget - (1 if leftover_exists else 0):
        smallest = min(range(len(kept)), key=lambda j: int(graph.nar_size[kept[j]].sum()))
        placed[kept.pop(smallest)] = False
        leftover_exists = True
    rest = np.flatnonzero(~placed)
    return kept + _first_build(graph, rest, budget - len(kept))


def _first_build(graph: ClosureGraph, rows: np.ndarray, budget: int) -> list[list[int]]:
    """Lay out `rows` in `budget` layers: the most popular alone, the rest grouped
    so that a bump breaks few bytes (see `agglomerate`)."""
    if len(rows) == 0:
        return []
    if len(rows) <= budget:
        return [[int(i)] for i in rows]
    # Popularity over the whole graph: a path's standing does not depend on which
    # of its neighbours happened to change.
    in_rows = np.zeros(graph.n, dtype=bool)
    in_rows[rows] = True
    ranked = [int(i) for i in popularity.rank(graph) if in_rows[i]]
    singles = ranked[: (budget - 1) // POPULAR_SHARE]
    in_rows[singles] = False
    others = np.flatnonzero(in_rows)
    return [[i] for i in singles] + agglomerate(graph, others, budget - len(singles))
