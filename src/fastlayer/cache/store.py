"""The cache directory: one small JSON entry per recipe key, written atomically.

    ROOT/layers/v1/<key[:2]>/<key>.json
      {"key": "<key>", "diff_id": "sha256:...", "size": N,
       "blobs": {"gzip/2-isal-1.9.1-1048576": {"digest": "sha256:...", "size": M}, ...}}

The directory is ours but read like any input: an entry must be a regular
file of at most MAX_ENTRY bytes holding exactly that shape, else it is
removed with a warning and the layer is built as if never seen. Writes go
to a temporary file renamed over the entry, so concurrent builds see an old
entry or a new one, never half of one; two builds writing the same key
write the same facts. A cache that cannot be written (read-only, full disk,
no permission) warns once and the build goes on without caching. Use
refreshes an entry's mtime: `fastlayer cache prune` removes the least
recently used first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from fastlayer import untrusted
from fastlayer.errors import FastlayerError

VERSION = "v1"
MAX_ENTRY = 64 << 10  # an entry holds a few digests: anything larger is not ours
_KEY = re.compile(r"[0-9a-f]{64}")
# a compression and what fixes its bytes (sinks.compress.blob_kind)
_KIND = re.compile(r"[a-z0-9]+/[0-9A-Za-z._+-]{1,60}")


@dataclass
class Entry:
    """What a recipe produced: the uncompressed layer, and its blob per compression."""

    diff_id: str
    size: int
    blobs: dict[str, tuple[str, int]] = field(default_factory=dict)  # kind -> (digest, size)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    dropped: int = 0  # damaged or stale entries removed
    written: int = 0


class LayerCache:
    def __init__(self, root: str):
        self.root = root
        self.dir = os.path.join(root, "layers", VERSION)
        self.stats = CacheStats()
        self.writable = True
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------

    def path(self, key: str) -> str:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a cache key: {key!r}")
        return os.path.join(self.dir, key[:2], key + ".json")

    def get(self, key: str) -> Entry | None:
        """The entry of key, checked; None if absent or damaged (then removed)."""
        path = self.path(key)
        if not os.path.lexists(path):
            self._count(misses=1)
            return None
        try:
            with untrusted.open_regular(path, "layer cache entry") as f:
                raw = f.read(MAX_ENTRY + 1)
        except (OSError, FastlayerError) as e:  # a dangling link, a loop, a fifo...
            self.drop(key, str(e))
            self._count(misses=1)
            return None
        try:
            if len(raw) > MAX_ENTRY:
                raise untrusted.Invalid(f"over {MAX_ENTRY} bytes")
            entry = _entry(untrusted.parse_json(raw, path), path, key)
        except untrusted.Invalid as e:
            self.drop(key, str(e))
            self._count(misses=1)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: pruned last
        self._count(hits=1)
        return entry

    # -- writing ----------------------------------------------------------------------

    def put(self, key: str, entry: Entry) -> None:
        """Record entry (its blobs added to those already known); never fails a build."""
        if not self.writable:
            return
        path = self.path(key)
        old = self._peek(path)
        if old is not None and old.diff_id == entry.diff_id and old.size == entry.size:
            if all(old.blobs.get(k) == v for k, v in entry.blobs.items()):
                return  # nothing new to say
            entry = Entry(entry.diff_id, entry.size, {**old.blobs, **entry.blobs})
        data = {
            "key": key,  # an entry copied or renamed to another key is not believed
            "diff_id": entry.diff_id,
            "size": entry.size,
            "blobs": {k: {"digest": d, "size": s} for k, (d, s) in sorted(entry.blobs.items())},
        }
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".entry-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            self._unwritable(e)
            return
        self._count(written=1)

    def drop(self, key: str, why: str, *, quiet: bool = False) -> None:
        """Remove a damaged or stale entry, saying so once on stderr (quiet: the
        caller's error says so)."""
        path = self.path(key)
        try:
            os.unlink(path)
        except IsADirectoryError:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # an empty directory in an entry's place
        except OSError:
            pass
        self._count(dropped=1)
        if quiet:
            return
        warn(f"layer cache entry {path} dropped ({untrusted.short(why, 200)}); "
             "the layer is built afresh")  # fmt: skip

    def _peek(self, path: str) -> Entry | None:
        if not os.path.lexists(path):
            return None
        try:
            with untrusted.open_regular(path, "layer cache entry") as f:
                key = os.path.basename(path).removesuffix(".json")
                return _entry(untrusted.parse_json(f.read(MAX_ENTRY), path), path, key)
        except (OSError, FastlayerError):
            return None

    def _unwritable(self, e: OSError) -> None:
        with self._lock:
            if not self.writable:
                return
            self.writable = False
        reason = e.strerror or str(e)
        warn(f"layer cache {self.root} cannot be written ({reason}); building without caching")

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    # -- maintenance ------------------------------------------------------------------

    def entries(self) -> list[tuple[str, int, float]]:
        """(path, bytes, last use) of every entry file."""
        found = []
        with contextlib.suppress(OSError):
            for sub in os.scandir(self.dir):
                if not sub.is_dir(follow_symlinks=False):
                    continue
                for e in os.scandir(sub.path):
                    if e.name.endswith(".json") and e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        found.append((e.path, st.st_size, st.st_mtime))
        return found

    def prune(self, max_bytes: int | None = None, older_than: float | None = None) -> int:
        """Remove entries unused for older_than seconds, then the least recently
        used until at most max_bytes remain; returns how many went."""
        found = sorted(self.entries(), key=lambda x: x[2])
        now = time.time()
        total = sum(x[1] for x in found)
        removed = 0
        for path, size, used in found:
            old = older_than is not None and now - used > older_than
            big = max_bytes is not None and total > max_bytes
            if not (old or big):
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed += 1
                total -= size
        return removed


def warn(message: str) -> None:
    print(f"fastlayer: warning: {message}", file=sys.stderr)


def _entry(doc: object, where: str, key: str) -> Entry:
    doc = untrusted.of_type(doc, dict, where)
    if doc.get("key") != key:
        raise untrusted.Invalid(
            f"{where}: written for another key, {untrusted.short(doc.get('key'))}"
        )
    diff_id = untrusted.digest(untrusted.field(doc, "diff_id", str, where), f"{where}: diff_id")
    size = untrusted.integer(doc.get("size"), f"{where}: size", 0, untrusted.MAX_INT)
    blobs: dict[str, tuple[str, int]] = {}
    raw_blobs = untrusted.field(doc, "blobs", dict, where, {})
    for kind, blob in raw_blobs.items():
        at = f"{where}: blobs[{untrusted.short(kind, 40)}]"
        if not _KIND.fullmatch(kind):
            raise untrusted.Invalid(f"{at}: not a compression kind")
        blob = untrusted.of_type(blob, dict, at)
        digest = untrusted.digest(untrusted.field(blob, "digest", str, at), f"{at}: digest")
        blobs[kind] = (digest, untrusted.integer(blob.get("size"), f"{at}: size", 0,
                                                 untrusted.MAX_INT))  # fmt: skip
    return Entry(diff_id, size, blobs)
