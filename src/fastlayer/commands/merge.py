"""`fastlayer merge A.tar B.tar ... -o ALL.tar`: nixpkgs' mergeImages.

One docker-archive holding every image of the inputs: manifest.json entries
concatenated (untagged ones kept, RepoTags as they were), `repositories`
merged, every other entry copied as it is (owners, modes, names) and
written once: archive entries are content-addressed, so an entry name seen
twice must be the same entry, else the inputs are inconsistent.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile

from fastlayer.errors import FastlayerError
from fastlayer.sinks.compress import KINDS, kind_for
from fastlayer.sinks.docker_archive import DockerArchiveWriter
from fastlayer.sinks.docker_image import archive_writer

_MERGED = ("manifest.json", "repositories")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge docker-archives into one that holds every image",
        description="Write one docker-archive holding every image of the given "
        "docker-archives (like nixpkgs' mergeImages); shared layers are stored once.",
    )
    p.add_argument("archives", nargs="+", metavar="ARCHIVE", help="docker-archive files")
    p.add_argument("-o", "--output", help="write to this file atomically (default: stdout)")
    p.add_argument(
        "--compress",
        choices=(*KINDS, "auto"),
        default="auto",
        help="compress the whole archive (default: by the output's extension)",
    )
    p.set_defaults(func=run)


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _same(a: tarfile.TarInfo, b: tarfile.TarInfo) -> bool:
    return (a.type, a.size, a.linkname) == (b.type, b.size, b.linkname)


def merge(paths: list[str], out: DockerArchiveWriter) -> int:
    """Copy every image of paths into out; returns the number of images."""
    manifest: list = []
    repositories: dict[str, dict[str, str]] = {}
    seen: dict[str, tuple[tarfile.TarInfo, str]] = {}
    mtime = 0
    for path in paths:
        try:
            tar = tarfile.open(path)
        except (OSError, tarfile.TarError) as e:
            raise FastlayerError(f"cannot read {path}: {e}") from None
        with tar:
            members = {_norm(m.name): m for m in tar.getmembers()}
            if "manifest.json" not in members:
                raise FastlayerError(f"{path} has no manifest.json: not a docker-archive")
            mtime = max(mtime, members["manifest.json"].mtime)
            manifest += _json(tar, members["manifest.json"], path)
            if "repositories" in members:
                for name, tags in _json(tar, members["repositories"], path).items():
                    repositories.setdefault(name, {}).update(tags)
            for ti in tar:
                name = _norm(ti.name)
                if name in _MERGED:
                    continue
                if name in seen:
                    first, where = seen[name]
                    if not _same(first, ti):
                        raise FastlayerError(
                            f"{path}: entry {name} differs from the one in {where}"
                        )
                    continue
                seen[name] = (ti, path)
                out.add_tarinfo(ti, tar.extractfile(ti) if ti.isreg() else None)
    out.add_bytes("manifest.json", json.dumps(manifest, indent=4).encode(), mtime)
    if repositories:
        out.add_bytes("repositories", json.dumps(repositories, indent=4).encode(), mtime)
    return len(manifest)


def _json(tar: tarfile.TarFile, ti: tarfile.TarInfo, path: str):
    f = tar.extractfile(ti)
    try:
        return json.load(f)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise FastlayerError(f"{path}: {ti.name} is not valid JSON: {e}") from None


def run(args: argparse.Namespace) -> int:
    for path in args.archives:
        if not os.path.isfile(path):
            raise FastlayerError(f"no such archive: {path}")
    with archive_writer(args.output, kind_for(args.output, args.compress)) as out:
        merge(args.archives, out)
        out.close()
    return 0
