"""`fastlayer merge A.tar B.tar ... -o ALL.tar`: nixpkgs' mergeImages.

One docker-archive holding every image of the inputs: manifest.json entries
concatenated (untagged ones kept, RepoTags as they were), `repositories`
merged, every other entry copied as it is (owners, modes, names) and
written once: archive entries are content-addressed, so an entry name seen
twice must be the same entry, else the inputs are inconsistent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass

from fastlayer import untrusted as u
from fastlayer.errors import DigestMismatch, FastlayerError
from fastlayer.sinks.compress import KINDS, kind_for
from fastlayer.sinks.docker_archive import DockerArchiveWriter
from fastlayer.sinks.docker_image import archive_writer
from fastlayer.sources import schema
from fastlayer.sources.base_image import Guarded, HashingReader, _Files
from fastlayer.untrusted import Invalid

_MERGED = ("manifest.json", "repositories")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge docker-archives into one that holds every image",
        description="Write one docker-archive holding every image of the given "
        "docker-archives (like nixpkgs' mergeImages); shared layers are stored once.",
    )
    p.add_argument("archives", nargs="+", metavar="ARCHIVE", help="docker-archive files")
    p.add_argument(
        "-o",
        "--output",
        help="the archive (replaced whole when done; a symlink: the file it names), "
        "a fifo or character device to stream into, or '-' (default: stdout)",
    )
    p.add_argument(
        "--compress",
        choices=(*KINDS, "auto"),
        default="auto",
        help="compress the whole archive (default: by the output's extension)",
    )
    p.set_defaults(func=run)


@dataclass
class _Written:
    """An entry already in the output: whence, and what its bytes were."""

    ti: tarfile.TarInfo
    path: str
    sha256: str | None  # of the bytes as stored (regular entries)
    diff_id: str | None  # the checked diff_id, for a layer


def _same(first: _Written, files: _Files, ti: tarfile.TarInfo, diff_id: str | None) -> bool:
    """Whether ti, met again in another archive, is the entry already written.

    Names alone prove nothing (an archive may carry another image's config
    or layer name with other bytes): a layer must claim the same checked
    diff_id, anything else must have the same bytes."""
    a, b = first.ti, ti
    if (a.type, a.size, a.linkname) != (b.type, b.size, b.linkname):
        return False
    if not ti.isreg():
        return True
    if diff_id is not None or first.diff_id is not None:
        return diff_id == first.diff_id
    reader = HashingReader(Guarded(files.tar.extractfile(ti), files.where(ti.name)))  # type: ignore[union-attr,arg-type]
    while reader.read(1 << 20):
        pass
    return reader.digest.hexdigest() == first.sha256


def merge(paths: list[str], out: DockerArchiveWriter) -> int:
    """Copy every image of paths into out; returns the number of images."""
    manifest: list = []
    repositories: dict[str, dict[str, str]] = {}
    seen: dict[str, _Written] = {}
    mtime = 0
    for path in paths:
        files = _Files(path)
        if files.tar is None:
            raise FastlayerError(f"{path} is a directory, not a docker-archive file")
        with files.tar:
            entries, repos, expected = _check(files)
            mtime = max(mtime, files.members["manifest.json"].mtime)
            manifest += entries
            for name, tags in repos.items():
                repositories.setdefault(name, {}).update(tags)
            for ti in files.tar.getmembers():
                name = u.member_name(ti.name, f"image {path}: member")
                if name in _MERGED:
                    continue
                if name in seen:
                    first = seen[name]
                    if not _same(first, files, ti, expected.get(name)):
                        raise Invalid(f"{path}: entry {name} differs from the one in {first.path}")
                    continue
                digest = _copy(files, ti, out, expected.get(name))
                seen[name] = _Written(ti, path, digest, expected.get(name))
    out.add_bytes("manifest.json", json.dumps(manifest, indent=4).encode(), mtime)
    if repositories:
        out.add_bytes("repositories", json.dumps(repositories, indent=4).encode(), mtime)
    return len(manifest)


def _check(files: _Files) -> tuple[list[dict], dict[str, dict[str, str]], dict[str, str]]:
    """manifest.json, configs and repositories checked, every file they name a
    regular member of this archive (possibly through links inside it);
    returns the diff_id each layer member must hash to as well."""
    if "manifest.json" not in files.members:
        raise FastlayerError(f"{files.path} has no manifest.json: not a docker-archive")
    where = files.where("manifest.json")
    entries = schema.docker_manifest(files.json("manifest.json"), where, allow_empty=True)
    expected: dict[str, str] = {}
    for i, entry in enumerate(entries):
        files.member(entry["Config"], f"{where}[{i}].Config")
        config = schema.image_config(files.json(entry["Config"]), files.where(entry["Config"]))
        diff_ids = schema.diff_ids_match(len(entry["Layers"]), config, f"image {files.path}")
        for k, (name, diff_id) in enumerate(zip(entry["Layers"], diff_ids, strict=True)):
            target = files.member(name, f"{where}[{i}].Layers[{k}]")
            key = u.member_name(target.name, where)
            if expected.setdefault(key, diff_id) != diff_id:
                raise Invalid(f"{where}[{i}].Layers[{k}]: {name} is given two diff_ids")
    repos: dict[str, dict[str, str]] = {}
    if "repositories" in files.members:
        repos = schema.repositories(files.json("repositories"), files.where("repositories"))
    return entries, repos, expected


def _copy(
    files: _Files, ti: tarfile.TarInfo, out: DockerArchiveWriter, diff_id: str | None
) -> str | None:
    """An entry copied as it is: a file, a directory, or a link to a regular
    member of the same archive; never a device, fifo or a link leaving it.
    A layer's bytes are checked against its diff_id as they are copied.
    Returns the sha256 hex of a regular entry's bytes."""
    where = files.where(ti.name)
    if ti.issym() or ti.islnk():
        files.member(ti.name, where)  # must end at a regular member inside
    elif not (ti.isreg() or ti.isdir()):
        raise Invalid(f"{where}: is a device or fifo entry, which no image holds")
    if not ti.isreg():
        out.add_tarinfo(ti, None)
        return None
    src = HashingReader(Guarded(files.tar.extractfile(ti), where))  # type: ignore[union-attr,arg-type]
    out.add_tarinfo(ti, src)  # type: ignore[arg-type]
    if diff_id is None:
        return src.digest.hexdigest()
    got = "sha256:" + src.digest.hexdigest()
    if got != diff_id and files.plain(ti.name)[0] is not None:  # a compressed one: below
        raise DigestMismatch(f"{where}: content hashes to {got}, not its diff_id {diff_id}")
    if got != diff_id:
        _check_compressed(files, ti.name, where, diff_id)
    return src.digest.hexdigest()


def _check_compressed(files: _Files, name: str, where: str, diff_id: str) -> None:
    """A layer stored compressed is checked on its uncompressed bytes."""
    digest = hashlib.sha256()
    with files.opener(name)() as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if "sha256:" + digest.hexdigest() != diff_id:
        raise DigestMismatch(
            f"{where}: content hashes to sha256:{digest.hexdigest()}, not its diff_id {diff_id}"
        )


def run(args: argparse.Namespace) -> int:
    for path in args.archives:
        if not os.path.lexists(path):
            raise FastlayerError(f"no such archive: {path}")
    with archive_writer(args.output, kind_for(args.output, args.compress)) as out:
        merge(args.archives, out)
        out.close()
    return 0
