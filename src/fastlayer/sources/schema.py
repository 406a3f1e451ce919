"""Schema checks for the JSON documents of base images (DESIGN.md section 9).

Every base image reader (docker-archive both specs, OCI layout/archive,
stream-nix's copy-as-is reader, merge, inspect) runs what it reads through
these before using a value, so the rest of fastlayer (builder.inherit_config,
nixconf.merge_env, sinks) can trust a base config's types. Fields fastlayer
neither reads nor rewrites are carried as they are.
"""

from __future__ import annotations

from typing import Any

from fastlayer import untrusted as u

# config.config fields that are lists of strings (or null, as docker writes them)
_STR_LISTS = ("Env", "Cmd", "Entrypoint", "Shell", "OnBuild")
# config.config fields that are objects of empty objects (ports, volumes)
_OBJ_SETS = ("ExposedPorts", "Volumes")
_STRINGS = ("WorkingDir", "User", "StopSignal")
_TOP_STRINGS = ("created", "author", "architecture", "os", "variant")
_HISTORY_STRINGS = ("created", "created_by", "author", "comment")


def image_config(cfg: object, where: str) -> dict[str, Any]:
    """An image config (docker or OCI) whose fields fastlayer reads or carries
    have the types of the image spec; returns it unchanged."""
    cfg = u.of_type(cfg, dict, where)
    for key in _TOP_STRINGS:
        u.field(cfg, key, str, where, default=None)
    runtime_config(cfg.get("config"), f"{where}.config", allow_none=True)
    rootfs = u.field(cfg, "rootfs", dict, where)
    u.field(rootfs, "type", str, f"{where}.rootfs", default=None)
    u.each(
        u.field(rootfs, "diff_ids", list, f"{where}.rootfs"), f"{where}.rootfs.diff_ids", u.digest
    )
    history = u.field(cfg, "history", (list, type(None)), where, default=None)
    for i, entry in enumerate(history or []):
        _history_entry(entry, f"{where}.history[{i}]")
    return cfg


def runtime_config(value: object, where: str, *, allow_none: bool = False) -> dict[str, Any]:
    """The `config` object of an image config (Env, Cmd, Labels, ...)."""
    if value is None and allow_none:
        return {}
    rc = u.of_type(value, dict, where)
    for key in _STR_LISTS:
        if key in rc:
            u.str_list(rc[key], f"{where}.{key}", allow_none=True)
    if "Labels" in rc:
        u.str_dict(rc["Labels"], f"{where}.Labels", allow_none=True)
    for key in _OBJ_SETS:
        if rc.get(key) is not None:
            for name, v in u.of_type(rc[key], dict, f"{where}.{key}").items():
                u.of_type(v, dict, f"{where}.{key}[{name!r}]")
    for key in _STRINGS:
        u.field(rc, key, (str, type(None)), where, default=None)
    return rc


def _history_entry(entry: object, where: str) -> None:
    entry = u.of_type(entry, dict, where)
    for key in _HISTORY_STRINGS:
        u.field(entry, key, str, where, default=None)
    u.field(entry, "empty_layer", bool, where, default=None)


def descriptor(value: object, where: str) -> dict[str, Any]:
    """An OCI content descriptor: digest, size and (optional) mediaType,
    annotations, platform, urls of the right types."""
    d = u.of_type(value, dict, where)
    u.digest(d.get("digest"), f"{where}.digest")
    u.integer(d.get("size"), f"{where}.size")
    u.field(d, "mediaType", str, where, default=None)
    if d.get("annotations") is not None:
        u.str_dict(d["annotations"], f"{where}.annotations")
    if d.get("urls") is not None:
        u.str_list(d["urls"], f"{where}.urls")
    platform = u.field(d, "platform", (dict, type(None)), where, default=None)
    if platform is not None:
        for key in ("os", "architecture", "variant"):
            u.field(platform, key, str, f"{where}.platform", default=None)
    return d


def oci_index(value: object, where: str) -> list[dict[str, Any]]:
    """index.json or an image index blob: its manifest descriptors."""
    index = u.of_type(value, dict, where)
    u.field(index, "mediaType", str, where, default=None)
    return u.each(u.field(index, "manifests", list, where), f"{where}.manifests", descriptor)


def oci_manifest(value: object, where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An image manifest: (config descriptor, layer descriptors)."""
    manifest = u.of_type(value, dict, where)
    config = descriptor(u.field(manifest, "config", dict, where), f"{where}.config")
    layers = u.each(u.field(manifest, "layers", list, where), f"{where}.layers", descriptor)
    return config, layers


def docker_manifest(value: object, where: str, allow_empty: bool = False) -> list[dict[str, Any]]:
    """A docker-archive manifest.json: a list of {Config, Layers, RepoTags},
    non-empty unless allow_empty (merge passes empty ones on)."""
    entries = u.each(value, where, _docker_entry)
    if not entries and not allow_empty:
        raise u.Invalid(f"{where}: lists no image")
    return entries


def _docker_entry(value: object, where: str) -> dict[str, Any]:
    entry = u.of_type(value, dict, where)
    u.member_name(u.field(entry, "Config", str, where), f"{where}.Config")
    layers = u.str_list(u.field(entry, "Layers", list, where), f"{where}.Layers")
    for i, name in enumerate(layers):
        u.member_name(name, f"{where}.Layers[{i}]")
    u.str_list(entry.get("RepoTags"), f"{where}.RepoTags", allow_none=True)
    return entry


def repositories(value: object, where: str) -> dict[str, dict[str, str]]:
    """A legacy `repositories` file: {name: {tag: top layer id}}."""
    repos = u.of_type(value, dict, where)
    for name, tags in repos.items():
        for tag, layer_id in u.str_dict(tags, f"{where}[{name!r}]").items():
            layer_dir(layer_id, f"{where}[{name!r}][{tag!r}]")
    return repos


def layer_dir(value: object, where: str) -> str:
    """A legacy layer id: one directory name of the archive."""
    name = u.member_name(value, where)
    if "/" in name:
        raise u.Invalid(f"{where}: not a layer id: {u.short(value)}")
    return name


def diff_ids_match(n_layers: int, cfg: dict[str, Any], where: str) -> list[str]:
    """The config's diff_ids, which must be one per layer."""
    diff_ids = cfg["rootfs"]["diff_ids"]
    if len(diff_ids) != n_layers:
        raise u.Invalid(f"{where}: {n_layers} layers but {len(diff_ids)} diff_ids in its config")
    return diff_ids
