"""docker-archive sink: current spec (manifest.json) and legacy spec (v1) at once.

Legacy layer ids are chain ids (OCI image spec: ChainID(L0) = DiffID(L0),
ChainID(..Ln) = sha256(ChainID(..Ln-1) + " " + DiffID(Ln))), so they are
known as soon as a layer's bytes are, and the layer entry is written once
as `<chain id hex>/layer.tar`, the path both manifest.json and the v1 form
use. Lower layers get `<chain id>/json` {id, parent} and `VERSION`.

The top layer's v1 json also carries the image config, so its id must
differ between images that share every layer but not the config (else a
merged archive would hold two `json`s under one name): it is
sha256(ChainID + " " + config digest), and its directory holds `json`,
`VERSION` and `layer.tar` as a symlink to `../<chain id>/layer.tar`, as
docker save does for shared layers. No layer's bytes are stored twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator

from fastlayer.model import MT_DOCKER_LAYER, LayerSource, WrittenLayer
from fastlayer.sinks.base import Finishing, ImageRecord, config_bytes, full_tags, split_ref
from fastlayer.sinks.compress import CompressingPipe
from fastlayer.sinks.docker_archive import DockerArchiveWriter
from fastlayer.sinks.output import output_fd


def chain_id(parent: str | None, diff_hex: str) -> str:
    """Hex chain id of a layer over its parent's chain id (hex), per the OCI spec."""
    if parent is None:
        return diff_hex
    return hashlib.sha256(f"sha256:{parent} sha256:{diff_hex}".encode()).hexdigest()


def top_legacy_id(chain_hex: str, config_digest: str) -> str:
    return hashlib.sha256(f"sha256:{chain_hex} {config_digest}".encode()).hexdigest()


class DockerArchiveSink(Finishing):
    stores_blob = None  # layers are stored uncompressed (see cache/fetch.py)

    def __init__(self, writer: DockerArchiveWriter, name: str = "", tag: str = "", mtime: int = 0):
        self.writer = writer
        self.name, self.tag, self.mtime = name, tag, mtime
        self.chain: list[str] = []  # chain id hex of each layer so far
        self.layers: list[WrittenLayer] = []

    def add_layer(self, source: LayerSource, comment: str = "") -> WrittenLayer:
        parent = self.chain[-1] if self.chain else None
        hexd, size = self.writer.add_layer_as(
            source, self.mtime, lambda h: f"{chain_id(parent, h)}/layer.tar"
        )
        self.chain.append(chain_id(parent, hexd))
        layer = WrittenLayer(f"sha256:{hexd}", size, f"sha256:{hexd}", size, MT_DOCKER_LAYER)
        layer.offset = self.writer.last_offset  # None unless on a regular file, uncompressed
        self.layers.append(layer)
        return layer

    def finish(self, config: dict, repo_tags: list[str]) -> ImageRecord:
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if diff_ids != [x.diff_id for x in self.layers]:
            raise ValueError("config rootfs.diff_ids do not match the layers written")
        raw = config_bytes(config)
        config_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        tags = full_tags(repo_tags, self.name, self.tag)
        top = self._legacy(config, config_digest) if self.layers else None
        w, mtime = self.writer, self.mtime
        w.add_bytes(f"{config_digest[7:]}.json", raw, mtime)
        manifest = [
            {
                "Config": f"{config_digest[7:]}.json",
                "RepoTags": tags or None,  # null for an untagged image, as docker writes
                "Layers": [f"{c}/layer.tar" for c in self.chain],
            }
        ]
        w.add_bytes("manifest.json", _dumps(manifest), mtime)
        if top is not None and tags:
            repositories: dict[str, dict[str, str]] = {}
            for ref in tags:
                name, tag = split_ref(ref)
                repositories.setdefault(name, {})[tag] = top
            w.add_bytes("repositories", _dumps(repositories), mtime)
        w.close()
        self.finished = True
        return ImageRecord(config_digest, None, list(self.layers))

    def _legacy(self, config: dict, config_digest: str) -> str:
        """Write the v1 `json`/`VERSION` entries; returns the top layer's legacy id."""
        w, mtime = self.writer, self.mtime
        for i, c in enumerate(self.chain[:-1]):
            w.add_bytes(f"{c}/VERSION", b"1.0", mtime)
            w.add_bytes(f"{c}/json", _dumps(_v1(c, self.chain[i - 1] if i else None)), mtime)
        top = top_legacy_id(self.chain[-1], config_digest)
        parent = self.chain[-2] if len(self.chain) > 1 else None
        v1 = _v1(top, parent)
        v1.update((k, v) for k, v in config.items() if k not in ("rootfs", "history"))
        w.add_bytes(f"{top}/VERSION", b"1.0", mtime)
        w.add_bytes(f"{top}/json", _dumps(v1), mtime)
        w.add_symlink(f"{top}/layer.tar", f"../{self.chain[-1]}/layer.tar", mtime)
        return top

    def abort(self) -> None:
        self.writer.abort()


def _v1(layer_id: str, parent: str | None) -> dict:
    return {"id": layer_id, "parent": parent} if parent else {"id": layer_id}


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, indent=4).encode("utf-8")


@contextlib.contextmanager
def archive_writer(output: str | None, kind: str) -> Iterator[DockerArchiveWriter]:
    """A DockerArchiveWriter on output (atomic), compressed whole when kind says so.

    The body must close() the writer when done; on an exception the writer
    is aborted and nothing is left at output."""
    with output_fd(output) as fd:
        pipe = CompressingPipe(kind, fd) if kind != "none" else None
        writer = DockerArchiveWriter(pipe.fd if pipe else fd)
        try:
            yield writer
        except BaseException:
            writer.abort()
            if pipe is not None:
                with contextlib.suppress(Exception):
                    pipe.close()
            raise
        if pipe is not None:
            pipe.close()


@contextlib.contextmanager
def docker_archive_sink(
    output: str | None, kind: str, name: str, tag: str, mtime: int
) -> Iterator[DockerArchiveSink]:
    """A DockerArchiveSink on output, the whole archive compressed when kind says so."""
    with archive_writer(output, kind) as writer:
        sink = DockerArchiveSink(writer, name, tag, mtime)
        yield sink
        sink.check_finished()
