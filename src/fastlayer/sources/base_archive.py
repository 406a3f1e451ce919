"""A base image from a docker-archive (manifest.json form), as nixpkgs reads it."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Any

from fastlayer.errors import FastlayerError


@dataclass
class BaseArchive:
    """The first image of a docker-archive: its layer entries and config."""

    tar: tarfile.TarFile
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[tarfile.TarInfo]
    diff_ids: list[str]

    def close(self) -> None:
        self.tar.close()


def open_base_archive(path: str) -> BaseArchive:
    """Read manifest.json[0] and its config; layer bytes are copied later as they are."""
    try:
        tar = tarfile.open(path)
    except (OSError, tarfile.TarError) as e:
        raise FastlayerError(f"cannot read base image {path}: {e}") from None
    try:
        manifest = json.load(_member(tar, path, "manifest.json"))[0]
        config = json.load(_member(tar, path, manifest["Config"]))
        layers = [tar.getmember(name) for name in manifest["Layers"]]
        diff_ids = list(config["rootfs"]["diff_ids"])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        tar.close()
        raise FastlayerError(f"base image {path} is not a valid docker-archive: {e}") from None
    if len(diff_ids) != len(layers):
        tar.close()
        raise FastlayerError(
            f"base image {path}: {len(layers)} layers but {len(diff_ids)} diff_ids in its config"
        )
    return BaseArchive(tar, manifest, config, layers, diff_ids)


def _member(tar: tarfile.TarFile, path: str, name: str):
    try:
        f = tar.extractfile(name)
    except KeyError:
        f = None
    if f is None:
        raise FastlayerError(f"base image {path} has no {name}")
    return f
