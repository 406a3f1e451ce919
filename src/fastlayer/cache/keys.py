"""Recipe keys: blake3 over everything a layer's bytes are a function of.

Every key starts with FORMAT, the version of the tar fastlayer emits for a
recipe: bump it whenever the same recipe would give other bytes. Then the
owner rules (mtime, uid, gid, names, permission rules) and the inputs:

- store paths: each path's name (Nix makes it a content address) and an
  lstat of its root (type, inode, size, mtime, ctime), so a path deleted,
  re-substituted or replaced gets a new key. Files below a store path are
  not looked at: store paths are immutable, which is what makes a warm
  build cost one lstat per path.
- other files (`[[layers]]`, `roots`): every entry's archive name and lstat
  fingerprint (type and mode, inode, size, mtime_ns, ctime_ns) and each
  symlink's target, gathered by a walk that reads no file.
- base layers, verified once: the file's identity (device, inode, size,
  mtime_ns, ctime_ns), the region and the diff_id it was checked against.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence

from blake3 import blake3

FORMAT = b"fastlayer layer tar 1\0"  # nixpkgs' PAX layout (emit.py, csrc/tarhdr.c)


def _fields(h: blake3, *values: object) -> None:
    # length-prefixed so that no two field lists hash alike
    for v in values:
        b = v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogateescape")
        h.update(len(b).to_bytes(8, "little") + b)


def _stat(h: blake3, st: os.stat_result) -> None:
    _fields(h, st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _owner(h: blake3, owner: object, rules: Sequence[object]) -> None:
    o = owner
    _fields(h, o.mtime, o.uid, o.gid, o.uname, o.gname)  # type: ignore[attr-defined]
    _fields(h, len(rules), *(repr(r) for r in rules))


def store_layer_key(paths: Sequence[str], owner: object, root: str | None = None) -> str | None:
    """The key of a store layer; None when a path is missing (the walk says which)."""
    h = blake3(FORMAT + b"store\0")
    _owner(h, owner, ())
    _fields(h, root or "", len(paths))
    prefix = root.rstrip("/") if root else ""
    for p in paths:
        try:
            st = os.lstat(prefix + p)
        except OSError:
            return None
        _fields(h, p)
        _stat(h, st)
    return h.hexdigest()


def store_layer_portable_key(
    paths: Sequence[str], owner: object, nar_hashes: dict[str, str | None]
) -> str:
    """The key of a store layer that any machine computes alike (a registry-shared
    cache): each path's name and, where the closure graph gives it, its narHash
    (so two machines whose builds of one path differ do not share its layer);
    nothing of the local file system."""
    h = blake3(FORMAT + b"store portable\0")
    _owner(h, owner, ())
    _fields(h, len(paths))
    for p in paths:
        _fields(h, p, nar_hashes.get(p) or "")
    return h.hexdigest()


def _files_hash(
    kind: bytes, lead_dirs: Sequence[str], roots: Sequence[tuple[str, str]], owner: object,
    rules: Sequence[object],
) -> blake3:  # fmt: skip
    """A hasher started on what both keys of a file layer share."""
    h = blake3(FORMAT + kind)
    _owner(h, owner, rules)
    _fields(h, len(lead_dirs), *lead_dirs, len(roots))
    return h


def file_layer_key(
    lead_dirs: Sequence[str], roots: Sequence[tuple[str, str]], owner: object,
    rules: Sequence[object],
) -> str | None:  # fmt: skip
    """The key of a layer walked from disk; None when an entry cannot be read."""
    h = _files_hash(b"files\0", lead_dirs, roots, owner, rules)
    try:
        for fs, arc in roots:
            _fields(h, arc)
            for rel, st, target in _walk(fs):
                _fields(h, rel, target)
                _stat(h, st)
    except OSError:
        return None
    return h.hexdigest()


def file_layer_content_key(
    lead_dirs: Sequence[str], roots: Sequence[tuple[str, str]], owner: object,
    rules: Sequence[object],
) -> str | None:  # fmt: skip
    """The key of a layer walked from disk by what its bytes depend on: names,
    types and modes, symlink targets and file contents (blake3, on every core
    for big files), not inodes or times. It costs a read of every file, so it
    is asked only when the stat key missed and a skip would save more (a fresh
    checkout pushed again). None when an entry cannot be read."""
    h = _files_hash(b"file contents\0", lead_dirs, roots, owner, rules)
    try:
        for fs, arc in roots:
            _fields(h, arc)
            for rel, st, target in _walk(fs):
                _fields(h, rel, st.st_mode, target)
                if stat.S_ISREG(st.st_mode):
                    path = os.path.join(fs, rel.lstrip("/")) if rel else fs
                    _fields(h, st.st_size, _content(path, st))
    except OSError:
        return None
    return h.hexdigest()


def _content(path: str, st: os.stat_result) -> bytes:
    big = st.st_size >= (1 << 22)  # threads pay off only on large files
    h = blake3(max_threads=blake3.AUTO) if big else blake3()
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_ino != st.st_ino:
            raise OSError(f"{path} was replaced while it was hashed")
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def _walk(top: str) -> Iterable[tuple[str, os.stat_result, str]]:
    """(path relative to top, lstat, symlink target or "") of top and all below it,
    in a fixed order; symlinked directories are not entered (as the layer walk)."""
    stack = [("", top)]
    while stack:
        rel, path = stack.pop()
        st = os.lstat(path)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        yield rel, st, target
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as it:
                names = sorted(e.name for e in it)
            stack.extend((f"{rel}/{n}", os.path.join(path, n)) for n in reversed(names))


def base_region_key(path: str, offset: int, size: int, diff_id: str) -> str | None:
    """The key under which a base layer's region is remembered as verified."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    h = blake3(FORMAT + b"verified base region\0")
    _fields(h, os.path.realpath(path), st.st_dev, st.st_ino, st.st_size)
    _fields(h, st.st_mtime_ns, st.st_ctime_ns, offset, size, diff_id)
    return h.hexdigest()
