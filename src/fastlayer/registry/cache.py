"""What we know a registry holds, so a re-push can HEAD before compressing.

`registry-blobs.json` in the cache directory (`$FASTLAYER_CACHE`, else
`$XDG_CACHE_HOME/fastlayer`, else `~/.cache/fastlayer`):

    {"REGISTRY": {"layers": {"gzip:sha256:<diff_id>": {"digest", "size", "mediaType"}},
                  "repos": {"sha256:<blob>": ["team/app", ...]}}}

`layers` maps a layer's uncompressed digest (diff_id) and compression to
the blob that carries it; `repos` where a blob was last pushed or pulled,
for cross-repository mounts. It is only a hint: every entry is checked by
a HEAD (or a mount that may fail) before it is trusted, so a stale, lost
or broken cache costs time, never correctness.

The file is untrusted like any input: read only if it is a regular file of
at most 64 MiB, every entry's types and digests checked, a bad entry (or a
bad file) dropped with one warning line, never an error. Writes are atomic
(a temporary file renamed over it); under a lock file, a save re-reads the
file and adds this run's entries, so concurrent runs keep each other's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from fastlayer import untrusted
from fastlayer.errors import FastlayerError

_REPO = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_KINDS = ("gzip", "zstd", "none")
MAX_ENTRIES = 20000  # per registry and table; the oldest go first
MAX_REPOS = 8  # repositories remembered per blob
MAX_FILE = 64 << 20  # far above 20000 entries per table of a few registries
MAX_MEDIA_TYPE = 255  # RFC 6838's limit on a media type's length
LOCK_WAIT = 2.0  # seconds a save waits for another run's save, then writes anyway
WHAT = "registry blob cache"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str


def cache_path() -> str:
    from fastlayer.cachedir import default_root

    return os.path.join(default_root(), "registry-blobs.json")


class BlobCache:
    def __init__(
        self, registry: str, path: str | None = None, warn: bool = True, persist: bool = True
    ):
        """persist=False (--no-cache): nothing read from or saved to a file."""
        self.registry = registry
        self.path = path or cache_path()
        self.persist = persist
        self._lock = threading.Lock()
        self._added: list[tuple[str, Blob, str]] = []  # (repo, blob, "kind:diff_id" or "")
        data, problem = load(self.path) if persist else ({}, "")
        if problem and warn:
            print(f"fastlayer: warning: {problem} (only a hint: carrying on)", file=sys.stderr)
        mine = data.get(registry, {})
        self.layers: dict[str, Blob] = mine.get("layers", {})
        self.repos: dict[str, list[str]] = mine.get("repos", {})

    def layer(self, diff_id: str, kind: str) -> Blob | None:
        with self._lock:
            return self.layers.get(f"{kind}:{diff_id}")

    def repos_with(self, digest: str) -> list[str]:
        with self._lock:
            return list(self.repos.get(digest, []))

    def knows_repo(self, repo: str) -> bool:
        """Whether any blob is remembered in repo (it was pushed or pulled from here)."""
        with self._lock:
            return any(repo in repos for repos in self.repos.values())

    def remember(self, repo: str, blob: Blob, diff_id: str | None = None, kind: str = "") -> None:
        key = f"{kind}:{diff_id}" if diff_id and kind else ""
        with self._lock:
            _add(self.layers, self.repos, repo, blob, key)
            self._added.append((repo, blob, key))

    def save(self) -> None:
        """Add this run's entries to the file as it is now, atomically; a failure to
        write it is not the user's problem (the next run just knows less)."""
        with self._lock:
            added, self._added = self._added, []
        if not added or not self.persist:
            return
        from fastlayer.cachedir import home_missing

        if self.path == cache_path() and home_missing():
            return  # no home to keep a cache in (a Nix build): never create one
        directory = os.path.dirname(self.path)
        with contextlib.suppress(OSError):
            os.makedirs(directory, exist_ok=True)
            with _locked(self.path + ".lock"):
                data, _ = load(self.path)  # another run may have saved since we loaded
                tables = data.setdefault(self.registry, {"layers": {}, "repos": {}})
                for repo, blob, key in added:
                    _add(tables["layers"], tables["repos"], repo, blob, key)
                _write(self.path, _dump(data))


def _add(layers: dict, repos: dict, repo: str, blob: Blob, key: str) -> None:
    if key:
        layers.pop(key, None)  # re-insert: most recent last
        layers[key] = blob
    others = [r for r in repos.pop(blob.digest, []) if r != repo]
    repos[blob.digest] = [repo, *others][:MAX_REPOS]


# -- reading: every entry checked --------------------------------------------------------


def load(path: str) -> tuple[dict[str, dict[str, dict]], str]:
    """{registry: {"layers": {key: Blob}, "repos": {digest: [repo]}}} of the entries
    that check out, and what was wrong ("" if nothing): never raises, never blocks."""
    if not os.path.lexists(path):
        return {}, ""
    where = f"{WHAT} {path}"
    try:
        with untrusted.open_regular(path, WHAT) as f:  # a fifo is refused, not waited on
            data = untrusted.parse_json(untrusted.read_capped(f, where, MAX_FILE), where)
        top = untrusted.of_type(data, dict, where)
    except (FastlayerError, OSError) as e:
        return {}, f"{e}; not used"
    out: dict[str, dict[str, dict]] = {}
    dropped = 0
    for registry, tables in top.items():
        mine, bad = _registry_tables(tables)
        out[registry] = mine
        dropped += bad
    noun = "entry" if dropped == 1 else "entries"
    return out, f"{where}: {dropped} malformed {noun} dropped" if dropped else ""


def _registry_tables(tables: object) -> tuple[dict[str, dict], int]:
    """One registry's layers and repos tables, and how many entries were dropped."""
    layers: dict[str, Blob] = {}
    repos: dict[str, list[str]] = {}
    if not isinstance(tables, dict):
        return {"layers": layers, "repos": repos}, 1
    dropped = 0
    raw_layers, raw_repos = tables.get("layers", {}), tables.get("repos", {})
    for raw, table, check in ((raw_layers, layers, _layer), (raw_repos, repos, _repo_list)):
        if not isinstance(raw, dict):
            dropped += 1
            continue
        for key, value in raw.items():
            entry = check(key, value)
            if entry is None:
                dropped += 1
            else:
                table[key] = entry
    return {"layers": layers, "repos": repos}, dropped


def _layer(key: str, value: object) -> Blob | None:
    """A layers entry: key "kind:digest", value a blob descriptor; None if malformed."""
    kind, _, diff_id = key.partition(":")
    try:
        if kind not in _KINDS:
            return None
        untrusted.digest(diff_id, WHAT)
        d = untrusted.of_type(value, dict, WHAT)
        media_type = untrusted.of_type(d.get("mediaType"), str, WHAT)
        if len(media_type) > MAX_MEDIA_TYPE or not media_type.isprintable():
            return None
        # its digest goes into a URL: checked like any other
        digest = untrusted.digest(d.get("digest"), WHAT)
        return Blob(digest, untrusted.integer(d.get("size"), WHAT), media_type)
    except untrusted.Invalid:
        return None


def _repo_list(key: str, value: object) -> list[str] | None:
    """A repos entry: key a blob digest, value repository names; None if malformed."""
    try:
        untrusted.digest(key, WHAT)
        names = untrusted.str_list(value, WHAT)
    except untrusted.Invalid:
        return None
    if len(names) > MAX_REPOS or not all(_REPO.fullmatch(n) for n in names):
        return None
    return names


# -- writing ----------------------------------------------------------------------------


def _dump(data: dict[str, dict[str, dict]]) -> str:
    out: dict[str, dict] = {}
    for registry, tables in data.items():
        layers = _newest(tables["layers"])
        out[registry] = {
            "layers": {
                k: {"digest": b.digest, "size": b.size, "mediaType": b.media_type}
                for k, b in layers.items()
            },
            "repos": _newest(tables["repos"]),
        }
    return json.dumps(out, separators=(",", ":"))


def _newest(table: dict) -> dict:
    """The last MAX_ENTRIES entries (insertion order is age: remember re-inserts)."""
    keys = list(table)[-MAX_ENTRIES:]
    return {k: table[k] for k in keys}


def _write(path: str, text: str) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".blobs-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive flock on path for a while; after LOCK_WAIT, or if path is no
    regular file we can lock, go on without it (lost entries cost only time)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)  # fmt: skip
    except OSError:
        yield
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            end = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > end:
                        break
                    time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock
