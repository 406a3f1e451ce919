"""A base image from a docker-archive (manifest.json form), as nixpkgs reads it."""

from __future__ import annotations

import copy
import tarfile
from dataclasses import dataclass
from typing import Any

from fastlayer import untrusted as u
from fastlayer.errors import FastlayerError
from fastlayer.sources import schema
from fastlayer.sources.base_image import _Files


@dataclass
class BaseArchive:
    """The first image of a docker-archive: its layer entries and config.

    Every layer entry is a regular member of the archive: a layer that is a
    symlink or hard link to another member (docker save makes these) is given
    as a regular entry with the link's name and the target's data, so what is
    copied into the output never points anywhere."""

    tar: tarfile.TarFile
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[tarfile.TarInfo]
    diff_ids: list[str]

    def close(self) -> None:
        self.tar.close()


def open_base_archive(path: str) -> BaseArchive:
    """Read manifest.json[0] and its config; layer bytes are copied later as they are."""
    files = _Files(path)
    if files.tar is None:
        raise FastlayerError(f"base image {path} is a directory, not a docker-archive file")
    try:
        where = files.where("manifest.json")
        manifest = schema.docker_manifest(files.json("manifest.json"), where)[0]
        name = manifest["Config"]
        config = schema.image_config(files.json(name), files.where(name))
        layers = [
            _regular(files, name, f"{where}[0].Layers[{i}]")
            for i, name in enumerate(manifest["Layers"])
        ]
        diff_ids = schema.diff_ids_match(len(layers), config, f"image {path}")
        for ti in layers:
            files.plain(ti.name)  # a truncated member is refused before any output
    except BaseException:
        files.tar.close()
        raise
    return BaseArchive(files.tar, manifest, config, layers, diff_ids)


def _regular(files: _Files, name: str, where: str) -> tarfile.TarInfo:
    """The regular member name resolves to, under the name the manifest gives."""
    member = files.members.get(u.member_name(name, where))
    target = files.member(name, where)
    if member is target:
        return member
    entry = copy.copy(target)  # keeps the target's data offset and size
    entry.name = member.name if member is not None else name
    return entry
