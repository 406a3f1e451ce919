"""A spec built straight into a registry: `push_spec`, and `push_index` for the
images of several platforms under one tag.

Above the builder (it builds) and registry/push.py (whose sink it builds
into), so the registry code below never imports the builder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

from fastlayer.errors import FastlayerError
from fastlayer.model import MT_OCI_INDEX, MT_OCI_MANIFEST
from fastlayer.registry.client import DEADLINE, STALL
from fastlayer.registry.push import (
    WORKERS,
    PushResult,
    PushStats,
    RegistrySink,
    open_registry,
    run_push,
)
from fastlayer.registry.reference import parse_reference
from fastlayer.sinks.base import ImageRecord


def push_spec(
    spec: Any, dest_text: str, *, compress: str | None = None, insecure: bool = False,
    workers: int = WORKERS, progress: bool = False, timeout: float | None = DEADLINE,
    stall: float | None = STALL, cache: Any = None, plan: Any = None, inputs: Any = None,
    untagged: bool = False,
    cache_repo: str | None = None, cache_from: str | None = None, cache_to: str | None = None,
    remote: Any = None,
) -> PushResult:  # fmt: skip
    """Build spec's image straight into the registry (the builder, with our sink).

    cache, plan, inputs: as for builder.build_into. untagged: the manifest is put
    by digest only (a member of an index pushed next). cache_repo (docker://REG/REPO),
    or cache_from and cache_to apart: a layer cache shared through a registry
    (cache/remote.py), or remote, one already open (its hits kept between pushes)."""
    from fastlayer.builder import build_into
    from fastlayer.spec import load_spec

    dest = parse_reference(dest_text)
    if dest.digest:
        raise FastlayerError(f"{dest_text}: push to a tag, not a digest")
    spec = load_spec(spec)
    kind = compress or (spec.compression if spec.compression != "none" else "gzip")
    reg = open_registry(dest, insecure, workers, timeout, stall)
    sink = RegistrySink(reg, dest.repository, kind, workers, progress, cache)
    sink.untagged = untagged
    own = remote is None
    if own:
        from fastlayer.cache.remote import RegistryCache

        remote = RegistryCache.from_flags(
            cache_repo, cache_from, cache_to, insecure=insecure, timeout=timeout, stall=stall
        )  # fmt: skip
    if remote is not None and remote.same_registry(dest, remote.source):
        sink.mount_sources = remote.blob_sources  # hits are mounted from there
        sink.mount_fallback = remote.source.repository  # so is any blob it holds
        sink.source_size = remote.source_size
    elif remote is not None and remote.source is not None:
        # a blob is mounted only within one registry: a cache elsewhere can give this
        # push no layer, and each hit would fail the target's check (a warning per
        # layer), so it is not read
        sink.takes_shared = False
        if remote.target != remote.source:  # else store() says so, once
            remote.warn(f"layer cache {remote.source} is on another registry than "
                        f"{dest.registry}: no layer can be mounted from it; not read")  # fmt: skip

    built: list = []

    def body() -> tuple[ImageRecord, str]:
        built.append(build_into(
            spec, lambda _mtime: contextlib.nullcontext(sink), name=dest.name, tag=dest.tag,
            cache=cache, plan=plan, inputs=inputs, remote=remote,
        ))  # fmt: skip
        return built[0].record, built[0].tag

    try:
        result = run_push(dest, sink, body)
        if remote is not None:
            # the entries, and the image's other small blobs (customisation layer, config)
            # mounted there too, so that the next machine uploads none of them
            last = result.layers[-1]
            extra = [(last.digest, last.blob_size), (result.config_digest, -1)]
            remote.store(dest, built[0].remote_new, extra)
    finally:
        if own and remote is not None:
            remote.close()
        reg.close()
    result.build = built[0]
    result.manifest_size = sink.manifest_size
    return result


def platform_of(spec: Any) -> dict[str, str]:
    """The OCI platform of a spec's image (what an index entry names)."""
    platform = {"architecture": spec.architecture, "os": spec.os}
    if spec.variant:
        platform["variant"] = spec.variant
    return platform


def push_index(specs: list[Any], dest_text: str, **push: Any) -> PushResult:
    """Push each spec's image by digest, then one OCI image index naming them with
    their platforms, tagged as dest_text says (default "latest"). The result's
    digest is the index's; its layers are every image's."""
    from fastlayer.spec import load_spec

    dest = parse_reference(dest_text)
    if dest.digest:
        raise FastlayerError(f"{dest_text}: push to a tag, not a digest")
    loaded = [load_spec(s) for s in specs]
    seen: dict[str, str] = {}
    for given, spec in zip(specs, loaded, strict=True):
        key = json.dumps(platform_of(spec), sort_keys=True)
        if key in seen:
            raise FastlayerError(
                f"{given} and {seen[key]} are both {'/'.join(platform_of(spec).values())}: "
                "an index holds one image per platform"
            )
        seen[key] = str(given)
    entries, layers, stats = [], [], PushStats()
    for spec in loaded:
        one = push_spec(spec, f"docker://{dest.name}", untagged=True, **push)
        entries.append({"mediaType": MT_OCI_MANIFEST, "digest": one.digest,
                        "size": one.manifest_size, "platform": platform_of(spec)})  # fmt: skip
        layers += one.layers
        for k, v in vars(one.stats).items():
            if isinstance(v, int):
                setattr(stats, k, getattr(stats, k) + v)
        if stats.config != "uploaded":  # the configs together: uploaded if one was
            stats.config = one.stats.config
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries}
    raw = json.dumps(index, indent=2).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    tag = dest.tag or "latest"
    reg = open_registry(dest, push.get("insecure", False), push.get("workers", WORKERS),
                    push.get("timeout", DEADLINE), push.get("stall", STALL))  # fmt: skip
    try:
        reg.put_manifest(dest.repository, digest, raw, MT_OCI_INDEX)
        reg.put_manifest(dest.repository, tag, raw, MT_OCI_INDEX)
    finally:
        reg.close()
    return PushResult(dest, tag, digest, "", layers, stats)
