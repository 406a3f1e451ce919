"""The drop-in for nixpkgs' stream_layered_image.py: same conf JSON, same image.

Same layer bytes, same config JSON bytes (so the same image ID), same
manifest and the same outer archive, but every layer is read, hashed and
written once (see emit.py) instead of tarred twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastlayer import untrusted as u
from fastlayer.cache.store import Entry
from fastlayer.emit import Owner, Pipeline, ReaderSource, store_layer
from fastlayer.errors import CacheMismatch, DigestMismatch, FastlayerError
from fastlayer.model import Image, Known
from fastlayer.sinks.docker_archive import DockerArchiveWriter
from fastlayer.sources import schema
from fastlayer.sources.base_archive import BaseArchive, open_base_archive
from fastlayer.sources.base_image import Guarded, HashingReader, open_image
from fastlayer.untrusted import Invalid, short

if TYPE_CHECKING:
    from fastlayer.cache import LayerCache

REQUIRED = (
    "architecture", "config", "store_dir", "from_image", "store_layers",
    "customisation_layer", "repo_tag", "created", "mtime", "uid", "gid", "uname", "gname",
)  # fmt: skip

_NOW = datetime.now(tz=timezone.utc)


@dataclass
class NixConf:
    raw: dict[str, Any]
    created: datetime
    owner: Owner
    store_dir: str
    store_layers: list[list[str]]
    customisation_layer: str
    from_image: str | None
    repo_tag: str


def parse_time(value: object, key: str) -> datetime:
    """ISO 8601 or "now", as the script reads it (a trailing Z works on 3.10 too)."""
    if value == "now":
        return _NOW
    if not isinstance(value, str):
        raise FastlayerError(
            f"conf key {key!r}: must be a string (ISO 8601 or 'now'), not {short(value)}"
        )
    try:
        return datetime.fromisoformat(re.sub(r"Z$", "+00:00", value))
    except (TypeError, ValueError):
        raise FastlayerError(
            f"conf key {key!r}: not an ISO 8601 time or 'now': {short(value)}"
        ) from None


# 9999-12-31T23:59:59Z: the last time ISO 8601 (and docker) can write.
MAX_TIME = 253402300799


def _id(value: object, key: str, where: str) -> int:
    """uid/gid: an integer or a string of digits (nixpkgs passes toString)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,20}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{where}: conf key {key!r}: must be an integer, not {short(value)}")
    return u.integer(value, f"{where}: conf key {key!r}", 0, u.MAX_ID)


def _time(value: object, key: str, where: str) -> datetime:
    try:
        t = parse_time(value, key)
    except FastlayerError as e:
        raise Invalid(f"{where}: {e}") from None
    try:
        seconds = t.timestamp()
    except (OverflowError, ValueError, OSError):
        seconds = -1.0
    if not 0 <= seconds <= MAX_TIME:
        raise Invalid(f"{where}: conf key {key!r}: {short(value)} is not between 1970 and 9999")
    return t


def load_conf(path: str) -> NixConf:
    raw = u.load_json_file(path, "conf")
    where = f"conf {path}"
    if not isinstance(raw, dict):
        raise FastlayerError(f"{where}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise FastlayerError(f"{where}: missing key(s) {', '.join(missing)}")
    layers = u.each(raw["store_layers"], f"{where}: store_layers", u.str_list)
    for key in ("architecture", "store_dir", "customisation_layer", "repo_tag", "uname", "gname"):
        u.of_type(raw[key], str, f"{where}: conf key {key!r}")
    u.image_ref(raw["repo_tag"], f"{where}: conf key 'repo_tag'")
    store_dir = _store_dir(raw["store_dir"], f"{where}: conf key 'store_dir'")
    for i, layer in enumerate(layers):
        for j, p in enumerate(layer):
            _store_path(p, store_dir, f"{where}: store_layers[{i}][{j}]")
    u.of_type(raw["from_image"], (str, type(None)), f"{where}: conf key 'from_image'")
    # The image config's types, as for a base image's: what skopeo and podman read.
    schema.runtime_config(raw["config"], f"{where}: conf key 'config'")
    uid, gid = _id(raw["uid"], "uid", where), _id(raw["gid"], "gid", where)
    mtime = int(_time(raw["mtime"], "mtime", where).timestamp())
    return NixConf(
        raw=raw,
        created=_time(raw["created"], "created", where),
        owner=Owner(mtime=mtime, uid=uid, gid=gid, uname=raw["uname"], gname=raw["gname"]),
        store_dir=raw["store_dir"],
        store_layers=layers,
        customisation_layer=raw["customisation_layer"],
        from_image=raw["from_image"],
        repo_tag=raw["repo_tag"],
    )


def _store_dir(value: str, where: str) -> str:
    """An absolute, normalised directory: no `..` to climb out through."""
    if (
        not value.startswith("/")
        or os.path.normpath(value) != value.rstrip("/")
        or (not value.isprintable())
    ):
        raise Invalid(f"{where}: {short(value)} is not an absolute, normalised directory")
    return value.rstrip("/")


def _store_path(path: str, store_dir: str, where: str) -> None:
    """A store path is one entry right under store_dir (as Nix makes them)."""
    base = path[len(store_dir) + 1 :] if path.startswith(store_dir + "/") else ""
    if not base or "/" in base or base in (".", "..") or not path.isprintable():
        raise Invalid(f"{where}: {short(path)} is not a store path under store_dir {store_dir}")


def merge_env(base: list[str], child: list[str]) -> list[str]:
    """Base then child; one entry per name, the last value at the first position."""
    merged: dict[str, str] = {}
    for entry in base + child:
        merged[entry.split("=", 1)[0]] = entry
    return list(merged.values())


@dataclass
class _Layer:
    checksum: str
    path: str
    paths: list[str]


def _check_paths(conf: NixConf, root: str | None) -> None:
    """Fail before the first output byte on the common mistakes."""
    for layer in conf.store_layers:
        for p in layer:
            if not isinstance(p, str) or not p.startswith(conf.store_dir):
                raise FastlayerError(f"store path {p!r} is not under store_dir {conf.store_dir}")
            if not os.path.lexists(_on_disk(p, root)):
                raise FastlayerError(f"store path does not exist: {_on_disk(p, root)}")


def _on_disk(path: str, root: str | None) -> str:
    return root.rstrip("/") + "/" + path.lstrip("/") if root else path


def _open_base(path: str) -> BaseArchive | Image:
    """A docker-archive with manifest.json is copied entry by entry, as nixpkgs
    does (same bytes); legacy, OCI and compressed bases are converted."""
    if os.path.isfile(path) and _is_docker_archive(path):
        return open_base_archive(path)
    return open_image(path)


def _is_docker_archive(path: str) -> bool:
    import tarfile

    try:
        with u.open_regular(path, "base image") as f, tarfile.open(fileobj=f, mode="r:") as t:
            # uncompressed only: entries are copied raw
            names = {n.removeprefix("./") for n in t.getnames()}
    except (OSError, EOFError, tarfile.TarError, FastlayerError):
        return False
    return "manifest.json" in names and "oci-layout" not in names


def stream_conf(
    conf: NixConf,
    out_fd: int,
    repo_tag: str | None = None,
    root: str | None = None,
    log: Any = None,
    cache: LayerCache | None = None,
) -> list[str]:
    """Write the image for conf to out_fd; returns the layer diff_ids (hex).

    cache: a layer cache, whose known layers stream to a pipe without a spool."""
    _check_paths(conf, root)
    checksum_file = _on_disk(os.path.join(conf.customisation_layer, "checksum"), root)
    with u.open_regular(checksum_file, "customisation layer checksum") as f:
        data = u.read_capped(f, f"customisation layer checksum {checksum_file}", 4096)
    custom_checksum = data.decode("utf-8", "replace").strip()
    layer_tar = _on_disk(os.path.join(conf.customisation_layer, "layer.tar"), root)
    u.open_regular(layer_tar, "customisation layer").close()  # no fifo or device
    if not re.fullmatch(r"[0-9a-f]{64}", custom_checksum):
        raise FastlayerError(f"{checksum_file} does not hold a sha256: {custom_checksum[:80]!r}")
    base = _open_base(_on_disk(conf.from_image, root)) if conf.from_image else None

    out = DockerArchiveWriter(out_fd)
    try:
        layers = _write_image(conf, out, base, custom_checksum, repo_tag, root, log, cache)
    except BaseException:
        out.abort()
        raise
    out.close()
    return [x.checksum for x in layers]


def _cached(
    cache: LayerCache | None, conf: NixConf, root: str | None
) -> tuple[list[str | None], list[Known | None]]:
    """Each store layer's recipe key and what the layer cache knows of it."""
    n = len(conf.store_layers)
    if cache is None:
        return [None] * n, [None] * n
    from fastlayer.cache.keys import store_layer_key

    keys = [store_layer_key(paths, conf.owner, root) for paths in conf.store_layers]
    entries = [cache.get(k) if k else None for k in keys]
    return keys, [Known(e.diff_id, e.size, e.blobs) if e else None for e in entries]


def _write_image(
    conf: NixConf,
    out: DockerArchiveWriter,
    base: BaseArchive | Image | None,
    custom_checksum: str,
    repo_tag: str | None,
    root: str | None,
    log: Any,
    cache: LayerCache | None = None,
) -> list[_Layer]:
    mtime = conf.owner.mtime
    layers: list[_Layer] = []
    if isinstance(base, BaseArchive):
        # nixpkgs copies the base archive's layer entries as they are
        for ti, diff_id in zip(base.layers, base.diff_ids, strict=True):
            where = f"base image {conf.from_image}: {ti.name}"
            src = HashingReader(Guarded(base.tar.extractfile(ti), where))  # type: ignore[arg-type]
            out.add_tarinfo(ti, src)  # type: ignore[arg-type]
            if "sha256:" + src.digest.hexdigest() != diff_id:  # checked as it was copied
                raise DigestMismatch(
                    f"{where}: content hashes to sha256:{src.digest.hexdigest()}, "
                    f"not its diff_id {diff_id}"
                )
            layers.append(_Layer(re.sub(r"^sha256:", "", diff_id), ti.path, [ti.path]))
        base.close()
    elif base is not None:
        # other formats: each layer uncompressed as <diff_id>/layer.tar, verified
        for layer in base.layers:
            hexd = layer.diff_id.removeprefix("sha256:")
            out.add_layer(ReaderSource(layer, verify=True), mtime)
            layers.append(_Layer(hexd, f"{hexd}/layer.tar", [f"{hexd}/layer.tar"]))
    makers = [
        functools.partial(store_layer, paths, conf.owner, root) for paths in conf.store_layers
    ]
    keys, known = _cached(cache, conf, root)
    n_base = len(layers)
    with Pipeline(makers) as pipeline:
        sources = pipeline.sources()
        for i, (paths, source) in enumerate(zip(conf.store_layers, sources, strict=True)):
            if log:
                log(f"layer {n_base + i + 1}: {len(paths)} store path(s), {source.size} bytes")
            source.known = known[i]  # type: ignore[attr-defined]  # then a pipe needs no spool
            try:
                digest = out.add_layer(source, mtime)
            except CacheMismatch as e:
                if cache is not None and keys[i]:
                    cache.drop(keys[i], f"its recipe no longer gives {e.expected}", quiet=True)
                raise
            if cache is not None and keys[i]:
                cache.put(keys[i], Entry(f"sha256:{digest}", source.size or 0))
            layers.append(_Layer(digest, f"{digest}/layer.tar", paths))
    path = f"{custom_checksum}/layer.tar"
    out.add_file(path, _on_disk(os.path.join(conf.customisation_layer, "layer.tar"), root), mtime)
    layers.append(_Layer(custom_checksum, path, [conf.customisation_layer]))

    config = conf.raw["config"]
    if base is not None:
        base_env = (base.config.get("config") or {}).get("Env") or []
        if base_env or config.get("Env"):
            config["Env"] = merge_env(base_env, config.get("Env") or [])
    created = conf.created.isoformat()
    image = {
        "created": created,
        "architecture": conf.raw["architecture"],
        "os": "linux",
        "config": config,
        "rootfs": {"diff_ids": [f"sha256:{x.checksum}" for x in layers], "type": "layers"},
        "history": [{"created": created, "comment": f"store paths: {x.paths}"} for x in layers],
    }
    image_json = json.dumps(image, indent=4).encode("utf-8")
    config_name = f"{hashlib.sha256(image_json).hexdigest()}.json"
    out.add_bytes(config_name, image_json, mtime)
    manifest = [
        {
            "Config": config_name,
            "RepoTags": [repo_tag or conf.repo_tag],
            "Layers": [x.path for x in layers],
        }
    ]
    out.add_bytes("manifest.json", json.dumps(manifest, indent=4).encode("utf-8"), mtime)
    return layers
