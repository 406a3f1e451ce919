"""Closure graphs: load the formats Nix writes into numpy CSR arrays, checked once.

Formats read (see `load_graph`):
- `exportReferencesGraph` JSON: a list of `{path, references, narSize, narHash,
  closureSize}`, or an attrs file (`.attrs.json`) holding that list under a key;
- `nix path-info --json --recursive`: the list form (Nix < 2.19) and the dict
  form keyed by path (Nix >= 2.19), store paths with or without the store dir;
- a `closureInfo` directory: `store-paths` plus `registration` (the
  `nix-store --load-db` format, with or without narHash/narSize lines).

Row i of the CSR arrays is path `names[i]`; its references are
`indices[indptr[i]:indptr[i+1]]`, deduplicated, self references dropped, in
ascending id order. Every error is one line naming the culprit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import numpy as np

from fastlayer import untrusted
from fastlayer.errors import FastlayerError
from fastlayer.untrusted import MAX_INT, short

DEFAULT_STORE_DIR = "/nix/store"

# (path, references, narSize, narHash, closureSize, deriver): one entry of a graph.
Node = tuple[str, Sequence[str], int, "str | None", "int | None", "str | None"]


@dataclass(eq=False)
class ClosureGraph:
    """A closure graph as CSR arrays; build it with `from_nodes` or `load_graph`."""

    names: list[str]
    indptr: np.ndarray  # int32, len n + 1
    indices: np.ndarray  # int32, references of each row
    nar_size: np.ndarray  # int64
    nar_hash: list[str | None]
    closure_size: np.ndarray | None = None  # int64, when every node had one
    deriver: list[str | None] | None = None
    store_dir: str = DEFAULT_STORE_DIR
    _index: dict[str, int] | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.names)

    def index(self) -> dict[str, int]:
        """Path -> row id (built on first use)."""
        if self._index is None:
            self._index = {name: i for i, name in enumerate(self.names)}
        return self._index

    def references(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def reverse(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR of the referrers (row = path, columns = paths that reference it)."""
        from fastlayer._native import rank

        return rank.transpose(self.indptr, self.indices)

    def total_size(self) -> int:
        return int(self.nar_size.sum())

    def subgraph(self, rows: np.ndarray) -> ClosureGraph:
        """The graph induced on `rows` (in that order): edges between them only."""
        rows = np.asarray(rows, dtype=np.int64)
        k = len(rows)
        local = np.full(self.n, -1, dtype=np.int64)
        local[rows] = np.arange(k)
        src = np.repeat(local, np.diff(self.indptr))
        dst = local[self.indices]
        ok = (src >= 0) & (dst >= 0)
        keys = np.unique(src[ok] * max(k, 1) + dst[ok])
        indptr = np.zeros(k + 1, dtype=np.int32)
        np.cumsum(np.bincount(keys // max(k, 1), minlength=k), out=indptr[1:])
        rl = rows.tolist()
        return ClosureGraph(
            names=[self.names[i] for i in rl],
            indptr=indptr,
            indices=(keys % max(k, 1)).astype(np.int32),
            nar_size=self.nar_size[rows],
            nar_hash=[self.nar_hash[i] for i in rl],
            closure_size=None if self.closure_size is None else self.closure_size[rows],
            deriver=None if self.deriver is None else [self.deriver[i] for i in rl],
            store_dir=self.store_dir,
        )

    @classmethod
    def from_nodes(
        cls,
        nodes: Iterable[Node],
        store_dir: str = DEFAULT_STORE_DIR,
        source: str = "graph",
    ) -> ClosureGraph:
        """Build and check a graph from (path, references, narSize, narHash,
        closureSize, deriver) tuples."""
        cols = list(zip(*nodes, strict=True)) or [()] * 6
        return cls.from_columns(*cols, store_dir=store_dir, source=source)

    @classmethod
    def from_columns(
        cls,
        names: Sequence[str],
        refs: Sequence[Sequence[str]],
        sizes: Sequence[int | None],
        hashes: Sequence[str | None],
        closures: Sequence[int | None],
        derivers: Sequence[str | None],
        store_dir: str = DEFAULT_STORE_DIR,
        source: str = "graph",
    ) -> ClosureGraph:
        """Build and check a graph from one list per field. Every check is a C-level
        pass (map, zip, numpy); Python loops only run to name a culprit."""

        names = list(names)
        n = len(names)
        if not set(map(type, names)) <= {str}:
            bad = next(p for p in names if type(p) is not str)
            raise FastlayerError(f"{source}: bad path {short(bad)}")
        index = dict(zip(names, range(n), strict=True))
        if len(index) != n:
            seen: set[str] = set()
            dup = next(p for p in names if p in seen or seen.add(p))  # type: ignore[func-returns-value]
            raise FastlayerError(f"{source}: duplicate path {dup}")
        _check_store_dir(names, index, store_dir, source)
        if not set(map(type, refs)) <= {list, tuple}:
            bad_i = next(i for i, r in enumerate(refs) if type(r) not in (list, tuple))
            raise FastlayerError(f"{source}: bad references for {names[bad_i]}")
        nar_size = _int_column(sizes, "narSize", names, source, default=0, total=True)
        closure_size = (
            _int_column(closures, "closureSize", names, source)
            if n and None not in closures
            else None
        )
        hashes = _str_column(hashes, "narHash", names, source)
        derivers = _str_column(derivers, "deriver", names, source)

        counts = np.fromiter(map(len, refs), dtype=np.int64, count=n)
        try:
            cols = np.fromiter(
                map(index.__getitem__, chain.from_iterable(refs)),
                dtype=np.int32,
                count=int(counts.sum()),
            )
        except (KeyError, TypeError):
            raise _bad_reference(names, refs, index, source) from None
        return _assembled(
            names, counts, cols, nar_size, hashes, closure_size, list(derivers), store_dir,
            source, index,
        )  # fmt: skip


def _int_column(
    values: Sequence[int | None],
    what: str,
    names: list[str],
    source: str,
    default: int = 0,
    total: bool = False,
) -> np.ndarray:
    """An int64 column; a missing value is `default`, anything else not an int
    in [0, 2^63) is an error naming its path. total: the sum must fit as well
    (plans and layers add these up in int64)."""
    vals = [default if v is None else v for v in values]
    if set(map(type, vals)) <= {int}:
        try:
            arr = np.array(vals, dtype=np.int64) if vals else np.zeros(0, dtype=np.int64)
        except OverflowError:  # past 2^63: found below
            arr = None
        if arr is not None and (not len(arr) or arr.min() >= 0):
            # max * n bounds the sum cheaply; only near the limit add exactly
            if not total or not len(arr) or int(arr.max()) * len(arr) <= MAX_INT:
                return arr
            if sum(vals) <= MAX_INT:
                return arr
            raise FastlayerError(f"{source}: the {what} values add up to more than 2^63 bytes")
    i = next(i for i, v in enumerate(vals) if type(v) is not int or not 0 <= v <= MAX_INT)
    raise FastlayerError(f"{source}: bad {what} {short(vals[i], 40)} for {names[i]}")


def _str_column(
    values: Sequence[str | None], what: str, names: list[str], source: str
) -> list[str | None]:
    """A column of optional strings; any other type is an error naming its path
    (these go into Nix databases as they are)."""
    vals = list(values)
    if not set(map(type, vals)) <= {str, type(None)}:
        i = next(i for i, v in enumerate(vals) if v is not None and type(v) is not str)
        raise FastlayerError(f"{source}: bad {what} {short(vals[i], 40)} for {names[i]}")
    return vals


def _bad_reference(
    names: list[str], refs: Sequence[Sequence[str]], index: dict[str, int], source: str
) -> FastlayerError:
    for path, references in zip(names, refs, strict=True):
        for ref in references:
            if type(ref) is not str:
                return FastlayerError(f"{source}: bad reference {short(ref)} (from {path})")
            if ref not in index:
                return FastlayerError(f"{source}: dangling reference {ref} (from {path})")
    return FastlayerError(f"{source}: bad references")


def _check_store_dir(names: list[str], index: dict[str, int], store_dir: str, source: str) -> None:
    """Every path is one name right under the store dir: not the dir itself, not
    `.` or `..` (which would archive the host's /nix), no control character (a
    newline would corrupt a Nix database or registration); C-level passes only."""
    prefix = store_dir.rstrip("/") + "/"
    depth = prefix.count("/")
    ok = (
        all(map(str.startswith, names, repeat(prefix)))
        and sum(map(str.count, names, repeat("/"))) == depth * len(names)
        and min(map(len, names), default=len(prefix) + 1) > len(prefix)
        and prefix + "." not in index
        and prefix + ".." not in index
        and all(map(str.isprintable, names))
    )
    if ok:
        return
    for name in names:
        base = name[len(prefix) :]
        shown = name if name.isprintable() else short(name)
        if not name.startswith(prefix) or "/" in base or base in ("", ".", ".."):
            raise FastlayerError(f"{source}: path outside the store dir {store_dir}: {shown}")
        if not name.isprintable():
            raise FastlayerError(f"{source}: bad path {short(name)}")


def _check_acyclic(graph: ClosureGraph, source: str) -> None:
    from fastlayer._native import rank

    order = rank.topo_order(graph.indptr, graph.indices)
    if len(order) == graph.n:
        return
    # Every node Kahn could not free keeps a referrer it could not free either, so
    # walking referrers inside that set must come back to a node: a cycle.
    left = np.ones(graph.n, dtype=bool)
    left[order] = False
    rindptr, rindices = graph.reverse()
    v = int(np.flatnonzero(left)[0])
    seen: dict[int, int] = {}
    walk: list[int] = []
    while v not in seen:
        seen[v] = len(walk)
        walk.append(v)
        v = int(next(u for u in rindices[rindptr[v] : rindptr[v + 1]] if left[u]))
    # The walk went against the references: reverse it to read "A -> B" as A references B.
    cycle = [graph.names[i] for i in reversed(walk[seen[v] :])]
    cycle.append(cycle[0])
    raise FastlayerError(f"{source}: cycle between distinct paths: {' -> '.join(cycle)}")


# --- Formats ---------------------------------------------------------------


def load_graph(
    source: str | os.PathLike[str], key: str | None = None, store_dir: str | None = None
) -> ClosureGraph:
    """Load a closure graph from a JSON file (either JSON form) or a closureInfo dir."""
    path = Path(source)
    name = str(source)
    if path.is_dir():
        return _load_closure_info(path, store_dir or default_store_dir())
    # No size cap (real graphs pass 80 MB), but a fifo or device is refused by
    # type; no depth walk either: the loader checks every value's type anyway.
    with untrusted.open_regular(name, "graph") as f:
        graph = _load_native(f, key, store_dir or default_store_dir(), name)
        if graph is not None:
            return graph
        try:
            raw = f.read()
        except MemoryError:  # e.g. a sparse file of many GB: no traceback
            raise FastlayerError(f"cannot read {name}: out of memory") from None
    data = untrusted.parse_json(raw, f"malformed JSON in {name}", max_depth=None)
    return graph_from_json(data, key=key, store_dir=store_dir, source=name)


def _load_native(f: Any, key: str | None, store_dir: str, source: str) -> ClosureGraph | None:
    """The common case, parsed natively into the CSR arrays (no Python object per
    reference). None for anything else, including every error: the general
    loader then reads the file again and names the culprit. The file is mapped,
    not read (a copy of it in fresh memory cost more than the parse); a file
    that shrinks while mapped is caught by the parser, not a crash."""
    from fastlayer._native import graphload

    prefix = store_dir.rstrip("/") + "/"
    if not (store_dir.isascii() and store_dir.isprintable()):
        return None
    if key is not None and not key.isascii():  # the parser keeps ASCII keys only
        return None
    size = os.fstat(f.fileno()).st_size
    cols = graphload.parse_fd(
        f.fileno(),
        size,
        None if key is None else key.encode(),
        store_dir.encode(),
        prefix.encode(),
    )
    return _native_graph(cols, store_dir, source)


def _native_graph(cols: tuple | None, store_dir: str, source: str) -> ClosureGraph | None:
    """A graph from graphload's columns (None passes through)."""

    if cols is None:
        return None
    return _assembled(*cols, store_dir, source)


def _assembled(
    names: list[str], counts: np.ndarray, refs: np.ndarray, nar_size: np.ndarray,
    hashes: list, closure_size: np.ndarray | None, derivers: list, store_dir: str,
    source: str, index: dict[str, int] | None = None,
) -> ClosureGraph:  # fmt: skip
    """The graph of checked columns (refs: row ids, `counts` per row), its rows
    cleaned (no self or repeated references) and checked to have no cycle."""
    from fastlayer._native import rank

    indptr, indices = rank.clean_rows(counts, refs)
    graph = ClosureGraph(
        names=names,
        indptr=indptr,
        indices=indices,
        nar_size=nar_size,
        nar_hash=hashes,
        closure_size=closure_size,
        deriver=derivers if any(d is not None for d in derivers) else None,
        store_dir=store_dir,
        _index=index,
    )
    _check_acyclic(graph, source)
    return graph


def graph_from_json(
    data: Any, key: str | None = None, store_dir: str | None = None, source: str = "graph"
) -> ClosureGraph:
    """Build a graph from already-decoded JSON in any of the supported shapes."""
    if key is not None:
        if not isinstance(data, dict):
            # a second file name taken for KEY is the usual way here
            hint = "; several graphs? --strategy shared" if key.endswith(".json") else ""
            raise FastlayerError(f"{source}: KEY {key!r} given, but the JSON is a "
                                 f"{_kind(data)}, not an object{hint}")  # fmt: skip
        if key not in data:
            raise FastlayerError(f"{source}: no key {key!r} in the JSON object")
        data = data[key]
    elif isinstance(data, dict) and not _looks_like_path_info_dict(data):
        lists = [k for k, v in data.items() if _looks_like_node_list(v)]
        if len(lists) != 1:
            what = "no list of paths" if not lists else f"several lists of paths ({lists})"
            raise FastlayerError(f"{source}: {what} in the JSON object; give KEY")
        data = data[lists[0]]
    if isinstance(data, dict):
        return _from_path_info_dict(data, store_dir, source)
    if isinstance(data, list):
        return _from_node_list(data, store_dir, source)
    raise FastlayerError(f"{source}: expected a list of paths or an object, got {_kind(data)}")


def _kind(x: Any) -> str:
    return type(x).__name__


def _looks_like_node_list(v: Any) -> bool:
    return isinstance(v, list) and (not v or (isinstance(v[0], dict) and "path" in v[0]))


def _looks_like_path_info_dict(d: dict[str, Any]) -> bool:
    first = next(iter(d.items()), None)
    if first is None:
        return False
    k, v = first
    return (v is None or isinstance(v, dict)) and (
        k.startswith("/") or (isinstance(v, dict) and ("narHash" in v or "references" in v))
    )


def default_store_dir() -> str:
    """The store dir Nix itself would use: $NIX_STORE_DIR, else /nix/store."""
    return os.environ.get("NIX_STORE_DIR") or DEFAULT_STORE_DIR


def _int_field(node: dict[str, Any], name: str, path: str, source: str) -> int | None:
    v = node.get(name)
    if v is None or (type(v) is int and 0 <= v <= MAX_INT):
        return v
    raise FastlayerError(f"{source}: bad {name} {short(v, 40)} for {path}")


def _node(path: Any, node: Any, store_dir: str, source: str, base_names: bool) -> Node:
    """One graph entry, checked cheaply (this runs once per path: no per-reference
    Python work here; bad references surface when they are looked up)."""
    if type(path) is not str:
        raise FastlayerError(f"{source}: bad path {path!r}")
    if base_names and not path.startswith("/"):
        path = f"{store_dir}/{path}"
    if type(node) is not dict or node.get("valid") is False:
        raise FastlayerError(f"{source}: path is not valid: {path}")
    refs = node.get("references", [])
    if type(refs) is not list:
        raise FastlayerError(f"{source}: bad references for {path}")
    if base_names and refs and not all(type(r) is str and r.startswith("/") for r in refs):
        # Newer Nix JSON gives store paths as base names (a non-string is
        # reported when references are looked up).
        refs = [f"{store_dir}/{r}" if type(r) is str and r[:1] != "/" else r for r in refs]
    deriver = node.get("deriver")
    if base_names and type(deriver) is str and deriver and not deriver.startswith("/"):
        deriver = f"{store_dir}/{deriver}"
    return (
        path,
        refs,
        _int_field(node, "narSize", path, source) or 0,
        node.get("narHash"),
        _int_field(node, "closureSize", path, source),
        deriver or None,
    )


def _from_node_list(data: list[Any], store_dir: str | None, source: str) -> ClosureGraph:
    """exportReferencesGraph / old path-info lists: one column per field, built by
    list comprehensions (C-speed per path) rather than a function call per path."""
    sd = store_dir or default_store_dir()
    if not set(map(type, data)) <= {dict} or not all(map(dict.__contains__, data, repeat("path"))):
        bad = next(x for x in data if type(x) is not dict or "path" not in x)
        raise FastlayerError(f"{source}: expected objects with a 'path', got {short(bad)}")
    if any(x.get("valid") is False for x in data):
        bad = next(x for x in data if x.get("valid") is False)
        raise FastlayerError(f"{source}: path is not valid: {bad['path']}")
    return ClosureGraph.from_columns(
        [x["path"] for x in data],
        [x.get("references", ()) for x in data],
        [x.get("narSize") for x in data],
        [x.get("narHash") for x in data],
        [x.get("closureSize") for x in data],
        [x.get("deriver") or None for x in data],
        store_dir=sd,
        source=source,
    )


def _from_path_info_dict(data: dict[str, Any], store_dir: str | None, source: str) -> ClosureGraph:
    sd = store_dir or default_store_dir()
    return ClosureGraph.from_nodes(
        (_node(p, v, sd, source, True) for p, v in data.items()), store_dir=sd, source=source
    )


def _load_closure_info(path: Path, store_dir: str) -> ClosureGraph:
    source = str(path)
    graph = _closure_info_native(path, store_dir, source)
    if graph is not None:
        return graph
    store_paths = _read_text(path / "store-paths", source).split()
    lines = _read_text(path / "registration", source).split("\n")
    nodes = list(_parse_registration(lines, source))
    registered = {n[0] for n in nodes}
    for p in store_paths:
        if p not in registered:
            raise FastlayerError(f"{source}: {p} is in store-paths but not in registration")
    if len(store_paths) != len(registered):
        extra = next(iter(registered - set(store_paths)), None)
        if extra is not None:
            raise FastlayerError(f"{source}: {extra} is registered but not in store-paths")
    return ClosureGraph.from_nodes(nodes, store_dir=store_dir, source=source)


def _closure_info_native(path: Path, store_dir: str, source: str) -> ClosureGraph | None:
    """The common case natively (see `_load_native`); None for anything else."""
    from fastlayer._native import graphload

    if not (store_dir.isascii() and store_dir.isprintable()):
        return None
    try:
        with untrusted.open_regular(str(path / "registration"), "closureInfo file") as f:
            reg = f.read()
        with untrusted.open_regular(str(path / "store-paths"), "closureInfo file") as f:
            paths = f.read()
    except FastlayerError:  # the general loader says which and why
        return None
    prefix = store_dir.rstrip("/") + "/"
    return _native_graph(
        graphload.parse_closure_info(reg, paths, prefix.encode()), store_dir, source
    )


def _read_text(file: Path, source: str) -> str:
    """A closureInfo file: a regular file (a fifo would block), UTF-8 text."""
    if not file.exists():
        raise FastlayerError(f"{source}: not a closureInfo directory: no {file.name}")
    with untrusted.open_regular(str(file), "closureInfo file") as f:
        raw = f.read()
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise FastlayerError(f"{source}: {file.name} is not UTF-8 text: {e}") from None


def _parse_registration(lines: list[str], source: str) -> Iterable[Node]:
    """`nix-store --load-db` records: path, [narHash, narSize,] deriver, count, refs."""
    i = 0
    while i < len(lines) and lines[i] == "":
        i += 1
    while i < len(lines):
        if lines[i] == "":
            i += 1
            continue
        try:
            path = lines[i]
            nar_hash: str | None = None
            nar_size = 0
            # With hashes, the line after the path is `algo:digest`; without, a deriver.
            if ":" in lines[i + 1] and not lines[i + 1].startswith("/"):
                nar_hash = lines[i + 1]
                nar_size = int(lines[i + 2])
                i += 3
            else:
                i += 1
            deriver = lines[i] or None
            count = int(lines[i + 1])
            refs = lines[i + 2 : i + 2 + count]
            if len(refs) != count:
                raise IndexError
            i += 2 + count
        except (IndexError, ValueError):
            raise FastlayerError(
                f"{source}: malformed registration record near line {i + 1}"
            ) from None
        yield path, refs, nar_size, nar_hash, None, deriver
