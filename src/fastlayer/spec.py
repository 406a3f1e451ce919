"""Image specs: a TOML/JSON file or a dict -> validated dataclasses.

Every problem is one line (untrusted.Invalid) naming the spec file and the key.
Relative paths in a spec file are relative to the file's directory.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from fastlayer import untrusted
from fastlayer.untrusted import Invalid, short

DEFAULT_TIME = "1970-01-01T00:00:01Z"
# A spec is a few KiB; the cap only stops a spec that is /dev/zero-like.
MAX_SPEC = 16 << 20
# Far above what registries and overlayfs take (~128 to 500 layers), low enough
# that a typo like 1e9 is caught here rather than in per-layer arrays.
MAX_LAYERS = 10000
# Layer times: tar's octal mtime cannot hold a negative one (fastlayer's header
# writer would fall back to a pax record few readers take), and
# datetime ends at year 9999.
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
# fastlayer.plan.STRATEGIES (defined here so specs load without numpy).
STRATEGIES = ("popularity", "limit", "auto", "pipeline", "stable", "shared")
CONFIG_KEYS = {
    "Cmd": list, "Entrypoint": list, "Env": list, "WorkingDir": str, "User": str,
    "ExposedPorts": dict, "Volumes": dict, "Labels": dict, "StopSignal": str,
    "Healthcheck": dict, "OnBuild": list, "Shell": list, "ArgsEscaped": bool,
}  # fmt: skip
COMPRESSIONS = ("none", "gzip", "zstd")
# contents.root_layers: roots copied into the customisation layer, or as layers
# of their own (sources/explicit.py).
ROOT_LAYERS = ("customisation", "per-root", "per-directory")
_LAYER_KEYS = ("paths", "dest", "name")


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
    root_layers: str = "customisation"  # or "per-root", "per-directory": layers of their own


@dataclass
class FakeNss:
    passwd: list[str] = field(default_factory=list)  # extra lines, between root and nobody
    group: list[str] = field(default_factory=list)


@dataclass
class LayerSpec:
    """One [[layers]] entry: files, directories or globs, each copied to
    dest/<its name>, as one layer of their own."""

    paths: list[str]
    dest: str = "/"
    name: str | None = None  # for the history comment


@dataclass
class Spec:
    name: str
    tag: str | None = None
    contents: Contents = field(default_factory=Contents)
    layers: list[LayerSpec] = field(default_factory=list)  # explicit layers, in order
    include_store_paths: bool = True
    max_layers: int = 100
    strategy: str = "popularity"
    pipeline: Any = None
    previous_plan: str | None = None
    from_image: str | None = None
    from_image_tag: str | None = None
    verify_base: bool = True  # hash base layers as they are copied (False trusts diff_ids)
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
    r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_OCTAL = re.compile(r"(?:0o)?[0-7]{1,5}")

# Types of the top-level scalar keys (contents, config, fake_nss, permissions
# and pipeline are checked on their own).
_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "tag": (str, type(None)), "include_store_paths": bool, "max_layers": int,
    "strategy": str, "previous_plan": (str, type(None)), "from_image": (str, type(None)),
    "from_image_tag": (str, type(None)), "verify_base": bool, "nix_db": bool,
    "nix_uid": int, "nix_gid": int, "config": dict, "architecture": str, "os": str,
    "variant": (str, type(None)), "created": str, "mtime": str, "uid": int, "gid": int,
    "uname": str, "gname": str, "extra_commands": (str, type(None)), "compression": str,
    "store_dir": str, "store_root": (str, type(None)),
}  # fmt: skip


def load_spec(source: str | os.PathLike[str] | dict[str, Any] | Spec) -> Spec:
    """A Spec from a .toml/.json file, a dict, or a Spec (checked again)."""
    if isinstance(source, Spec):
        return _check(source, "spec")
    if isinstance(source, dict):
        return _from_dict(source, "spec", base_dir=os.getcwd())
    path = os.fspath(source)
    where = f"spec {path}"
    with untrusted.open_regular(path, "spec") as f:  # a fifo or device is refused, not read
        raw = untrusted.read_capped(f, where, MAX_SPEC)
    data = _parse(raw, path, where)
    if not isinstance(data, dict):
        raise Invalid(f"{where}: expected a table/object at the top")
    return _from_dict(data, where, base_dir=os.path.dirname(os.path.abspath(path)))


def _parse(raw: bytes, path: str, where: str) -> Any:
    if path.endswith(".json"):
        return untrusted.parse_json(raw, where)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except RecursionError:
        raise Invalid(f"{where}: TOML nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"{where} is not valid TOML: {e}") from None


def _from_dict(data: dict[str, Any], where: str, base_dir: str) -> Spec:
    """A dict as read from a file: keys checked, relative paths made absolute,
    octal mode strings and epoch times converted; then `_check`."""
    data = dict(data)
    untrusted.known_keys(data, [f.name for f in fields(Spec)], where)
    if "name" not in data:
        raise Invalid(f"{where}: missing key 'name'")
    contents = _contents(data.pop("contents", None), where, base_dir)
    fake = _fake_nss(data.pop("fake_nss", None), where)
    perms = untrusted.each(
        data.pop("permissions", None) or [], f"{where}: permissions", _permission
    )
    layers = data.pop("layers", None)
    layers = untrusted.each(
        [] if layers is None else layers,
        f"{where}: layers",
        lambda entry, at: _layer(entry, at, base_dir),
    )
    for key in ("from_image", "previous_plan", "store_root"):
        if data.get(key):
            data[key] = _abs(data[key], f"{where}: {key}", base_dir)
    for key in ("created", "mtime"):
        if key in data:
            data[key] = _time_text(data[key], f"{where}: {key}")
    spec = Spec(**data, contents=contents, layers=layers, fake_nss=fake, permissions=perms)
    return _check(spec, where)


def _contents(value: Any, where: str, base_dir: str) -> Contents:
    if value is None:
        return Contents()
    if isinstance(value, list):  # shorthand: a list of store paths
        value = {"store_paths": value}
    value = untrusted.of_type(value, dict, f"{where}: contents")
    untrusted.known_keys(value, [f.name for f in fields(Contents)], f"{where}: contents")
    c = Contents(**value)
    for key in ("store_paths", "roots", "files"):
        items = untrusted.str_list(getattr(c, key), f"{where}: contents.{key}")
        if key != "store_paths":
            items = [_abs(p, f"{where}: contents.{key}", base_dir) for p in items]
        setattr(c, key, items)
    if c.graph is not None:
        c.graph = _abs(c.graph, f"{where}: contents.graph", base_dir)
    return c


def _fake_nss(value: Any, where: str) -> FakeNss | None:
    if value is True:
        return FakeNss()
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        raise Invalid(f"{where}: fake_nss must be true, false or a table, not {short(value)}")
    nss = value
    untrusted.known_keys(nss, ["passwd", "group"], f"{where}: fake_nss")
    return FakeNss(**nss)


def _layer(entry: Any, where: str, base_dir: str) -> LayerSpec:
    """One [[layers]] table; `where` is "<spec>: layers[i]". Paths made absolute."""
    entry = untrusted.of_type(entry, dict, where)
    bad = sorted(set(entry) - set(_LAYER_KEYS), key=str)
    if bad:
        raise Invalid(
            f"{where}: unknown key(s) {', '.join(map(str, bad))} (known: {', '.join(_LAYER_KEYS)})"
        )
    if "paths" not in entry:
        raise Invalid(f"{where} needs 'paths' (files, directories or globs)")
    paths = untrusted.str_list(entry["paths"], f"{where}.paths")
    paths = [_abs(p, f"{where}.paths[{i}]", base_dir) for i, p in enumerate(paths)]
    return LayerSpec(paths, entry.get("dest", "/"), entry.get("name"))


def _permission(rule: Any, where: str) -> Permission:
    """One permissions entry; `where` is "<spec>: permissions[i]"."""
    rule = untrusted.of_type(rule, dict, where)
    untrusted.known_keys(rule, ["path", "uid", "gid", "mode"], where)
    if "path" not in rule:
        raise Invalid(f"{where} needs a 'path'")
    mode = rule.get("mode")
    if mode is not None:
        mode = _mode(mode, f"{where}.mode")
    return Permission(rule["path"], rule.get("uid"), rule.get("gid"), mode)


def _mode(value: Any, where: str) -> int:
    """An octal string ("0750", "750", "0o750") as an int. An integer is refused:
    TOML and JSON read 750 as decimal, which is not the mode anyone means."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise Invalid(
            f'{where}: write the mode as an octal string such as "0700" '
            f"(the integer {value} is 0o{value:o})"
        )
    text = untrusted.of_type(value, str, where)
    if not _OCTAL.fullmatch(text) or int(text, 8) > 0o7777:
        raise Invalid(f"{where}: {short(text)} is not an octal mode within 0..07777")
    return int(text, 8)


def _time_text(value: Any, where: str) -> Any:
    """Epoch seconds given as a number, as the text `parse_time` reads; other
    values are left for `_check` to judge."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return value
    if not (math.isfinite(value) and EARLIEST.timestamp() <= value <= LATEST.timestamp()):
        raise Invalid(f"{where}: {short(value, 40)} is not a time in 1970..9999")
    return datetime.fromtimestamp(value, tz=timezone.utc).isoformat()


def _abs(path: Any, where: str, base_dir: str) -> str:
    path = _path(path, where)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _path(value: Any, where: str) -> str:
    text = untrusted.of_type(value, str, where)
    if "\0" in text or not text:
        raise Invalid(f"{where}: not a usable path: {short(text)}")
    return text


def _check(spec: Spec, where: str) -> Spec:
    """Every field's type and range, then what must exist on disk."""
    for key, typ in _TYPES.items():
        untrusted.of_type(getattr(spec, key), typ, f"{where}: {key}")
    _check_values(spec, where)
    _check_config(spec.config, f"{where}: config")
    _check_contents(spec, where)
    untrusted.each(spec.layers, f"{where}: layers", _check_layer)
    if len(spec.layers) + 1 > spec.max_layers:  # a base image's layers are counted when built
        n = len(spec.layers)
        raise Invalid(
            f"{where}: max_layers {spec.max_layers} is less than {n + 1}: "
            f"{n} explicit layer{'s' if n != 1 else ''} + 1 customisation layer"
        )
    _check_paths(spec, where)
    return spec


def _check_values(spec: Spec, where: str) -> None:
    def bad(msg: str) -> Invalid:
        return Invalid(f"{where}: {msg}")

    if not _NAME.fullmatch(spec.name):
        raise bad(f"name {spec.name!r} is not a valid image name (lowercase, [registry/]path)")
    if spec.tag is not None and not _TAG.fullmatch(spec.tag):
        raise bad(f"tag {spec.tag!r} is not a valid tag")
    untrusted.integer(spec.max_layers, f"{where}: max_layers", 1, MAX_LAYERS)
    for key in ("uid", "gid", "nix_uid", "nix_gid"):
        untrusted.integer(getattr(spec, key), f"{where}: {key}", 0, untrusted.MAX_ID)
    if spec.strategy not in STRATEGIES:
        raise bad(f"strategy must be one of {', '.join(STRATEGIES)}, not {short(spec.strategy)}")
    if spec.compression not in COMPRESSIONS:
        raise bad(f"compression must be one of {', '.join(COMPRESSIONS)}")
    for key in ("created", "mtime"):
        parse_time(getattr(spec, key), f"{where}: {key}")
    for key in ("uname", "gname", "extra_commands", "architecture", "os", "variant"):
        value = getattr(spec, key)
        if value is not None and "\0" in value:
            raise bad(f"{key} holds a NUL character")
    if not spec.store_dir.startswith("/") or "\0" in spec.store_dir:
        raise bad(f"store_dir must be an absolute path, not {short(spec.store_dir)}")
    for key in ("from_image", "previous_plan", "store_root"):
        if getattr(spec, key):  # "" is read as not given
            _path(getattr(spec, key), f"{where}: {key}")
    if spec.fake_nss is not None:
        untrusted.of_type(spec.fake_nss, FakeNss, f"{where}: fake_nss")
        for key in ("passwd", "group"):
            for i, line in enumerate(
                untrusted.str_list(getattr(spec.fake_nss, key), f"{where}: fake_nss.{key}")
            ):
                if "\n" in line or "\0" in line:
                    raise bad(f"fake_nss.{key}[{i}]: one line each, without newlines")
    untrusted.each(spec.permissions, f"{where}: permissions", _check_permission)


def _check_permission(p: Any, where: str) -> None:
    untrusted.of_type(p, Permission, where)
    _path(p.path, f"{where}.path")
    for key in ("uid", "gid"):
        if getattr(p, key) is not None:
            untrusted.integer(getattr(p, key), f"{where}.{key}", 0, untrusted.MAX_ID)
    if p.mode is not None:
        untrusted.integer(p.mode, f"{where}.mode", 0, 0o7777)


def _check_config(config: dict[str, Any], where: str) -> None:
    """The keys fastlayer writes into the image config, with the types the
    image spec gives them (a wrong one makes an image other tools refuse)."""
    untrusted.known_keys(config, list(CONFIG_KEYS), where)
    for key, value in config.items():
        typ = CONFIG_KEYS[key]
        at = f"{where}.{key}"
        untrusted.of_type(value, typ, at)
        if key in ("Cmd", "Entrypoint", "Env", "OnBuild", "Shell"):
            untrusted.str_list(value, at)
        elif key == "Labels":
            untrusted.str_dict(value, at)
        elif key in ("ExposedPorts", "Volumes"):
            for k, v in value.items():
                if v != {}:
                    raise Invalid(f"{at}[{k!r}]: must be an empty table {{}}, not {short(v)}")
        elif key == "Healthcheck":
            _check_healthcheck(value, at)
    for i, entry in enumerate(config.get("Env") or []):
        if not entry.partition("=")[0] or "\0" in entry:
            raise Invalid(f"{where}.Env[{i}]: not NAME=value: {short(entry)}")


def _check_healthcheck(value: dict[str, Any], where: str) -> None:
    durations = ("Interval", "Timeout", "StartPeriod", "StartInterval", "Retries")
    untrusted.known_keys(value, ["Test", *durations], where)
    for k, v in value.items():
        if k == "Test":
            untrusted.str_list(v, f"{where}.Test")
        else:
            untrusted.integer(v, f"{where}.{k}")


def _check_contents(spec: Spec, where: str) -> None:
    c = untrusted.of_type(spec.contents, Contents, f"{where}: contents")
    for key in ("store_paths", "roots", "files"):
        for i, p in enumerate(untrusted.str_list(getattr(c, key), f"{where}: contents.{key}")):
            _path(p, f"{where}: contents.{key}[{i}]")
    untrusted.of_type(c.graph, (str, type(None)), f"{where}: contents.graph")
    untrusted.of_type(c.link_store_paths, bool, f"{where}: contents.link_store_paths")
    if untrusted.of_type(c.root_layers, str, f"{where}: contents.root_layers") not in ROOT_LAYERS:
        raise Invalid(
            f"{where}: contents.root_layers must be one of {', '.join(ROOT_LAYERS)}, "
            f"not {short(c.root_layers)}"
        )
    for p in c.store_paths:
        if not p.startswith(spec.store_dir.rstrip("/") + "/"):
            raise Invalid(f"{where}: store path {p!r} is not under store_dir {spec.store_dir}")
    if c.store_paths and spec.include_store_paths and not c.graph:
        raise Invalid(f"{where}: contents.store_paths needs contents.graph (their closure graph)")
    if spec.nix_db and not c.graph:
        raise Invalid(f"{where}: nix_db needs contents.graph (the closure to register)")


def _check_paths(spec: Spec, where: str) -> None:
    """What the spec names on disk exists (its type is checked when it is read)."""

    def bad(msg: str) -> Invalid:
        return Invalid(f"{where}: {msg}")

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
    for i, layer in enumerate(spec.layers):
        for j, p in enumerate(layer.paths):
            if not (glob.glob(p) if is_glob(p) else os.path.lexists(p)):
                raise bad(f"layers[{i}].paths[{j}] matches nothing: {p}")


def is_glob(path: str) -> bool:
    """A layers path with * ? or [ is a glob (matched as the shell does: `*` skips dot-files)."""
    return any(c in path for c in "*?[")


def _check_layer(layer: Any, where: str) -> None:
    """One LayerSpec; `where` is "<spec>: layers[i]"."""
    untrusted.of_type(layer, LayerSpec, where)
    paths = untrusted.str_list(layer.paths, f"{where}.paths")
    if not paths:
        raise Invalid(f"{where}.paths: empty; a layer needs at least one file, directory or glob")
    for j, p in enumerate(paths):
        _path(p, f"{where}.paths[{j}]")
    dest = untrusted.of_type(layer.dest, str, f"{where}.dest")
    if not dest.startswith("/") or "\0" in dest or "/../" in dest + "/":
        raise Invalid(f"{where}.dest: must be an absolute path without '..', not {short(dest)}")
    name = untrusted.of_type(layer.name, (str, type(None)), f"{where}.name")
    if name is not None and any(c in name for c in "\0\n\r"):
        raise Invalid(f"{where}.name: one line, without control characters")


def parse_time(value: str, what: str) -> datetime:
    """ "now", ISO 8601 (a trailing Z too), or integer epoch seconds as a string,
    within 1970..9999 (see EARLIEST)."""
    if value == "now":
        return datetime.now(tz=timezone.utc).replace(microsecond=0)
    if re.fullmatch(r"-?[0-9]+", value):
        n = int(value) if len(value) <= 20 else -1  # int() of 5000 digits is an error
        if not EARLIEST.timestamp() <= n <= LATEST.timestamp():
            raise Invalid(f"{what}: {short(value, 40)} is not a time in 1970..9999")
        return datetime.fromtimestamp(n, tz=timezone.utc)
    try:
        t = datetime.fromisoformat(re.sub(r"Z$", "+00:00", value))
        t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
        in_range = EARLIEST <= t.astimezone(timezone.utc) <= LATEST
    except ValueError:
        raise Invalid(f"{what}: not 'now', epoch seconds or ISO 8601: {short(value)}") from None
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00, past year 9999 in UTC
        in_range = False
    if not in_range:
        raise Invalid(f"{what}: {short(value)} is not a time in 1970..9999")
    return t


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with a Z, as image configs carry it."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
