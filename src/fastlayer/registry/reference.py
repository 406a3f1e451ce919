"""Image references: `[docker://]HOST[:PORT]/a/b[:TAG][@sha256:HEX]`, as Docker reads them.

The first component is a registry host only if it has a `.` or a `:` or is
`localhost`; otherwise the image is on Docker Hub, whose API host is
registry-1.docker.io and whose one-component names live under `library/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastlayer.errors import FastlayerError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    registry: str  # as written ("localhost:5000", "docker.io")
    repository: str  # "team/app" ("library/busybox" on Docker Hub)
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """host[:port] that serves /v2/."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """registry/repository, the image name for RepoTags."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What /v2/<name>/manifests/<reference> takes: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return (
            self.name
            + (f":{self.tag}" if self.tag else "")
            + (f"@{self.digest}" if self.digest else "")
        )


def parse_reference(text: str) -> Reference:
    """A Reference, or FastlayerError naming what is wrong with text."""
    rest = text.removeprefix("docker://")
    rest, _, digest = rest.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise FastlayerError(f"{text}: a digest is sha256: and 64 lowercase hex digits")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    name, colon, tag = path.rpartition(":")
    if not colon:
        name, tag = path, ""
    if tag and not _TAG.fullmatch(tag):
        raise FastlayerError(f"{text}: invalid tag {tag!r}")
    if not name or not all(_COMPONENT.fullmatch(c) for c in name.split("/")):
        raise FastlayerError(
            f"{text}: invalid repository name {name!r} (lowercase letters, digits, . _ - and /)"
        )
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    return Reference(registry, name, tag or None, digest or None)
