"""What we know a registry holds, so a re-push can HEAD before compressing.

`$XDG_CACHE_HOME/fastlayer/registry-blobs.json` (default `~/.cache/...`):

    {"REGISTRY": {"layers": {"gzip:sha256:<diff_id>": {"digest", "size", "mediaType"}},
                  "repos": {"sha256:<blob>": ["team/app", ...]}}}

`layers` maps a layer's uncompressed digest (diff_id) and compression to
the blob that carries it; `repos` where a blob was last pushed or pulled,
for cross-repository mounts. It is only a hint: every entry is checked by
a HEAD (or a mount that may fail) before it is trusted, so a stale or lost
cache costs time, never correctness. Writes are atomic (rename); concurrent
runs may lose each other's additions, which is harmless.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass

from fastlayer import untrusted

_REPO = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
MAX_ENTRIES = 20000  # per registry and table; the oldest go first


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastlayer", "registry-blobs.json")


class BlobCache:
    def __init__(self, registry: str, path: str | None = None):
        self.registry = registry
        self.path = path or cache_path()
        self._lock = threading.Lock()
        self._dirty = False
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            self._all = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._all = {}
        mine = self._all.setdefault(registry, {})
        self.layers: dict = mine.setdefault("layers", {})
        self.repos: dict = mine.setdefault("repos", {})

    def layer(self, diff_id: str, kind: str) -> Blob | None:
        with self._lock:
            e = self.layers.get(f"{kind}:{diff_id}")
        if not isinstance(e, dict):
            return None
        try:  # only a hint, but its digest goes into a URL: checked like any other
            digest = untrusted.digest(e.get("digest"), "cache")
            size = untrusted.integer(e.get("size"), "cache")
            return Blob(digest, size, untrusted.of_type(e.get("mediaType"), str, "cache"))
        except untrusted.Invalid:
            return None

    def repos_with(self, digest: str) -> list[str]:
        with self._lock:
            repos = self.repos.get(digest)
        return (
            [r for r in repos if isinstance(r, str) and _REPO.fullmatch(r)]
            if isinstance(repos, list)
            else []
        )

    def knows_repo(self, repo: str) -> bool:
        """Whether any blob is remembered in repo (it was pushed or pulled from here)."""
        with self._lock:
            return any(repo in repos for repos in self.repos.values())

    def remember(self, repo: str, blob: Blob, diff_id: str | None = None, kind: str = "") -> None:
        with self._lock:
            if diff_id and kind:
                key = f"{kind}:{diff_id}"
                self.layers.pop(key, None)  # re-insert: most recent last
                self.layers[key] = {
                    "digest": blob.digest, "size": blob.size, "mediaType": blob.media_type
                }  # fmt: skip
            repos = [r for r in self.repos.pop(blob.digest, []) if r != repo]
            self.repos[blob.digest] = [repo, *repos][:8]
            self._dirty = True

    def save(self) -> None:
        """Write the cache atomically; a failure to write it is not the user's problem."""
        with self._lock:
            if not self._dirty:
                return
            for table in (self.layers, self.repos):
                for key in list(table)[: max(0, len(table) - MAX_ENTRIES)]:
                    del table[key]
            data = json.dumps(self._all, separators=(",", ":"))
            self._dirty = False
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".blobs-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            except OSError:
                os.unlink(tmp)
