"""Deterministic synthetic closure graphs shaped like a Nix store, and version bumps.

Shape (all sizes scale with `n`):
- a *core* of low-level paths (glibc, gcc-lib, bash, ...) referencing a few
  lower core paths, popular ones more often (skewed towards low ids);
- *clusters* (language ecosystems, package sets) of consecutive paths: each
  path references ~3 core paths, ~6 recent paths of its own cluster and ~1
  "hub" of an earlier cluster, so closures stay a few thousand paths even in a
  store of a million, as in nixpkgs;
- narSize log-normal (median ~40 KiB, a long tail to hundreds of MiB).

Node i only references nodes < i, so the graph is a DAG with the newest paths
on top. Names are `/nix/store/<32 base32 chars>-<pname>-<version>`; the hash
is derived from (seed, id, generation), so a bump renames exactly the paths it
changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

B32 = "0123456789abcdfghijklmnpqrsvwxyz"
PNAMES = (
    "glibc zlib openssl bash coreutils gcc-lib ncurses readline sqlite libffi python3 perl "
    "curl xz bzip2 expat gmp mpfr libxml2 icu boost protobuf grpc libuv nodejs rustc go "
    "openjdk ruby lua tzdata cacert iana-etc util-linux systemd dbus glib gtk3 cairo pango"
).split()


@dataclass
class SynthGraph:
    """Plain arrays: `refs` as CSR (`indptr`, `indices`), plus names and sizes."""

    names: list[str]
    indptr: np.ndarray
    indices: np.ndarray
    nar_size: np.ndarray

    @property
    def n(self) -> int:
        return len(self.names)

    def to_nodes(self) -> list[dict]:
        names = self.names
        ip, ix = self.indptr.tolist(), self.indices.tolist()
        return [
            {
                "path": names[i],
                "references": [names[j] for j in ix[ip[i] : ip[i + 1]]],
                "narSize": int(self.nar_size[i]),
                "narHash": "sha256:" + "0" * 52,
            }
            for i in range(self.n)
        ]

    def write_json(self, path: str, key: str | None = None) -> None:
        """exportReferencesGraph JSON, written in pieces (the 1M graph is ~0.7 GB)."""
        names = self.names
        ip, ix = self.indptr, self.indices
        sizes = self.nar_size.tolist()
        zeros = "0" * 52
        with open(path, "w") as f:
            f.write(f'{{"{key}":[' if key else "[")
            for i in range(self.n):
                refs = ",".join(f'"{names[j]}"' for j in ix[ip[i] : ip[i + 1]].tolist())
                sep = "," if i else ""
                f.write(
                    f'{sep}{{"path":"{names[i]}","references":[{refs}],'
                    f'"narSize":{sizes[i]},"narHash":"sha256:{zeros}"}}'
                )
            f.write("]}" if key else "]")

    def closure(self, roots: Iterable[int]) -> np.ndarray:
        seen = np.zeros(self.n, dtype=bool)
        stack = list(roots)
        seen[stack] = True
        while stack:
            v = stack.pop()
            for c in self.indices[self.indptr[v] : self.indptr[v + 1]].tolist():
                if not seen[c]:
                    seen[c] = True
                    stack.append(c)
        return np.flatnonzero(seen)

    def induced(self, rows: np.ndarray) -> SynthGraph:
        local = np.full(self.n, -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        src = np.repeat(local, np.diff(self.indptr))
        dst = local[self.indices]
        ok = (src >= 0) & (dst >= 0)
        return _csr([self.names[i] for i in rows.tolist()], src[ok], dst[ok], self.nar_size[rows])

    def ancestors(self, rows: Iterable[int]) -> np.ndarray:
        """`rows` and every path above them."""
        src = np.repeat(np.arange(self.n), np.diff(self.indptr))
        rev = SynthGraph(self.names, *_csr_arrays(self.n, self.indices, src), self.nar_size)
        return rev.closure(rows)


def _csr_arrays(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = np.unique(src.astype(np.int64) * n + dst)
    indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(keys // n, minlength=n), out=indptr[1:])
    return indptr, (keys % n).astype(np.int32)


def _csr(names: list[str], src: np.ndarray, dst: np.ndarray, sizes: np.ndarray) -> SynthGraph:
    n = len(names)
    keep = src != dst
    indptr, indices = _csr_arrays(max(n, 1), src[keep], dst[keep])
    return SynthGraph(names, indptr[: n + 1], indices, np.asarray(sizes, dtype=np.int64))


def store_hash(seed: int, i: int | str, generation: int) -> str:
    d = hashlib.blake2b(f"{seed}/{i}/{generation}".encode(), digest_size=20).digest()
    v = int.from_bytes(d, "big")
    return "".join(B32[(v >> (5 * k)) & 31] for k in range(32))


def path_name(seed: int, i: int, generation: int, rng_pick: int) -> str:
    pname = PNAMES[rng_pick % len(PNAMES)]
    return f"/nix/store/{store_hash(seed, i, generation)}-{pname}-{i % 97}.{rng_pick % 13}"


def generate(
    n: int,
    seed: int = 1,
    core: int | None = None,
    cluster: int = 2000,
    mean_refs: float = 10.0,
) -> SynthGraph:
    """A store-shaped DAG of `n` paths with about `mean_refs * n` references."""
    rng = np.random.default_rng(seed)
    core = core if core is not None else max(1, min(2000, n // 20))
    core = min(core, n)
    ids = np.arange(n, dtype=np.int64)
    srcs, dsts = [], []

    # Core: up to 4 references to lower core paths, skewed to the most basic ones.
    c_ids = ids[1:core]
    k = np.minimum(c_ids, 4)
    s = np.repeat(c_ids, k)
    srcs.append(s)
    dsts.append(np.floor(s * rng.random(len(s)) ** 3).astype(np.int64))

    rest = ids[core:]
    if len(rest):
        pos = (rest - core) % cluster  # position inside the cluster
        cstart = rest - pos
        # ~30% of the references go to the core (popular core paths most).
        k = rng.poisson(0.3 * mean_refs, len(rest))
        s = np.repeat(rest, k)
        srcs.append(s)
        dsts.append(np.floor(core * rng.random(len(s)) ** 3).astype(np.int64))
        # ~60% to recent paths of the same cluster (a window of 300).
        k = np.where(pos > 0, rng.poisson(0.6 * mean_refs, len(rest)), 0)
        s = np.repeat(rest, k)
        p = np.repeat(np.minimum(pos, 300), k)
        srcs.append(s)
        dsts.append(s - 1 - np.floor(p * rng.random(len(s)) ** 2).astype(np.int64))
        # ~10% to one of the first 20 "hub" paths of an earlier cluster.
        # Hubs themselves only use the core, so closures do not chain across clusters.
        k = np.where((cstart > core) & (pos >= 20), rng.poisson(0.1 * mean_refs, len(rest)), 0)
        s = np.repeat(rest, k)
        cs = np.repeat(cstart, k)
        nclusters_before = (cs - core) // cluster
        other = np.floor(nclusters_before * rng.random(len(s))).astype(np.int64)
        hub = core + other * cluster + rng.integers(0, 20, len(s))
        srcs.append(s)
        dsts.append(np.minimum(hub, s - 1))

    src = np.concatenate(srcs) if srcs else np.empty(0, dtype=np.int64)
    dst = np.concatenate(dsts) if dsts else np.empty(0, dtype=np.int64)
    picks = rng.integers(0, 1 << 30, n)
    names = [path_name(seed, i, 0, int(picks[i])) for i in range(n)]
    sizes = np.exp(rng.normal(np.log(40_000), 2.0, n)).astype(np.int64) + 1000
    return _csr(names, src, dst, sizes)


def image(store: SynthGraph, apps: Iterable[int]) -> SynthGraph:
    """The closure of `apps` inside `store`, as its own graph."""
    return store.induced(store.closure(list(apps)))


def bump(g: SynthGraph, changed: Iterable[int], generation: int, seed: int = 7) -> SynthGraph:
    """A new build where `changed` paths changed: they and all their ancestors get
    new hashes (as in Nix); the changed paths' own sizes move by up to 5%."""
    changed = list(changed)
    renamed = g.ancestors(changed)
    names = list(g.names)
    for i in renamed.tolist():
        tail = names[i].split("-", 1)[1]
        names[i] = f"/nix/store/{store_hash(seed, names[i], generation)}-{tail}"
    sizes = g.nar_size.copy()
    rng = np.random.default_rng(generation)
    sizes[changed] = (sizes[changed] * rng.uniform(0.95, 1.05, len(changed))).astype(np.int64)
    return SynthGraph(names, g.indptr, g.indices, sizes)


def dump_nodes(g: SynthGraph) -> str:
    return json.dumps(g.to_nodes())
