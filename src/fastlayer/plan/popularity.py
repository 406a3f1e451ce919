"""The popularity order of nixpkgs' closure-graph.py (referencesByPopularity), exactly.

W(u) is the number of distinct paths from a virtual super-root (pointing at every
path nothing references) to u; popularity(d) is the sum of W(u) over d and all
its ancestors. Paths are ordered by popularity descending, ties by `tie_key`
ascending. Counts are exact at any size: base-2**60 limbs in the native kernels,
as many as the largest count needs (sized by a float pre-pass), and the final
order compares those digits with numpy: no Python integer per path.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastlayer._native import rank as _rank
from fastlayer.graph import ClosureGraph


def tie_key(path: str) -> str:
    """closure-graph.py's tie-break: the leading `<hash>` dash-field moved to the end."""
    first, sep, rest = path.partition("-")
    return f"{rest}-{first}" if sep else path


def threads() -> int:
    """Worker threads for the popularity sums: $FASTLAYER_THREADS, else up to 2."""
    env = os.environ.get("FASTLAYER_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else min(2, os.cpu_count() or 1)


def path_counts(graph: ClosureGraph) -> np.ndarray:
    """W as uint64[limbs, n] in base 2**60, with just enough limbs."""
    order = _rank.topo_order(graph.indptr, graph.indices)
    biggest = max(1.0, _rank.max_path_count(graph.indptr, graph.indices, order))
    # The float estimate is off by far less than the two spare bits; past 2**1024
    # (inf) start at 18 limbs. Either way an overflow just retries with more.
    limbs = math.ceil((math.log2(biggest) + 2) / 60) if math.isfinite(biggest) else 18
    while True:
        w = _rank.path_counts(graph.indptr, graph.indices, order, limbs)
        if w is not None:
            return w
        limbs *= 2


def popularity_digits(graph: ClosureGraph) -> np.ndarray:
    """Exact popularity as base-2**60 digits, uint64[digits, n], least significant first."""
    w = path_counts(graph)
    sources = _rank.dfs_postorder(graph.indptr, graph.indices)
    lo, hi = _rank.ancestor_sums(graph.indptr, graph.indices, sources, w, threads=threads())
    digits = _rank.normalize(lo, hi)
    # Drop all-zero top digits so the sort compares no more keys than needed.
    nonzero = np.flatnonzero(digits.any(axis=1))
    return digits[: (nonzero[-1] + 1 if len(nonzero) else 1)]


def popularity(graph: ClosureGraph) -> list[int]:
    """Exact popularity of every path, as Python ints (for tests and debugging)."""
    digits = popularity_digits(graph)
    values = [0] * graph.n
    for k in range(digits.shape[0]):
        for i, d in enumerate(digits[k].tolist()):
            values[i] |= d << (60 * k)
    return values


def tie_ranks(names: list[str]) -> np.ndarray:
    """Rank of each name under `tie_key` (keys are distinct for distinct names).

    Native: the keys are compared as UTF-8 bytes, whose order is code point
    order, the order Python compares str in."""
    return _rank.tie_ranks(list(names))


# From this many paths the tie ranks are sorted on a second thread while the
# counts' single-threaded passes run (about 1 s of 8 at a million paths);
# below it a thread costs more than it saves.
OVERLAP_TIES = 100_000


def rank(graph: ClosureGraph) -> np.ndarray:
    """Row ids in closure-graph.py order: popularity descending, then tie key."""
    if graph.n == 0:
        return np.empty(0, dtype=np.int64)
    if graph.n < OVERLAP_TIES or threads() < 2:
        ties, digits = tie_ranks(graph.names), popularity_digits(graph)
    else:
        with ThreadPoolExecutor(1, "fastlayer-ties") as pool:
            later = pool.submit(tie_ranks, graph.names)
            digits = popularity_digits(graph)
            ties = later.result()
    # lexsort: last key first. Descending digits = ascending bitwise complements.
    return np.lexsort((ties, *(~d for d in digits)))


def ranked_paths(graph: ClosureGraph) -> list[str]:
    return [graph.names[i] for i in rank(graph).tolist()]


def ranked_lines(graph: ClosureGraph) -> bytes:
    """The ranked paths as UTF-8 lines, joined natively (no list of a million
    str in between)."""
    return _rank.lines(graph.names, rank(graph))
