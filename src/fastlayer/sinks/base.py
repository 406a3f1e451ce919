"""The one interface every image sink speaks (fastlayer.sinks.open_sink picks one).

A sink takes layers bottom first (each produced exactly once), then the
image config, and writes one image: a docker-archive (current and legacy
spec at once), an OCI image layout directory, or an OCI archive. Used as

    with open_sink("out.tar", "docker-archive") as sink:
        layers = [sink.add_layer(src, comment) for src, comment in ...]
        record = sink.finish(config, ["reg.example:5000/app:1"])

Output is atomic: on any error (or if finish() was never called) nothing
is left at the output path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from fastlayer.model import LayerSource, WrittenLayer


@dataclass
class ImageRecord:
    """What a sink wrote for one image."""

    config_digest: str  # "sha256:<hex>" of the config JSON bytes: the image id
    manifest_digest: str | None  # OCI manifest digest; None for docker-archive
    layers: list[WrittenLayer]


class ImageSink(Protocol):
    def add_layer(self, source: LayerSource, comment: str = "") -> WrittenLayer:
        """Write the next layer (image order, bottom first)."""
        ...

    def finish(self, config: dict, repo_tags: list[str]) -> ImageRecord:
        """Write the config (rootfs.diff_ids and history filled by the caller) and index."""
        ...

    def abort(self) -> None:
        """Stop after a failure; open_sink then removes whatever was written."""
        ...


def config_bytes(config: dict[str, Any]) -> bytes:
    """The config as every sink stores it (nixpkgs' form), so the image id is the same."""
    return json.dumps(config, indent=4).encode("utf-8")


def split_ref(ref: str) -> tuple[str, str]:
    """("reg.example:5000/team/app", "tag") of a reference; tag "latest" when absent."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # the colon belonged to a registry port
        return ref, "latest"
    return name, tag


def full_tags(repo_tags: list[str], name: str, tag: str) -> list[str]:
    """repo_tags as `name:tag` references; name/tag of open_sink when none are given."""
    if not repo_tags and name:
        repo_tags = [f"{name}:{tag or 'latest'}"]
    return [":".join(split_ref(t)) for t in repo_tags]


class Finishing:
    """Tracks finish() so the context managers can refuse an image left unfinished."""

    finished = False

    def check_finished(self) -> None:
        if not self.finished:
            raise RuntimeError("image sink closed without finish(): nothing written")
