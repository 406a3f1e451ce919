"""A layer cache shared through a registry (`--cache-repo`, `--cache-from`, `--cache-to`).

One entry per portable recipe key (keys.py: store path names and narHashes,
or file names, modes and contents: nothing of one machine's inodes or
times), stored in the cache repository as a small OCI artifact tagged by
the key (64 hex):

    {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "artifactType": ARTIFACT,
     "config": EMPTY descriptor ("{}"),
     "layers": [the layer blob per kind, annotated with its kind],
     "annotations": {"org.fastlayer.cache.diff-id": "sha256:...",
                     "org.fastlayer.cache.size": "N"}}

The manifest names the blob, so the registry keeps it while the tag lives,
and one GET per key answers a lookup (no second request for a config blob).
Per-key tags rather than one index: writers never race on a shared
document, and lookups run in parallel (a bounded pool).

Everything read is untrusted (untrusted.py): size-capped, types and
digests checked. An entry is a hint: the sink acts on it only where the
registry confirms it, and a hint that fails is dropped with one warning and
the layer built. The confirmation is one HEAD of each blob in the cache
repository per run (source_size), shared by every image of a batch: the
registry mounts a blob only by its digest, and the digest fixes the size,
so a blob mounted from there is the one that HEAD measured and needs no
HEAD of its own in each target (the registry does not check the sizes a
manifest claims: a wrong one would make a broken image). Failures
to read or write the cache repository (refused artifact, auth, network)
warn once and the build goes on without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from fastlayer import untrusted
from fastlayer.cache.store import Entry
from fastlayer.errors import FastlayerError
from fastlayer.model import (
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    MT_OCI_MANIFEST,
)
from fastlayer.registry.client import Registry, RegistryError
from fastlayer.registry.reference import Reference, parse_reference

ARTIFACT = "application/vnd.fastlayer.cache.entry.v1+json"
MT_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY).hexdigest()
ANN_DIFF_ID = "org.fastlayer.cache.diff-id"
ANN_SIZE = "org.fastlayer.cache.size"
ANN_KIND = "org.fastlayer.cache.kind"
MAX_MANIFEST = 64 << 10  # an entry is a few descriptors
MAX_BLOBS = 8  # kinds per entry
LOOKUPS = 8  # parallel requests
_KEY = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[a-z0-9]+/[0-9A-Za-z._+-]{1,60}")
_SIZE = re.compile(r"[0-9]{1,19}")
MEDIA_TYPES = {"none": MT_OCI_LAYER, "gzip": MT_OCI_LAYER_GZIP, "zstd": MT_OCI_LAYER_ZSTD}


@dataclass
class RemoteStats:
    asked: int = 0
    hits: int = 0
    written: int = 0
    failed: int = 0  # hints that did not hold (blob missing, wrong size)


@dataclass
class Hit:
    entry: Entry
    media_types: dict[str, str] = field(default_factory=dict)  # kind -> blob media type


def cache_ref(text: str, flag: str) -> Reference:
    """docker://REG/REPO for a cache flag: a repository, no tag or digest."""
    ref = parse_reference(text)
    if ref.tag or ref.digest:
        raise FastlayerError(f"{flag} {text}: name a repository, without a tag or digest")
    return ref


class RegistryCache:
    """The registry side of a layer cache: read from `source`, write to `target`
    (the same repository with --cache-repo)."""

    def __init__(
        self, source: Reference | None, target: Reference | None, *, insecure: bool = False,
        timeout: float | None = None, stall: float | None = None,
    ):  # fmt: skip
        self.source, self.target = source, target
        self.insecure, self.timeout, self.stall = insecure, timeout, stall
        self.stats = RemoteStats()
        self.hits: dict[str, Hit] = {}  # key -> what the source repository said
        self.blob_sources: dict[str, str] = {}  # blob digest of a hit -> source repository
        self._regs: dict[tuple[str, str], Registry] = {}
        self._owned: list[Registry] = []
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._read_off = self._write_off = False
        self._fetch_off = False  # its blobs cannot be read (blob_chunks)
        self._empty_in: set[str] = set()  # repositories known to hold the "{}" config
        self._sizes: dict[tuple[str, str], Future] = {}  # (repository, blob) -> size: HEAD

    @classmethod
    def from_flags(
        cls, repo: str | None = None, cache_from: str | None = None, cache_to: str | None = None,
        **kw: object,
    ) -> RegistryCache | None:  # fmt: skip
        """The cache the flags name, or None when none does."""
        src = cache_ref(cache_from, "--cache-from") if cache_from else None
        dst = cache_ref(cache_to, "--cache-to") if cache_to else None
        if repo:
            both = cache_ref(repo, "--cache-repo")
            src, dst = src or both, dst or both
        if src is None and dst is None:
            return None
        return cls(src, dst, **kw)  # type: ignore[arg-type]

    # -- registries -------------------------------------------------------------------

    def _reg(self, ref: Reference) -> Registry:
        at = (ref.registry, ref.api_host)
        with self._lock:
            reg = self._regs.get(at)
            if reg is None:
                reg = Registry(ref.registry, ref.api_host, self.insecure, pool=LOOKUPS + 2,
                               timeout=self.timeout, stall=self.stall)  # fmt: skip
                self._regs[at] = reg
                self._owned.append(reg)
        return reg

    def same_registry(self, ref: Reference, other: Reference | None) -> bool:
        return other is not None and (ref.registry, ref.api_host) == (
            other.registry,
            other.api_host,
        )

    def close(self) -> None:
        for reg in self._owned:
            reg.close()
        self._owned.clear()

    def warn(self, message: str) -> None:
        with self._lock:
            if message in self._warned:
                return
            self._warned.add(message)
        print(f"fastlayer: warning: {message}", file=sys.stderr)

    # -- reading ----------------------------------------------------------------------

    def lookup(self, keys: list[str]) -> dict[str, Hit]:
        """The entries of keys the source repository holds (absent ones: a miss)."""
        src = self.source
        todo = [k for k in dict.fromkeys(keys) if k not in self.hits]
        if src is None or self._read_off or not todo:
            return {k: self.hits[k] for k in keys if k in self.hits}
        reg = self._reg(src)
        with ThreadPoolExecutor(min(LOOKUPS, len(todo)), "fastlayer-cache") as pool:
            found = list(pool.map(lambda k: self._get(reg, src, k), todo))
        with self._lock:
            self.stats.asked += len(todo)
            for key, hit in zip(todo, found, strict=True):
                if hit is not None:
                    self.hits[key] = hit
                    self.stats.hits += 1
                    for digest, _ in hit.entry.blobs.values():
                        self.blob_sources[digest] = src.repository
        return {k: self.hits[k] for k in keys if k in self.hits}

    def _remember(self, key: str, entry: Entry, repo: str) -> None:
        """An entry this run wrote, as a hit: what it names is in repo."""
        kinds = {kind: MEDIA_TYPES[kind.split("/")[0]] for kind in entry.blobs}
        with self._lock:
            self.hits[key] = Hit(entry, kinds)
            for digest, _ in entry.blobs.values():
                self.blob_sources[digest] = repo

    def source_size(self, reg: Registry, repo: str, digest: str) -> int | None:
        """The size of blob digest in repo (None: not there), by one HEAD per blob for
        the whole run, shared by the pushes of a batch. reg: a client of repo's registry."""
        with self._lock:
            asked = self._sizes.get((repo, digest))
            mine = asked is None
            if asked is None:
                asked = self._sizes[(repo, digest)] = Future()
        if mine:
            try:
                asked.set_result(reg.blob_size(repo, digest))
            except BaseException as e:
                with self._lock:
                    del self._sizes[(repo, digest)]  # a failure is not remembered
                asked.set_exception(e)
        return asked.result()

    def _get(self, reg: Registry, src: Reference, key: str) -> Hit | None:
        if self._read_off:
            return None
        what = f"GET cache entry {src.repository}:{key[:12]}"
        try:
            repo = src.repository
            r = reg.request(
                "GET", f"/v2/{repo}/manifests/{key}", scope=f"repository:{repo}:pull",
                what=what, headers={"Accept": MT_OCI_MANIFEST}, allow=(404,),
            )  # fmt: skip
            try:
                if r.status_code == 404:
                    return None
                raw = reg.read_capped(r, what, MAX_MANIFEST)
            finally:
                reg.done(r, drain=4096)
            return parse_entry(untrusted.parse_json(raw, what), f"cache entry {src}:{key[:12]}")
        except untrusted.Invalid as e:
            self.warn(f"{untrusted.short(e, 300)}; ignored, the layer is built")
            return None
        except FastlayerError as e:
            with self._lock:  # lookups run in parallel: the first to fail says so
                first, self._read_off = not self._read_off, True
            if first:
                self.warn(f"layer cache {src} cannot be read ({untrusted.short(e, 300)}); "
                          "building without it")  # fmt: skip
            return None

    def blob_chunks(self, digest: str) -> Iterator[bytes]:
        """A blob of the source repository as it comes, unchecked (cache/fetch.py checks
        it); FastlayerError when it cannot be read. A failure that is the registry's,
        not the blob's (refused, unreachable, stalled: anything but a 404) warns once
        and ends every later download at once, raised as quiet: no warning per layer,
        nor a request per layer that would wait out the same failure."""
        assert self.source is not None
        src = self.source
        if self._fetch_off:
            raise _Quiet(f"layer cache {src}: blobs are not read")
        reg, repo = self._reg(src), src.repository
        try:
            r = reg.get_blob(repo, digest)
            try:
                yield from reg.chunks(r, f"GET blob {digest[:19]} of {repo}")
            finally:
                r.close()
        except FastlayerError as e:
            if isinstance(e, RegistryError) and e.status == 404:
                raise  # that blob is gone: that entry's business
            with self._lock:
                first, self._fetch_off = not self._fetch_off, True
            if first:
                self.warn(f"layer cache {src}: its blobs cannot be read "
                          f"({untrusted.short(e, 300)}); the layers are built")  # fmt: skip
            raise _Quiet(str(e)) from None

    # -- writing ----------------------------------------------------------------------

    def writes_where_read(self) -> bool:
        """Whether entries are written to the repository they are read from."""
        return self.target is not None and self.target == self.source

    def new_entry(
        self, key: str, kind: str, diff_id: str, size: int, digest: str, blob_size: int
    ) -> Entry | None:  # fmt: skip
        """The entry to write for a layer built or pushed as (digest, blob_size), or
        None when the cache repository has it already (as read by lookup)."""
        if self.target is None:
            return None
        hit = self.hits.get(key) if self.writes_where_read() else None
        blobs = {kind: (digest, blob_size)}
        if hit is not None:
            if hit.entry.blobs.get(kind) == (digest, blob_size):
                return None
            if (hit.entry.diff_id, hit.entry.size) == (diff_id, size):
                blobs = {**hit.entry.blobs, **blobs}  # another compression of it: kept too
        return Entry(diff_id, size, blobs)

    def store(
        self, at: Reference, items: list[tuple[str, Entry]],
        extra: list[tuple[str, int]] = (),  # type: ignore[assignment]
    ) -> int:  # fmt: skip
        """Write an entry per (key, entry) whose blob is in `at`'s
        repository (an image pushed there): the blob mounted into the cache repository (nothing is
        uploaded but the 2-byte config), then the artifact tagged by the key.
        Returns how many were written; failures warn once and stop."""
        dst = self.target
        if dst is None or self._write_off or not (items or extra):
            return 0
        if not self.same_registry(dst, at):
            self.warn(f"layer cache {dst} is on another registry than {at.registry}: "
                      "entries are written only where the layers were pushed")  # fmt: skip
            return 0
        reg = self._reg(dst)
        try:
            self._ensure_empty(reg, dst.repository)
        except FastlayerError as e:
            self._write_off = True
            self.warn(f"layer cache {dst} cannot be written ({untrusted.short(e, 300)})")
            return 0

        def holds(blob: tuple[str, int]) -> bool:
            digest, size = blob
            if self.blob_sources.get(digest) == dst.repository:
                # a kind the entry read from this repository had (another compression
                # of the layer, kept beside this push's): there still, at its size?
                return reg.blob_size(dst.repository, digest) == size
            return reg.start_upload(dst.repository, mount=digest, source=at.repository) == ""

        def one(item: tuple[str, Entry]) -> bool:
            key, entry = item
            if self._write_off:
                return False
            try:
                # the blobs are this push's (sizes measured here, or checked by a HEAD),
                # so a mount, which links the blob of that digest, is all the check needed
                # (it succeeds too when the cache repository has the blob already)
                held = {kind: blob for kind, blob in entry.blobs.items() if holds(blob)}
                if not held:
                    digest = next(iter(entry.blobs.values()))[0]
                    self.warn(f"layer cache {dst}: blob {digest[:19]} did not mount from "
                              f"{at.repository}; entry not written")  # fmt: skip
                    return False
                written = Entry(entry.diff_id, entry.size, held)
                reg.put_manifest(dst.repository, key, entry_manifest(written), MT_OCI_MANIFEST)
                if self.writes_where_read():  # later images of a batch need not ask nor write it
                    self._remember(key, written, dst.repository)
                return True
            except FastlayerError as e:
                self._write_off = True
                self.warn(f"layer cache {dst}: entry not written ({untrusted.short(e, 300)}); "
                          "the image is pushed all the same")  # fmt: skip
                return False

        def mount(blob: tuple[str, int]) -> None:
            with contextlib.suppress(FastlayerError):  # only a convenience
                reg.start_upload(dst.repository, mount=blob[0], source=at.repository)

        with ThreadPoolExecutor(LOOKUPS, "fastlayer-cache") as pool:
            done = sum(pool.map(one, items))
            list(pool.map(mount, [b for b in extra if b[0]]))
        with self._lock:
            self.stats.written += done
        return done

    def _ensure_empty(self, reg: Registry, repo: str) -> None:
        if repo in self._empty_in or reg.blob_size(repo, EMPTY_DIGEST) == len(EMPTY):
            self._empty_in.add(repo)
            return
        location = reg.start_upload(repo)
        reg.finish_upload(repo, location, EMPTY_DIGEST, EMPTY, len(EMPTY))  # type: ignore[arg-type]
        self._empty_in.add(repo)


def entry_manifest(entry: Entry) -> bytes:
    """The artifact of an entry (blob kinds sorted: the same entry, the same bytes)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "artifactType": ARTIFACT,
        "config": {"mediaType": MT_EMPTY, "digest": EMPTY_DIGEST, "size": len(EMPTY)},
        "layers": [
            {
                "mediaType": MEDIA_TYPES[kind.split("/")[0]],
                "digest": d,
                "size": s,
                "annotations": {ANN_KIND: kind},
            }
            for kind, (d, s) in sorted(entry.blobs.items())
        ],
        "annotations": {ANN_DIFF_ID: entry.diff_id, ANN_SIZE: str(entry.size)},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


class _Quiet(FastlayerError):
    """A failure already warned of once for the whole cache."""

    quiet = True


def parse_entry(doc: object, where: str) -> Hit:
    """An entry artifact, checked: our artifact type, one blob per known kind whose
    media type matches its compression, digests and sizes well formed."""
    doc = untrusted.of_type(doc, dict, where)
    if doc.get("mediaType") != MT_OCI_MANIFEST or doc.get("artifactType") != ARTIFACT:
        raise untrusted.Invalid(f"{where}: not a fastlayer cache entry")
    notes = untrusted.str_dict(
        untrusted.field(doc, "annotations", dict, where), f"{where}: annotations"
    )
    diff_id = untrusted.digest(notes.get(ANN_DIFF_ID), f"{where}: diff_id")
    size_text = notes.get(ANN_SIZE, "")
    if not _SIZE.fullmatch(size_text):
        raise untrusted.Invalid(f"{where}: size {untrusted.short(size_text, 30)!r} is no number")
    size = untrusted.integer(int(size_text), f"{where}: size")
    layers = untrusted.field(doc, "layers", list, where)
    if not 1 <= len(layers) <= MAX_BLOBS:
        raise untrusted.Invalid(f"{where}: {len(layers)} blobs (1 to {MAX_BLOBS})")
    hit = Hit(Entry(diff_id, size))
    for i, d in enumerate(layers):
        at = f"{where}: layers[{i}]"
        d = untrusted.of_type(d, dict, at)
        digest = untrusted.digest(d.get("digest"), f"{at}.digest")
        blob_size = untrusted.integer(untrusted.field(d, "size", int, at), f"{at}.size")
        media_type = untrusted.field(d, "mediaType", str, at)
        kind = untrusted.str_dict(untrusted.field(d, "annotations", dict, at), at).get(ANN_KIND, "")
        if not _KIND.fullmatch(kind) or MEDIA_TYPES.get(kind.split("/")[0]) != media_type:
            raise untrusted.Invalid(f"{at}: blob kind {untrusted.short(kind, 40)!r} does not "
                                    f"match {untrusted.short(media_type, 80)}")  # fmt: skip
        hit.entry.blobs[kind] = (digest, blob_size)
        hit.media_types[kind] = media_type
    return hit


def valid_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key))
