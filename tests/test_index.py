"""Multi-platform images: one image per platform and an OCI image index naming
them, pushed to a registry (push --index) or written into a layout (build --index)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import validators

PLATFORMS = {"amd64": {}, "arm64": {"variant": "v8"}}


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def specs(tmp_path: Path, name: str = "team/multi", tag: str = "2") -> list[str]:
    out = []
    for arch, extra in PLATFORMS.items():
        rootfs = tmp_path / f"rootfs-{arch}"
        rootfs.mkdir(exist_ok=True)
        (rootfs / "arch").write_text(arch + "\n")
        spec = {"name": name, "tag": tag, "architecture": arch, **extra,
                "contents": {"roots": [str(rootfs)]}, "config": {"Cmd": ["/bin/true"]}}  # fmt: skip
        f = tmp_path / f"{arch}.json"
        f.write_text(json.dumps(spec))
        out.append(str(f))
    return out


def fastlayer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastlayer", *args], capture_output=True, text=True
    )


def skopeo(*args: str) -> dict:
    return json.loads(validators.run_tool([validators.require("skopeo"), *args]))


@pytest.mark.validators
def test_push_index_names_each_platform_and_skopeo_picks_them(tmp_path, registry):
    dest = f"docker://{registry.host}/team/multi:2"
    r = fastlayer("push", "--index", *specs(tmp_path), dest, "--insecure")
    assert r.returncode == 0, r.stderr
    raw = skopeo("inspect", "--raw", "--tls-verify=false", dest)
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"] for m in raw["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    import hashlib

    assert (
        r.stdout.strip()
        == "sha256:"
        + hashlib.sha256(
            validators.run_tool(
                [validators.require("skopeo"), "inspect", "--raw", "--tls-verify=false", dest]
            ).encode()  # fmt: skip
        ).hexdigest()
    )
    for arch, extra in PLATFORMS.items():
        variant = ["--override-variant", extra["variant"]] if extra else []
        cfg = skopeo("inspect", "--config", "--tls-verify=false", "--override-arch", arch,
                     *variant, dest)  # fmt: skip
        assert cfg["architecture"] == arch
    # the members are pushed by digest only: no tag but the index's
    tags = skopeo("list-tags", "--tls-verify=false", f"docker://{registry.host}/team/multi")
    assert tags["Tags"] == ["2"]
    # and fastlayer pull resolves the index to the platform asked for
    out = tmp_path / "arm.tar"
    ref = f"{registry.host}/team/multi@{r.stdout.strip()}"
    p = fastlayer("pull", ref, "-o", str(out), "--insecure", "--arch", "arm64", "--variant", "v8")
    assert p.returncode == 0, p.stderr
    assert architecture(out) == "arm64"


@pytest.mark.validators
def test_podman_pulls_the_platform_it_asks_for_from_a_pushed_index(tmp_path, registry, podman):
    dest = f"{registry.host}/team/podman-multi:1"
    r = fastlayer("push", "--index", *specs(tmp_path), f"docker://{dest}", "--insecure")
    assert r.returncode == 0, r.stderr
    for arch in PLATFORMS:
        podman("pull", "--tls-verify=false", "--arch", arch, dest)
        assert podman.inspect(dest)["Architecture"] == arch
        podman.rmi(dest)


@pytest.mark.validators
def test_push_index_refuses_two_images_of_one_platform(tmp_path, registry):
    one = specs(tmp_path)[0]
    dest = f"docker://{registry.host}/team/twice:1"
    r = fastlayer("push", "--index", one, one, dest, "--insecure")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "one image per platform" in r.stderr
    assert registry.requests() == [] or all(
        "twice" not in path for _, path, _ in registry.requests()
    )


@pytest.mark.validators
def test_build_index_into_a_layout_read_by_skopeo(tmp_path):
    layout = tmp_path / "layout"
    r = fastlayer("build", "--index", *specs(tmp_path), "-o", str(layout), "--format", "oci-dir")
    assert r.returncode == 0, r.stderr
    index = json.loads((layout / "index.json").read_text())
    assert [m["annotations"] for m in index["manifests"]] == [
        {"org.opencontainers.image.ref.name": "2", "io.containerd.image.name": "team/multi:2"}
    ]
    digest = index["manifests"][0]["digest"]
    assert r.stdout.strip() == digest
    inner = json.loads((layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_text())
    assert [m["platform"]["architecture"] for m in inner["manifests"]] == ["amd64", "arm64"]
    for arch, extra in PLATFORMS.items():
        out = tmp_path / f"{arch}.tar"
        validators.run_tool([
            validators.require("skopeo"), "copy", "--override-arch", arch,
            *(["--override-variant", extra["variant"]] if extra else []),
            f"oci:{layout}:2", f"docker-archive:{out}:team/multi:{arch}",
        ])  # fmt: skip
        assert architecture(out) == arch


def test_build_index_needs_oci_dir_and_one_name(tmp_path):
    given = specs(tmp_path)
    r = fastlayer("build", "--index", *given, "-o", str(tmp_path / "x.tar"))
    assert r.returncode == 1 and "--format oci-dir" in r.stderr and r.stderr.count("\n") == 1
    other = json.loads(Path(given[1]).read_text())
    Path(given[1]).write_text(json.dumps({**other, "tag": "3"}))
    r = fastlayer("build", "--index", *given, "-o", str(tmp_path / "l"), "--format", "oci-dir")
    assert r.returncode == 1 and "the index's name and tag" in r.stderr
    assert not (tmp_path / "l").exists()


def architecture(image: Path) -> str:
    """The architecture in the config of the image, as fastlayer inspect reads it."""
    found = json.loads(fastlayer("inspect", str(image), "--json").stdout)
    return found["images"][0]["config"]["architecture"]


def test_inspect_picks_each_platform_of_a_layout_index(tmp_path):
    layout = tmp_path / "layout"
    r = fastlayer("build", "--index", *specs(tmp_path), "-o", str(layout), "--format", "oci-dir")
    assert r.returncode == 0, r.stderr
    layers = {}
    for arch in PLATFORMS:
        r = fastlayer("inspect", str(layout), "--arch", arch, "--json")
        assert r.returncode == 0, r.stderr
        image = json.loads(r.stdout)["images"][0]
        assert image["config"]["architecture"] == arch
        assert image["repo_tags"] == ["team/multi:2"]  # the index's name, not "(untagged)"
        layers[arch] = image["layers"][0]["diff_id"]
    assert layers["amd64"] != layers["arm64"]  # each its own /arch file
    r = fastlayer("inspect", str(layout), "--arch", "s390x")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "no linux/s390x manifest; it has: linux/amd64, linux/arm64/v8" in r.stderr
