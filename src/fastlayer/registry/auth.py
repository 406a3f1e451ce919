"""Credentials and WWW-Authenticate challenges (Docker's token flow).

Credentials come from the first file that names the registry among
`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json` and
`$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`), in their
shared form `{"auths": {"host:port": {"auth": base64("user:password")}}}`.
Credential helpers (`credsStore`, `credHelpers`) are not run. Credentials
are never printed: errors name the registry and the file, not their values.
Each file is schema-checked (a regular file of at most 4 MiB, `auths` an
object of objects, `auth`/`username`/`password` strings) before use; a bad
one is one error line naming the file and the field.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass

from fastlayer import untrusted
from fastlayer.registry.reference import DOCKER_HUB, DOCKER_HUB_API


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = ""  # never in a message: __repr__ below masks it

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, ***)"


def auth_files() -> list[str]:
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    files.append(os.path.join(docker, "config.json"))
    return files


def _host_of(key: str) -> str:
    """The host[:port] of an `auths` key ("https://index.docker.io/v1/" -> "index.docker.io")."""
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def _aliases(registry: str) -> set[str]:
    if registry in (DOCKER_HUB, DOCKER_HUB_API, "index.docker.io"):
        return {DOCKER_HUB, DOCKER_HUB_API, "index.docker.io"}
    return {registry}


def find_credentials(registry: str) -> Credentials | None:
    """The credentials stored for registry (host[:port]), or None: anonymous."""
    wanted = _aliases(registry)
    for path in auth_files():
        if not os.path.lexists(path):
            continue
        auths = _auths(path)
        for key, entry in auths.items():
            if _host_of(key) in wanted:
                where = f"registry credentials file {path}: auths[{untrusted.short(key, 60)}]"
                return _decode(untrusted.of_type(entry, dict, where), where)
    return None


def _auths(path: str) -> dict:
    """The `auths` object of a credentials file, its type checked."""
    what = "registry credentials file"
    doc = untrusted.load_json_file(path, what)
    if doc is None:
        return {}
    doc = untrusted.of_type(doc, dict, f"{what} {path}")
    auths = untrusted.field(doc, "auths", (dict, type(None)), f"{what} {path}", default={})
    return auths or {}


def _decode(entry: dict, where: str) -> Credentials:
    auth = untrusted.field(entry, "auth", (str, type(None)), where, default=None)
    if auth:
        try:
            user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            sep, user, password = "", "", ""
        if not sep:
            raise untrusted.Invalid(f"{where}.auth: not base64(user:password)")
        return Credentials(user, password)
    username = untrusted.field(entry, "username", (str, type(None)), where, default=None)
    password = untrusted.field(entry, "password", (str, type(None)), where, default=None)
    if username:
        return Credentials(username, password or "")
    raise untrusted.Invalid(f"{where}: has no auth or username")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lowercase
    params: dict[str, str]


_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> Challenge:
    """`Bearer realm="https://auth",service="reg",scope="repository:a:pull"` -> Challenge."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m[1].lower(): m[2] if m[2] is not None else m[3] for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)
