"""Reference scanning of store paths, the way Nix does it, plus their NAR hashes.

A store path refers to another when the other's 32-character hash part
occurs anywhere in its NAR: file contents, symlink targets, or file names
(Nix scans the NAR dump itself, src/libstore/references.cc). Candidates are
all store paths in the store directory (Nix limits them to the build's
inputs, so a path built by Nix gets the same references unless its bytes
happen to mention an unrelated path's hash). One pass per path yields the
references, narHash and narSize together, so a store made without Nix gets
an exportReferencesGraph-style closure graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TextIO

from fastlayer._native.scan import RefTable
from fastlayer.errors import FastlayerError
from fastlayer.nix.nar import NarInfo, default_jobs, walk

HASH_LEN = 32
# A store path's base name: nix-base32 hash part, a dash, a name.
STORE_NAME = re.compile(r"[0-9abcdfghijklmnpqrsvwxyz]{32}-.+", re.DOTALL)
# Leftovers Nix may keep next to a path, sharing its hash part.
_AUXILIARY = (".lock", ".chroot", ".check")


@dataclass(frozen=True)
class PathInfo:
    """One store path as exportReferencesGraph describes it."""

    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]


class _Store:
    """The candidate store paths of one store directory, by hash part."""

    def __init__(self, store_dir: str, print_dir: str) -> None:
        self.dir = store_dir
        self.print_dir = print_dir.rstrip("/") or "/"
        try:
            names = sorted(os.listdir(store_dir))
        except OSError as e:
            raise FastlayerError(f"{store_dir}: {e.strerror}") from None
        by_hash: dict[str, str] = {}
        for name in names:
            if not STORE_NAME.fullmatch(name):
                continue
            other = by_hash.get(name[:HASH_LEN])
            if other is not None:
                name = _pick(other, name, store_dir)
            by_hash[name[:HASH_LEN]] = name
        self.names = list(by_hash.values())
        self.index = {name: i for i, name in enumerate(self.names)}
        self.table = RefTable(b"".join(n[:HASH_LEN].encode("ascii") for n in self.names))

    def printed(self, i: int) -> str:
        return os.path.join(self.print_dir, self.names[i])

    def resolve(self, path: str) -> int:
        """Index of a store path given by base name, full path, or printed path."""
        name = path.rstrip("/")
        for prefix in (self.dir.rstrip("/") + "/", self.print_dir.rstrip("/") + "/"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name not in self.index:
            raise FastlayerError(f"{path}: not a store path in {self.dir}")
        return self.index[name]

    def scan(self, i: int) -> tuple[NarInfo, list[int]]:
        """NAR hash/size of path i and the indices of the paths it refers to."""
        found = bytearray(len(self.names))
        h = hashlib.sha256()
        size = walk(os.path.join(self.dir, self.names[i]), h.update, self.table.address, found)
        refs = []
        j = found.find(1)
        while j >= 0:
            refs.append(j)
            j = found.find(1, j + 1)
        return NarInfo.from_digest(h.digest(), size), refs


def _pick(a: str, b: str, store_dir: str) -> str:
    """The real path of two entries sharing a hash part (the other is a Nix leftover)."""
    a_aux, b_aux = a.endswith(_AUXILIARY), b.endswith(_AUXILIARY)
    if a_aux != b_aux:
        return b if a_aux else a
    raise FastlayerError(f"{store_dir}: {a} and {b} share a hash part")


def scan_store(
    store_dir: str | os.PathLike[str],
    paths: Iterable[str] | None = None,
    jobs: int | None = None,
    print_dir: str | None = None,
) -> list[PathInfo]:
    """Scan `paths` and everything they refer to (all store paths if None), sorted by path.

    Paths in the result (and in references) are under `print_dir`, default
    store_dir: for a store copied to DIR/nix/store, pass "/nix/store".
    """
    store_dir = os.path.abspath(os.fspath(store_dir))
    store = _Store(store_dir, print_dir or store_dir)
    roots = (
        sorted({store.resolve(p) for p in paths})
        if paths is not None
        else list(range(len(store.names)))
    )
    results = _scan_closure(store, roots, jobs or default_jobs())
    return [
        PathInfo(
            path=store.printed(i),
            nar_hash=info.nar_hash,
            nar_size=info.nar_size,
            references=tuple(sorted(store.printed(r) for r in refs)),
        )
        for i, (info, refs) in sorted(results.items(), key=lambda kv: store.printed(kv[0]))
    ]


def _scan_closure(
    store: _Store, roots: Sequence[int], jobs: int
) -> dict[int, tuple[NarInfo, list[int]]]:
    """Scan roots, then whatever they refer to, as soon as it is discovered."""
    results: dict[int, tuple[NarInfo, list[int]]] = {}
    seen = set(roots)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        pending: dict[Future, int] = {pool.submit(store.scan, i): i for i in roots}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    results[i] = fut.result()
                    for r in results[i][1]:
                        if r not in seen:
                            seen.add(r)
                            pending[pool.submit(store.scan, r)] = r
        finally:
            for fut in pending:
                fut.cancel()
    return results


def scan_references(
    store_dir: str | os.PathLike[str], paths: Iterable[str] | None = None, jobs: int | None = None
) -> dict[str, list[str]]:
    """{store path: [store paths it refers to]} for the closure of paths (default: all)."""
    return {p.path: list(p.references) for p in scan_store(store_dir, paths, jobs)}


def closure_sizes(infos: Sequence[PathInfo]) -> dict[str, int]:
    """Sum of narSize over each path's closure (itself included); cycles allowed."""
    import numpy as np  # here, not at module level: `nar-hash` stays numpy-free

    index = {p.path: i for i, p in enumerate(infos)}
    edges = [[index[r] for r in p.references if r in index] for p in infos]
    comp = _components(edges)
    # Closure bitsets per component, children first (Tarjan yields them so).
    ncomp = max(comp, default=-1) + 1
    members: list[list[int]] = [[] for _ in range(ncomp)]
    for v, c in enumerate(comp):
        members[c].append(v)
    bits = [0] * ncomp
    for c in range(ncomp):
        acc = 0
        for v in members[c]:
            acc |= 1 << v
            for w in edges[v]:
                if comp[w] != c:
                    acc |= bits[comp[w]]
        bits[c] = acc
    sizes = np.array([p.nar_size for p in infos], dtype=np.uint64)
    nbytes = (len(infos) + 7) // 8
    out = {}
    for c in range(ncomp):
        # Unpack the bitset and dot it with the sizes: C speed, not a Python loop per bit.
        mask = np.unpackbits(
            np.frombuffer(bits[c].to_bytes(nbytes, "little"), np.uint8), bitorder="little"
        )[: len(infos)]
        total = int(sizes[mask.astype(bool)].sum())
        for v in members[c]:
            out[infos[v].path] = total
    return out


def _components(edges: list[list[int]]) -> list[int]:
    """Tarjan's strongly connected components, iterative; ids in reverse topological order."""
    n = len(edges)
    index = [-1] * n
    low = [0] * n
    on_stack = [False] * n
    comp = [-1] * n
    stack: list[int] = []
    counter = ncomp = 0
    for start in range(n):
        if index[start] >= 0:
            continue
        work = [(start, 0)]
        while work:
            v, k = work.pop()
            if k == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if k < len(edges[v]):
                work.append((v, k + 1))
                w = edges[v][k]
                if index[w] < 0:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    comp[w] = ncomp
                    if w == v:
                        break
                ncomp += 1
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return comp


def graph_json(infos: Sequence[PathInfo]) -> list[dict]:
    """The exportReferencesGraph entries Nix writes (keys in Nix's order)."""
    closure = closure_sizes(infos)
    return [
        {
            "closureSize": closure[p.path],
            "narHash": p.nar_hash,
            "narSize": p.nar_size,
            "path": p.path,
            "references": list(p.references),
        }
        for p in infos
    ]


def write_graph(infos: Sequence[PathInfo], out: TextIO) -> None:
    """Write infos as exportReferencesGraph JSON (a list, as in .attrs.json's value)."""
    json.dump(graph_json(infos), out, indent=2)
    out.write("\n")
