"""`fastlayer pull`: an image from a registry into a docker-archive or OCI layout.

Manifest (and index, resolved to the wanted platform), config and every
layer blob are checked against the digest and size their parent promised;
blobs download in parallel into a temporary directory beside the output,
and the image appears at the output only when everything checked out.

- oci-dir keeps every byte as the registry served it (config, compressed
  blobs, an OCI manifest), so blob digests and the image id stay the
  registry's. A Docker schema 2 manifest is rewritten as its OCI twin
  (same blobs, OCI media types), as `skopeo copy ... oci:` does, since OCI
  tools (umoci) refuse Docker manifests in a layout: its digest then
  differs from the registry's.
- docker-archive holds each layer uncompressed (its diff_id checked as it
  is decompressed) and the config as fastlayer's sinks write configs, so
  its image id is the sha256 of that re-serialised config.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastlayer import untrusted
from fastlayer.errors import DigestMismatch, FastlayerError
from fastlayer.model import (
    MT_DOCKER_CONFIG,
    MT_DOCKER_LAYER,
    MT_DOCKER_LAYER_GZIP,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_CONFIG,
    MT_OCI_INDEX,
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_MANIFEST,
    OCI_LAYOUT_VERSION,
    Layer,
)
from fastlayer.registry.cache import Blob, BlobCache
from fastlayer.registry.client import DEADLINE, STALL, Registry, content_length, server_text
from fastlayer.registry.reference import Reference, parse_reference
from fastlayer.sources import schema

ACCEPT = [MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST]
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MAX_MANIFEST = untrusted.MAX_JSON  # containerd's cap for manifests, configs, indexes
CHUNK = 1 << 20
WORKERS = 4
# Docker media types as their OCI twins: the same bytes, named the OCI way.
TO_OCI = {
    MT_DOCKER_LAYER: MT_OCI_LAYER,
    MT_DOCKER_LAYER_GZIP: MT_OCI_LAYER_GZIP,
    MT_DOCKER_CONFIG: MT_OCI_CONFIG,
    MT_DOCKER_MANIFEST: MT_OCI_MANIFEST,
}


@dataclass
class PullResult:
    reference: Reference
    digest: str  # of the top manifest (index or manifest): what to pin
    manifest_digest: str  # the platform's manifest
    config_digest: str
    layers: list[Blob]
    name: str  # RepoTags / ref.name written
    tag: str


def pull(
    ref_text: str,
    output: str,
    *,
    format: str = "docker-archive",
    os_name: str = "linux",
    arch: str | None = None,
    variant: str | None = None,
    final_name: str | None = None,
    final_tag: str | None = None,
    insecure: bool = False,
    progress: bool = False,
    workers: int = WORKERS,
    timeout: float | None = DEADLINE,
    stall: float | None = STALL,
) -> PullResult:
    """timeout: seconds for the whole pull (0 or None: no limit); stall: seconds
    without a byte from the registry before a transfer is given up."""
    if format not in ("docker-archive", "oci-dir"):
        raise FastlayerError(f"unknown pull format {format!r}; use docker-archive or oci-dir")
    ref = parse_reference(ref_text)
    reg = Registry(
        ref.registry, ref.api_host, insecure, pool=workers + 2, timeout=timeout, stall=stall
    )
    try:
        top_raw, top_type = _manifest(reg, ref.repository, ref.reference, ref.digest, None)
        top_digest = _sha(top_raw)
        raw, mtype = top_raw, top_type
        if mtype in INDEX_TYPES:
            where = f"{ref}: index"
            index = untrusted.of_type(_json(raw, where), dict, where)
            desc = _descriptor(where, _platform(ref, index, os_name, arch, variant))
            raw, mtype = _manifest(reg, ref.repository, desc["digest"], desc["digest"], desc)
        where = f"{ref}: manifest"
        manifest = untrusted.of_type(_json(raw, where), dict, where)
        if mtype not in (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST) or "config" not in manifest:
            raise FastlayerError(f"{ref}: unsupported manifest type {untrusted.short(mtype)}")
        cdesc = _descriptor(f"{where}.config", manifest["config"])
        config_raw = _small_blob(reg, ref.repository, cdesc)
        config, diff_ids = _config(config_raw, f"{reg.registry}/{ref.repository}: config")
        layers = untrusted.field(manifest, "layers", list, where, default=[])
        descs = [_descriptor(f"{where}.layers[{i}]", d) for i, d in enumerate(layers)]
        if len(descs) != len(diff_ids):
            raise FastlayerError(
                f"{ref}: manifest lists {len(descs)} layers, config {len(diff_ids)} diff_ids"
            )
        name = final_name or ref.name
        tag = final_tag or ref.tag or "latest"
        if format == "oci-dir" and os.path.exists(output) and not _empty_dir(output):
            raise FastlayerError(f"{output} exists; pull into a new directory")
        parent = os.path.dirname(os.path.abspath(output))
        cache = BlobCache(ref.registry)  # before any output: it warns at worst, never fails
        with tempfile.TemporaryDirectory(dir=parent, prefix=".fastlayer-pull-") as tmp:
            blobs = os.path.join(tmp, "blobs", "sha256")
            os.makedirs(blobs)
            _download_all(reg, ref.repository, descs, blobs, progress, workers)
            if format == "oci-dir":
                _write_oci(tmp, output, raw, mtype, config_raw, cdesc, tag)
            else:
                _write_docker(output, blobs, descs, diff_ids, config, f"{name}:{tag}")
        layers = []
        for d, diff_id in zip(descs, diff_ids, strict=True):
            blob = Blob(d["digest"], d["size"], d.get("mediaType", ""))
            cache.remember(ref.repository, blob, diff_id, kind_of(blob.media_type))
            layers.append(blob)
        cache.save()
    finally:
        reg.close()
    return PullResult(ref, top_digest, _sha(raw), cdesc["digest"], layers, name, tag)


def _descriptor(where: str, d: Any) -> dict:
    """A descriptor we can fetch safely: a sha256 digest (checked before it names a
    file), a size in [0, 2^63), a string mediaType if any."""
    d = untrusted.of_type(d, dict, where)
    digest = untrusted.digest(d.get("digest"), f"{where}.digest")
    if not digest.startswith("sha256:"):
        raise untrusted.Invalid(f"{where}.digest: only sha256 digests are pulled: {digest[:19]}...")
    untrusted.integer(untrusted.field(d, "size", int, where), f"{where}.size")
    untrusted.field(d, "mediaType", str, where, default="")
    return d


def _hex(digest: str) -> str:
    """The file name of a blob: the hex of a digest whose grammar is checked first."""
    return untrusted.blob_path(digest, "blob").rsplit("/", 1)[1]


def _config(raw: bytes, where: str) -> tuple[dict, list[str]]:
    """The image config, every field fastlayer reads or writes of its spec type (as
    for a base image on disk: a docker-archive with "Env": "x" is unreadable), and
    its rootfs.diff_ids."""
    config = schema.image_config(_json(raw, where), where)
    return config, config["rootfs"]["diff_ids"]


def _empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.listdir(path)


def kind_of(media_type: str) -> str:
    """Compression of a layer media type: "gzip", "zstd" or "none"."""
    if media_type.endswith(("gzip", "+gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    return "none"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(raw: bytes, where: str) -> Any:
    return untrusted.parse_json(raw, where)


def _manifest(
    reg: Registry, repo: str, reference: str, digest: str | None, desc: dict | None
) -> tuple[bytes, str]:
    """A manifest's bytes and media type, checked against digest (and desc's size)."""
    r = reg.get_manifest(repo, reference, ACCEPT)
    try:
        raw = reg.read_capped(r, f"manifest {repo}:{reference}", MAX_MANIFEST)
    finally:
        r.close()
    got = _sha(raw)
    if digest and got != digest:
        raise DigestMismatch(f"{reg.registry}/{repo}: manifest {digest} hashes to {got}")
    if desc is not None and desc["size"] != len(raw):
        raise DigestMismatch(f"{reg.registry}/{repo}: manifest {digest} has the wrong size")
    mtype = r.headers.get("Content-Type", "").split(";")[0].strip()
    if mtype not in ACCEPT:  # some registries send a generic type: trust the body's own
        where = f"{reg.registry}/{repo}: manifest {reference}"
        body = untrusted.of_type(_json(raw, where), dict, where)
        mtype = untrusted.field(body, "mediaType", str, where, default="") or (
            MT_OCI_INDEX if "manifests" in body else MT_OCI_MANIFEST
        )
    return raw, mtype


def _platform(ref: Reference, index: dict, os_name: str, arch: str | None, variant: str | None):
    from fastlayer.sources.base_image import _host_arch

    arch = arch or _host_arch()
    found = []
    where = f"{ref}: index.manifests"
    manifests = untrusted.field(index, "manifests", list, f"{ref}: index", default=[])
    for i, d in enumerate(manifests):
        d = untrusted.of_type(d, dict, f"{where}[{i}]")
        p = untrusted.field(d, "platform", dict, f"{where}[{i}]", default={})
        keys = ("os", "architecture", "variant")
        got = [untrusted.field(p, k, str, f"{where}[{i}].platform", default="") for k in keys]
        found.append("/".join(x for x in got if x))
        if got[0] == os_name and got[1] == arch:
            if variant is None or got[2] == variant:
                return d
    want = "/".join(x for x in (os_name, arch, variant) if x)
    have = server_text(", ".join(found) or "none")
    raise FastlayerError(f"{ref} has no {want} image; it has: {have}")


def _small_blob(reg: Registry, repo: str, desc: dict) -> bytes:
    size = desc["size"]
    if size > MAX_MANIFEST:
        raise untrusted.Invalid(
            f"{reg.registry}/{repo}: config {desc['digest'][:19]}: size {size} is over "
            f"the {MAX_MANIFEST}-byte cap"
        )
    r = reg.get_blob(repo, desc["digest"])
    try:
        what = f"GET config {desc['digest']} of {repo}"
        raw = reg.read_capped(r, what, size)
    except untrusted.Invalid:
        raise DigestMismatch(
            f"{reg.registry}/{repo}: blob {desc['digest']} is larger than its descriptor's "
            f"{size} bytes"
        ) from None
    finally:
        r.close()
    _check(reg, repo, desc, _sha(raw), len(raw))
    return raw


def _check(reg: Registry, repo: str, desc: dict, digest: str, size: int) -> None:
    if digest != desc["digest"]:
        raise DigestMismatch(
            f"{reg.registry}/{repo}: blob {desc['digest']} served with digest {digest}"
        )
    if size != desc["size"]:
        raise DigestMismatch(
            f"{reg.registry}/{repo}: blob {desc['digest']} is {size} bytes, not {desc['size']}"
        )


def _download_all(
    reg: Registry, repo: str, descs: list[dict], blobs: str, progress: bool, workers: int
) -> None:
    """Every layer blob into blobs/<hex>, in parallel; the first failure stops the rest."""
    stop = threading.Event()
    bar = _bar(sum(d["size"] for d in descs)) if progress else None
    update = bar.update if bar is not None else (lambda n: None)
    unique = list({d["digest"]: d for d in descs}.values())
    try:
        with ThreadPoolExecutor(max(1, min(workers, len(unique))), "fastlayer-pull") as pool:
            futures = [pool.submit(_download, reg, repo, d, blobs, stop, update) for d in unique]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                stop.set()
                raise
    finally:
        if bar is not None:
            bar.close()


def _download(
    reg: Registry, repo: str, desc: dict, blobs: str, stop: threading.Event,
    update: Callable[[int], object],
) -> None:  # fmt: skip
    digest = desc["digest"]
    path = os.path.join(blobs, _hex(digest))
    limit = desc["size"]
    h = hashlib.sha256()
    size = 0
    r = reg.get_blob(repo, digest)
    try:
        announced = content_length(r)
        if announced is not None and announced > limit and not r.headers.get("Content-Encoding"):
            _check(reg, repo, desc, "(a larger blob)", announced)
        with open(path, "wb") as f:
            for chunk in reg.chunks(r, f"GET blob {digest} of {repo}"):
                if stop.is_set():
                    return
                size += len(chunk)
                if size > limit:
                    break  # more than promised: a mismatch, whatever follows
                h.update(chunk)
                f.write(chunk)
                update(len(chunk))
    finally:
        r.close()
    _check(reg, repo, desc, "sha256:" + h.hexdigest() if size <= limit else "(more bytes)", size)


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
        leave=False, dynamic_ncols=True, desc="pull",
    )  # fmt: skip


def _write_oci(
    tmp: str, output: str, raw: bytes, mtype: str, config_raw: bytes, cdesc: dict, tag: str
) -> None:
    """The downloaded blobs plus manifest, config, index.json: renamed into place whole."""
    blobs = os.path.join(tmp, "blobs", "sha256")
    if mtype == MT_DOCKER_MANIFEST:
        raw, mtype = oci_manifest(json.loads(raw)), MT_OCI_MANIFEST  # checked by pull()
    for data in (raw, config_raw):
        with open(os.path.join(blobs, hashlib.sha256(data).hexdigest()), "wb") as f:
            f.write(data)
    index = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": [
            {
                "mediaType": mtype,
                "digest": _sha(raw),
                "size": len(raw),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": OCI_LAYOUT_VERSION}, f)
    for dirpath, _, files in os.walk(tmp):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
    if _empty_dir(output):
        os.rmdir(output)
    elif os.path.exists(output):
        raise FastlayerError(f"{output} exists; pull into a new directory")
    out = output.rstrip("/")
    os.rename(tmp, out)
    os.mkdir(tmp)  # for TemporaryDirectory's cleanup


def oci_manifest(docker: dict) -> bytes:
    """The OCI manifest of a Docker schema 2 manifest: same descriptors, OCI media types."""

    def desc(d: dict) -> dict:
        out = {**d, "mediaType": TO_OCI.get(d.get("mediaType", ""), d.get("mediaType"))}
        return {k: v for k, v in out.items() if v is not None}

    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": desc(docker["config"]),
        "layers": [desc(x) for x in docker.get("layers") or []],
    }
    if docker.get("annotations"):
        manifest["annotations"] = docker["annotations"]
    return json.dumps(manifest, indent=2).encode()


def _write_docker(
    output: str, blobs: str, descs: list[dict], diff_ids: list[str], config: dict, ref: str
) -> None:
    """Each layer decompressed into the docker-archive sink, its diff_id verified."""
    from fastlayer.emit import ReaderSource
    from fastlayer.sinks import open_sink
    from fastlayer.sources.base_image import decompressed

    def opener(path: str):
        return lambda: decompressed(open(path, "rb"))  # noqa: SIM115 (the reader closes it)

    with open_sink(output, "docker-archive", "none") as sink:
        for d, diff_id in zip(descs, diff_ids, strict=True):
            path = os.path.join(blobs, _hex(d["digest"]))
            layer = Layer(diff_id, opener(path), None, comment=f"layer {d['digest']}")
            sink.add_layer(ReaderSource(layer, verify=True), layer.comment)
        sink.finish(config, [ref])
