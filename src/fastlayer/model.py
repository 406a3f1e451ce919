"""The one image model every part speaks: an Image is a config plus ordered Layers.

Sources produce these, sinks consume them. A Layer knows its diff_id (the
sha256 of its uncompressed tar) and how to open its uncompressed bytes; it
does not hold them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

# OCI and Docker media types used across sources and sinks.
OCI_LAYOUT_VERSION = "1.0.0"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@dataclass
class Layer:
    """One layer: its identity and a way to read its uncompressed tar once."""

    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    open: Callable[[], BinaryIO]  # a fresh reader of the uncompressed bytes
    size: int | None = None  # uncompressed size, when known without reading
    comment: str = ""  # what is in it, for history and inspect
    # (file, offset): where the uncompressed bytes lie as they are, so a sink
    # may have the kernel copy them (copy_file_range) instead of reading them
    region: tuple[str, int] | None = None


@dataclass
class Image:
    """An image config (the full JSON document) and its layers, bottom first."""

    config: dict[str, Any]
    layers: list[Layer]
    repo_tags: list[str] = field(default_factory=list)

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]


@dataclass(frozen=True)
class Known:
    """What a layer cache says a layer holds, before any byte is produced: a hint
    a sink may act on only where it checks it (see fastlayer.cache)."""

    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    size: int
    blobs: dict[str, tuple[str, int]] = field(default_factory=dict)  # blob kind -> digest, size


def compression_of(media_type: str) -> str:
    """ "gzip", "zstd" or "none": how a layer blob of media_type is compressed."""
    for kind in ("gzip", "zstd"):
        if media_type.endswith(kind):
            return kind
    return "none"


class LayerSource(Protocol):
    """What a sink consumes: a layer's uncompressed tar, produced exactly once.

    size is the exact byte count when known before producing (a walked
    store layer), else None (a decompressed base layer). known, when a
    source has it, is what a cache says the bytes will be (model.Known)."""

    size: int | None

    def pump(self, write: Callable[[memoryview], object]) -> str:
        """Write all bytes through write(); return their sha256 hex."""
        ...


@dataclass
class WrittenLayer:
    """What a sink recorded for one layer."""

    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    size: int  # uncompressed bytes
    digest: str  # "sha256:<hex>" of the blob as stored (== diff_id when uncompressed)
    blob_size: int
    media_type: str = MT_OCI_LAYER
    # where the uncompressed bytes start in the output file, when they lie there
    # as they are (an uncompressed archive on a regular file): a batch copies
    # them from there into the next image that has the layer
    offset: int | None = None
