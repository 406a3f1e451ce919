"""Checks for everything read from outside: images, registry answers, specs,
confs, graphs, plans and auth files (DESIGN.md section 9).

Every reader calls these before it uses a value, so a crafted input ends in
one FastlayerError line that names the file, the field and what was wrong,
never in a traceback, a host file read or an unbounded read. `where` is the
human name of the value being checked, e.g. "image base.tar: manifest.json[0].Layers[2]".
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, TypeVar

from fastlayer.errors import FastlayerError

# containerd's cap for manifests, configs and indexes: far above any real
# one, far below what would hurt memory.
MAX_JSON = 4 << 20
# Sizes and counts read from outside must fit a signed 64-bit integer.
MAX_INT = (1 << 63) - 1
# uid_t/gid_t are 32 bits and 2^32-1 is (uid_t)-1, "leave unchanged" to chown:
# never an owner.
MAX_ID = (1 << 32) - 2
# JSON nesting deeper than this is no image, spec or graph we read.
MAX_DEPTH = 64

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
# Image names and tags as the distribution spec allows them, with an optional
# registry host[:port] first: what podman, skopeo and registries accept.
IMAGE_NAME = re.compile(
    r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
)
IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

T = TypeVar("T")


class Invalid(FastlayerError):
    """A value read from outside does not have the form it must have."""


def digest(value: object, where: str) -> str:
    """value, if it is `sha256:` + 64 lowercase hex (or `sha512:` + 128)."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise Invalid(f"{where}: not a digest (sha256:<64 hex>): {short(value)}")
    return value


def image_ref(value: object, where: str) -> str:
    """value, if it is NAME or NAME:TAG with the grammar registries accept."""
    ref = of_type(value, str, where)
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # no tag; a colon there belonged to a registry port
        name, tag = ref, "latest"
    if not IMAGE_NAME.fullmatch(name) or not IMAGE_TAG.fullmatch(tag):
        raise Invalid(
            f"{where}: {short(ref)} is not an image reference (lowercase [registry/]path[:tag])"
        )
    return ref


def blob_path(value: object, where: str) -> str:
    """blobs/<alg>/<hex> for a checked digest: it can name nothing else."""
    algo, _, hexpart = digest(value, where).partition(":")
    return f"blobs/{algo}/{hexpart}"


def short(value: object, limit: int = 80) -> str:
    """A repr fit for a one-line message: shortened, control characters escaped."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def of_type(value: object, typ: type[T] | tuple[type, ...], where: str) -> T:
    """value if it is of typ (a bool is never an int here)."""
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join(_type_name(t) for t in types)
        raise Invalid(f"{where}: must be {names}, not {_type_name(type(value))} {short(value)}")
    return value  # type: ignore[return-value]


def _type_name(t: type) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "an integer",
        bool: "true or false",
        float: "a number",
        type(None): "null",
    }.get(t, t.__name__)


def field(
    obj: dict, key: str, typ: type[T] | tuple[type, ...], where: str, default: Any = ...
) -> T:
    """obj[key] checked against typ; a missing key is an error unless a default is given."""
    if key not in obj:
        if default is ...:
            raise Invalid(f"{where}: missing {key!r}")
        return default  # type: ignore[no-any-return]
    return of_type(obj[key], typ, f"{where}.{key}")


def str_list(value: object, where: str, *, allow_none: bool = False) -> list[str]:
    """A list of strings (None too, when allowed, read as [])."""
    if value is None and allow_none:
        return []
    items = of_type(value, list, where)
    for i, item in enumerate(items):
        of_type(item, str, f"{where}[{i}]")
    return items


def str_dict(value: object, where: str, *, allow_none: bool = False) -> dict[str, str]:
    """An object whose values are all strings."""
    if value is None and allow_none:
        return {}
    items = of_type(value, dict, where)
    for k, v in items.items():
        of_type(v, str, f"{where}[{k!r}]")
    return items


def known_keys(table: object, known: Sequence[str], where: str) -> None:
    """Refuse a key of table not in known: one line naming each unknown key, the
    nearest known key for a typo (`max_layer (did you mean max_layers?)`, any
    letter case), and every known key."""
    unknown = sorted((k for k in table if k not in known), key=str)  # type: ignore[attr-defined]
    if not unknown:
        return
    import difflib

    by_lower = {k.lower(): k for k in known}

    def named(key: object) -> str:
        near = difflib.get_close_matches(str(key).lower(), list(by_lower), n=1)
        return short(key, 40) + (f" (did you mean {by_lower[near[0]]}?)" if near else "")

    noun = "key" if len(unknown) == 1 else "keys"
    listed = ", ".join(named(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    raise Invalid(f"{where}: unknown {noun} {listed}; known keys: {', '.join(known)}")


def integer(value: object, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """An integer (not a bool, not a float) within [lo, hi]."""
    n = of_type(value, int, where)
    if not lo <= n <= hi:
        raise Invalid(f"{where}: {short(n, 40)} is out of range [{lo}, {hi}]")
    return n


def each(value: object, where: str, check: Callable[[Any, str], T]) -> list[T]:
    """check applied to every item of a list, each named by its index."""
    return [check(item, f"{where}[{i}]") for i, item in enumerate(of_type(value, list, where))]


# JSON


def parse_json(data: bytes | str, where: str, max_depth: int | None = MAX_DEPTH) -> Any:
    """JSON text to a value; malformed, over-deep or non-UTF-8 text is one line.

    max_depth=None skips the depth walk (for large graphs, whose loaders check
    every value's type anyway); nesting past the parser's stack is still one line."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise Invalid(f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"{where}: not valid JSON: {e}") from None
    if max_depth is not None:
        _check_depth(value, where, max_depth)
    return value


def _check_depth(value: Any, where: str, max_depth: int) -> None:
    # Iterative, so a deep document cannot blow the stack of whoever walks it later.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise Invalid(f"{where}: JSON nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))


def read_capped(f: BinaryIO, where: str, cap: int = MAX_JSON) -> bytes:
    """All of f, refusing more than cap bytes (reads at most cap + 1)."""
    data = f.read(cap + 1)
    if len(data) > cap:
        raise Invalid(f"{where}: larger than {cap} bytes")
    return data


def read_json(f: BinaryIO, where: str, cap: int = MAX_JSON) -> Any:
    return parse_json(read_capped(f, where, cap), where)


def load_json_file(path: str, what: str, cap: int = MAX_JSON) -> Any:
    """A JSON document from a user-named file: regular files only, size capped."""
    with open_regular(path, what) as f:
        return read_json(f, f"{what} {path}", cap)


# Files


def open_regular(path: str, what: str, *, follow: bool = True) -> BinaryIO:
    """Open path for reading only if it is a regular file.

    O_NONBLOCK makes opening a fifo return at once instead of waiting for a
    writer, so a fifo, socket or device is refused by its type before any
    byte is read; follow=False also refuses a symlink."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:  # the last component is a symlink
            raise Invalid(f"{what} {path}: is a symlink") from None
        raise FastlayerError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Invalid(f"{what} {path}: is {file_kind(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_kind(mode: int) -> str:
    """'a directory', 'a fifo', ... for messages."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "a special file"


def member_name(value: object, where: str) -> str:
    """A relative name inside an archive or directory, normalised: no absolute
    name, no `..` component, no NUL; `./` prefixes dropped."""
    name = of_type(value, str, where)
    if "\0" in name or not name:
        raise Invalid(f"{where}: not a usable name: {short(name)}")
    if name.startswith("/"):
        raise Invalid(f"{where}: absolute name {short(name)} (must stay inside the image)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Invalid(f"{where}: name {short(name)} leaves the image (has '..')")
    if not parts:
        raise Invalid(f"{where}: not a usable name: {short(name)}")
    return "/".join(parts)


def resolve_inside(root: str, name: str, where: str) -> str:
    """The real path of root/name, which must be a regular file inside root
    (symlinks are followed only while they stay inside root)."""
    rel = member_name(name, where)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise Invalid(f"{where}: {short(name)} resolves outside the image ({real})")
    try:
        st = os.lstat(real)
    except OSError as e:
        raise Invalid(f"{where}: {short(name)}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Invalid(f"{where}: {short(name)} is {file_kind(st.st_mode)}, not a regular file")
    return real


def open_inside(root: str, name: str, where: str) -> BinaryIO:
    """root/name opened for reading: a regular file inside root, or an error."""
    real = resolve_inside(root, name, where)
    return open_regular(real, where, follow=False)
