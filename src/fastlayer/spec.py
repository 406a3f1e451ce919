"""Image specs: a TOML/JSON file or a dict -> validated dataclasses.

Every problem is a FastlayerError of one line naming the key (and file).
Relative paths in a spec file are relative to the file's directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from fastlayer.errors import FastlayerError

DEFAULT_TIME = "1970-01-01T00:00:01Z"
CONFIG_KEYS = {
    "Cmd": list, "Entrypoint": list, "Env": list, "WorkingDir": str, "User": str,
    "ExposedPorts": dict, "Volumes": dict, "Labels": dict, "StopSignal": str,
    "Healthcheck": dict, "OnBuild": list, "Shell": list, "ArgsEscaped": bool,
}  # fmt: skip
COMPRESSIONS = ("none", "gzip", "zstd")


@dataclass
class Permission:
    """Owner and mode for archive paths matching a glob (`*` also matches `/`)."""

    path: str
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None


@dataclass
class Contents:
    store_paths: list[str] = field(default_factory=list)  # roots; their closure is layered
    graph: str | None = None  # closure graph file or closureInfo dir
    roots: list[str] = field(default_factory=list)  # directories copied into /
    files: list[str] = field(default_factory=list)  # files copied to /<name>
    link_store_paths: bool = True  # symlink store paths' contents into / (symlinkJoin)


@dataclass
class FakeNss:
    passwd: list[str] = field(default_factory=list)  # extra lines, between root and nobody
    group: list[str] = field(default_factory=list)


@dataclass
class Spec:
    name: str
    tag: str | None = None
    contents: Contents = field(default_factory=Contents)
    include_store_paths: bool = True
    max_layers: int = 100
    strategy: str = "popularity"
    pipeline: Any = None
    previous_plan: str | None = None
    from_image: str | None = None
    from_image_tag: str | None = None
    verify_base: bool = False  # re-hash base layers as they are copied
    nix_db: bool = False  # register the closure in /nix/var/nix/db (includeNixDB)
    nix_uid: int = 0
    nix_gid: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    architecture: str = "amd64"
    os: str = "linux"
    variant: str | None = None
    created: str = DEFAULT_TIME
    mtime: str = DEFAULT_TIME
    uid: int = 0
    gid: int = 0
    uname: str = "root"
    gname: str = "root"
    fake_nss: FakeNss | None = None
    extra_commands: str | None = None
    permissions: list[Permission] = field(default_factory=list)
    compression: str = "none"
    store_dir: str = "/nix/store"
    store_root: str | None = None  # a chroot store: /nix/store/x is read from here

    def on_disk(self, store_path: str) -> str:
        """Where a store path's bytes are (its name in the image stays the same)."""
        return self.store_root.rstrip("/") + store_path if self.store_root else store_path

    @property
    def repo(self) -> str:
        return self.name

    @property
    def short_name(self) -> str:
        """The last component of the name: the one part fit for file names."""
        return self.name.rsplit("/", 1)[-1]


_NAME = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def load_spec(source: str | os.PathLike[str] | dict[str, Any] | Spec) -> Spec:
    """A Spec from a .toml/.json file, a dict, or a Spec (checked again)."""
    if isinstance(source, Spec):
        return _check(source, "spec")
    if isinstance(source, dict):
        return _from_dict(source, "spec", base_dir=os.getcwd())
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise FastlayerError(f"cannot read spec {path}: {e.strerror}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FastlayerError(f"spec {path} is not valid {_kind(path)}: {e}") from None
    if not isinstance(data, dict):
        raise FastlayerError(f"spec {path}: expected a table/object at the top")
    return _from_dict(data, path, base_dir=os.path.dirname(os.path.abspath(path)))


def _kind(path: str) -> str:
    return "JSON" if path.endswith(".json") else "TOML"


def _from_dict(data: dict[str, Any], where: str, base_dir: str) -> Spec:
    data = dict(data)
    known = {f.name for f in fields(Spec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FastlayerError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if "name" not in data:
        raise FastlayerError(f"{where}: missing key 'name'")
    contents = data.pop("contents", {}) or {}
    if isinstance(contents, list):  # shorthand: a list of store paths
        contents = {"store_paths": contents}
    c_known = {f.name for f in fields(Contents)}
    if not isinstance(contents, dict):
        raise FastlayerError(f"{where}: contents must be a table")
    if set(contents) - c_known:
        bad = ", ".join(sorted(set(contents) - c_known))
        raise FastlayerError(f"{where}: unknown key(s) in contents: {bad}")
    spec_contents = Contents(**contents)
    for key in ("roots", "files"):
        setattr(spec_contents, key, [_abs(p, base_dir) for p in getattr(spec_contents, key)])
    if spec_contents.graph:
        spec_contents.graph = _abs(spec_contents.graph, base_dir)
    nss = data.pop("fake_nss", None)
    fake = None
    if nss is True:
        fake = FakeNss()
    elif isinstance(nss, dict):
        if set(nss) - {"passwd", "group"}:
            raise FastlayerError(f"{where}: fake_nss takes only passwd and group lines")
        fake = FakeNss(**nss)
    elif nss not in (None, False):
        raise FastlayerError(f"{where}: fake_nss must be true, false or a table")
    perms = []
    for i, rule in enumerate(data.pop("permissions", []) or []):
        if not isinstance(rule, dict) or "path" not in rule:
            raise FastlayerError(f"{where}: permissions[{i}] needs a 'path'")
        if set(rule) - {"path", "uid", "gid", "mode"}:
            raise FastlayerError(f"{where}: permissions[{i}] takes path, uid, gid and mode")
        mode = rule.get("mode")
        if isinstance(mode, str):
            try:
                mode = int(mode, 8)
            except ValueError:
                raise FastlayerError(
                    f"{where}: permissions[{i}].mode {mode!r} is not octal"
                ) from None
        perms.append(Permission(rule["path"], rule.get("uid"), rule.get("gid"), mode))
    for key in ("from_image", "previous_plan", "store_root"):
        if data.get(key):
            data[key] = _abs(data[key], base_dir)
    for key in ("created", "mtime"):
        if isinstance(data.get(key), int | float) and not isinstance(data.get(key), bool):
            data[key] = datetime.fromtimestamp(data[key], tz=timezone.utc).isoformat()
    spec = Spec(**data, contents=spec_contents, fake_nss=fake, permissions=perms)
    return _check(spec, where)


def _abs(path: str, base_dir: str) -> str:
    if not isinstance(path, str):
        raise FastlayerError(f"expected a path string, got {path!r}")
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _check(spec: Spec, where: str) -> Spec:
    def bad(msg: str) -> FastlayerError:
        return FastlayerError(f"{where}: {msg}")

    types: dict[str, type | tuple[type, ...]] = {
        "name": str, "tag": (str, type(None)), "include_store_paths": bool, "max_layers": int,
        "verify_base": bool, "nix_db": bool, "nix_uid": int, "nix_gid": int,
        "strategy": str, "architecture": str, "os": str, "variant": (str, type(None)),
        "created": str, "mtime": str, "uid": int, "gid": int, "uname": str, "gname": str,
        "extra_commands": (str, type(None)), "compression": str, "config": dict,
        "from_image": (str, type(None)), "store_dir": str, "store_root": (str, type(None)),
    }  # fmt: skip
    for key, typ in types.items():
        value = getattr(spec, key)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise bad(f"{key} has the wrong type ({type(value).__name__}: {value!r})")
    if not _NAME.match(spec.name):
        raise bad(f"name {spec.name!r} is not a valid image name (lowercase, [registry/]path)")
    if spec.tag is not None and not _TAG.match(spec.tag):
        raise bad(f"tag {spec.tag!r} is not a valid tag")
    if spec.max_layers < 1:
        raise bad(f"max_layers must be at least 1, got {spec.max_layers}")
    if spec.compression not in COMPRESSIONS:
        raise bad(f"compression must be one of {', '.join(COMPRESSIONS)}")
    for key, value in spec.config.items():
        typ = CONFIG_KEYS.get(key)
        if typ is None:
            raise bad(f"unknown config key {key!r} (known: {', '.join(CONFIG_KEYS)})")
        if not isinstance(value, typ):
            raise bad(f"config.{key} must be a {typ.__name__}")
    for key in ("created", "mtime"):
        parse_time(getattr(spec, key), f"{where}: {key}")
    for p in spec.contents.store_paths:
        if not isinstance(p, str) or not p.startswith(spec.store_dir.rstrip("/") + "/"):
            raise bad(f"store path {p!r} is not under store_dir {spec.store_dir}")
    if spec.contents.store_paths and spec.include_store_paths and not spec.contents.graph:
        raise bad("contents.store_paths needs contents.graph (their closure graph)")
    on_disk = [spec.on_disk(p) for p in spec.contents.store_paths]
    for p in [*spec.contents.roots, *spec.contents.files, *on_disk]:
        if not os.path.lexists(p):
            raise bad(f"path does not exist: {p}")
    for p in spec.contents.roots:
        if not os.path.isdir(p):
            raise bad(f"contents.roots entry is not a directory: {p}")
    for key in ("from_image", "previous_plan"):
        value = getattr(spec, key)
        if value and not os.path.exists(value):
            raise bad(f"{key} does not exist: {value}")
    if spec.contents.graph and not os.path.exists(spec.contents.graph):
        raise bad(f"contents.graph does not exist: {spec.contents.graph}")
    return spec


def parse_time(value: str, what: str) -> datetime:
    """ "now", ISO 8601 (a trailing Z too), or integer epoch seconds as a string."""
    if value == "now":
        return datetime.now(tz=timezone.utc).replace(microsecond=0)
    if re.fullmatch(r"-?[0-9]+", value):
        return datetime.fromtimestamp(int(value), tz=timezone.utc)
    try:
        t = datetime.fromisoformat(re.sub(r"Z$", "+00:00", value))
    except ValueError:
        raise FastlayerError(f"{what}: not 'now', epoch seconds or ISO 8601: {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with a Z, as image configs carry it."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
