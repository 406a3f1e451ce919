"""Bases written by other tools: an archive `podman save` wrote and an OCI layout
`skopeo copy` wrote are used as `from_image`; the child loads and runs in podman.

podman load checks every layer against the child's diff_ids, so a base layer
copied wrongly fails the load; the run shows the base's files and the child's
side by side. The base's diff_ids are read here from the tools' own output.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import validators
from closures import busybox_closure

import fastlayer

pytestmark = pytest.mark.validators


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A runnable base (busybox) as fastlayer writes it."""
    validators.require("busybox")
    work = tmp_path_factory.mktemp("base")
    root = work / "root"
    paths, graph = busybox_closure(root)
    (work / "etc-root").mkdir()
    (work / "etc-root" / "from-base").write_text("base file\n")
    out = work / "base.tar"
    fastlayer.build({
        "name": "localhost/fl-base", "tag": "1", "store_root": str(root),
        "contents": {"store_paths": [paths["busybox"]], "graph": str(graph),
                     "roots": [str(work / "etc-root")], "link_store_paths": True},
        "config": {"Env": ["FROM=base", "PATH=/bin"]},
    }, str(out))  # fmt: skip
    return out


def config_of_docker_archive(path: Path) -> dict:
    with tarfile.open(path) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        return json.load(t.extractfile(manifest["Config"]))


def config_of_oci_layout(layout: Path) -> dict:
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    return json.loads((blobs / manifest["config"]["digest"][7:]).read_text())


def child_on(base: Path, tmp_path: Path, podman) -> tuple[list[str], str]:
    """Build a child on base, load and run it; (its diff_ids, what it printed)."""
    (tmp_path / "child-root").mkdir()
    (tmp_path / "child-root" / "from-child").write_text("child file\n")
    out = tmp_path / "child.tar"
    fastlayer.build({
        "name": "localhost/fl-child", "tag": tmp_path.name[-20:].lower(), "from_image": str(base),
        "contents": {"roots": [str(tmp_path / "child-root")]}, "config": {"Env": ["FROM=child"]},
        "architecture": "amd64",
    }, str(out))  # fmt: skip
    (ref,) = podman.load(out)
    try:
        shown = podman.run(ref, "sh", "-c", 'cat /from-base /from-child; echo "$FROM"')
    finally:
        podman.rmi(ref)
    return config_of_docker_archive(out)["rootfs"]["diff_ids"], shown


def test_a_podman_saved_archive_is_a_base(base, tmp_path, fresh_podman):
    (loaded,) = fresh_podman.load(base)
    saved = tmp_path / "saved.tar"
    fresh_podman("save", "--format", "docker-archive", "-o", saved, loaded)
    fresh_podman.rmi(loaded)  # the child's load must bring the base layers itself
    want = config_of_docker_archive(saved)["rootfs"]["diff_ids"]
    with tarfile.open(saved) as t, tarfile.open(base) as ours:  # podman's bytes, not ours
        assert t.getnames() != ours.getnames()
    diff_ids, shown = child_on(saved, tmp_path, fresh_podman)
    assert diff_ids[: len(want)] == want and len(diff_ids) == len(want) + 1
    assert shown == "base file\nchild file\nchild\n"


def test_a_skopeo_written_oci_layout_is_a_base(base, tmp_path, fresh_podman):
    layout = validators.skopeo_copy_to_oci(base, tmp_path / "layout", "1")
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    assert all(x["mediaType"].endswith("+gzip") for x in manifest["layers"])  # skopeo's choice
    want = config_of_oci_layout(layout)["rootfs"]["diff_ids"]
    diff_ids, shown = child_on(layout, tmp_path, fresh_podman)
    assert diff_ids[: len(want)] == want and len(diff_ids) == len(want) + 1
    assert shown == "base file\nchild file\nchild\n"
