"""Hostile and broken base images (issue 9): every reader of a base image
(build, stream-nix, merge, inspect) ends a bad one with one error line naming
the culprit, exit 1, no traceback, nothing written, no host byte copied.

The host "secret" is a temp file with a random marker; each test checks the
marker appears in no output fastlayer leaves behind."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from mutate import tar_bytes
from test_stream_nix import make_store, write_conf

from fastlayer.cli import main


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


LAYERS = [tar_bytes({f"etc/file{i}": f"layer {i}\n".encode() * (1000 * i + 1)}) for i in range(3)]


def good_config(layers: list[bytes] = LAYERS) -> dict:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:01Z",
        "config": {"Env": ["A=1"], "Cmd": ["/bin/sh"], "Labels": {"k": "v"}},
        "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
        "history": [{"created": "1970-01-01T00:00:01Z", "comment": "base"}],
    }


def good_manifest(n: int = len(LAYERS)) -> list:
    return [{"Config": "config.json", "RepoTags": ["base:1"], "Layers": _names(n)}]


def _names(n: int) -> list[str]:
    return [f"l{i}/layer.tar" for i in range(n)]


def member(name: str, data: bytes = b"", **kw) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in kw.items():
        setattr(ti, k, v)
    if ti.type != tarfile.REGTYPE:
        ti.size = 0
    return ti, data


def docker_tar(
    path: Path,
    *,
    manifest: object = None,
    config: object = None,
    replace: dict[str, tuple[tarfile.TarInfo, bytes]] | None = None,
    layers: list[bytes] = LAYERS,
    config_bytes: bytes | None = None,
) -> Path:
    """A docker-archive: config.json, l<i>/layer.tar, manifest.json, with any
    member replaced (by a link, a device...) or the JSON documents swapped."""
    entries = {"config.json": member("config.json", config_bytes or _j(config or good_config()))}
    for name, data in zip(_names(len(layers)), layers, strict=True):
        entries[name] = member(name, data)
    entries.update(replace or {})
    entries["manifest.json"] = member(
        "manifest.json", _j(good_manifest() if manifest is None else manifest)
    )
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in entries.values():
            t.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return path


def _j(value: object) -> bytes:
    return json.dumps(value).encode()


def docker_dir(root: Path, manifest: object = None, config: object = None) -> Path:
    root.mkdir()
    (root / "config.json").write_bytes(_j(config or good_config()))
    for name, data in zip(_names(len(LAYERS)), LAYERS, strict=True):
        (root / name).parent.mkdir()
        (root / name).write_bytes(data)
    (root / "manifest.json").write_bytes(_j(good_manifest() if manifest is None else manifest))
    return root


def oci_dir(root: Path, *, index=None, manifest=None, config=None) -> tuple[Path, dict]:
    """An OCI layout; returns it and its documents (for rewriting)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, mt: str) -> dict:
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return {"mediaType": mt, "digest": sha(data), "size": len(data)}

    mt = "application/vnd.oci.image."
    cfg = blob(_j(config or good_config()), mt + "config.v1+json")
    descs = [blob(x, mt + "layer.v1.tar") for x in LAYERS]
    doc = manifest or {"schemaVersion": 2, "config": cfg, "layers": descs}
    m = blob(_j(doc), mt + "manifest.v1+json")
    m["annotations"] = {"org.opencontainers.image.ref.name": "1"}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_bytes(_j(index or {"schemaVersion": 2, "manifests": [m]}))
    return root, {"config": cfg, "layers": descs, "manifest": m}


@pytest.fixture
def secret(tmp_path) -> Path:
    """A host file no image may ever contain."""
    marker = ("HOSTSECRET-" + secrets.token_hex(16) + "\n").encode()
    p = tmp_path / "host-secret"
    p.write_bytes(marker * 64)
    return p


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def spec_for(tmp_path: Path, base: Path, verify: bool = True) -> Path:
    motd = tmp_path / "motd"
    motd.write_text("hello\n")
    spec = {
        "name": "hostile/child",
        "tag": "t",
        "from_image": str(base),
        "verify_base": verify,
        "contents": {"files": [str(motd)]},
    }
    p = tmp_path / f"spec-{verify}.json"
    p.write_text(json.dumps(spec))
    return p


def fails(capsys, argv: list[str], culprit: str, out_dir: Path | None = None) -> str:
    """main(argv) ends in exactly one error line naming culprit, leaving nothing."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlayer: error: "), err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in err
    if out_dir is not None:
        assert os.listdir(out_dir) == []
    return lines[0]


def fails_proc(argv: list[str], culprit: str, out_dir: Path | None = None) -> str:
    """The same in a child process, with a deadline: for inputs that could block."""
    r = subprocess.run([sys.executable, "-m", "fastlayer", *argv], capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlayer: error: "), err
    assert culprit in lines[0], lines[0]
    if out_dir is not None:
        assert os.listdir(out_dir) == []
    return lines[0]


def build_fails(capsys, tmp_path, base: Path, culprit: str, out_dir: Path) -> str:
    out = out_dir / "img.tar"
    return fails(
        capsys, ["build", "-q", str(spec_for(tmp_path, base)), "-o", str(out)], culprit, out_dir
    )


def no_secret_in(paths: list[Path], secret: Path) -> None:
    marker = secret.read_bytes()[:40]
    for p in paths:
        for f in [p] if p.is_file() else [x for x in p.rglob("*") if x.is_file()]:
            assert marker not in f.read_bytes(), f


# --- names resolve inside their archive -------------------------------------------


def test_docker_archive_layer_named_by_absolute_path(capsys, tmp_path, out_dir, secret):
    m = good_manifest()
    m[0]["Layers"][0] = str(secret)
    base = docker_tar(tmp_path / "b.tar", manifest=m)
    line = build_fails(capsys, tmp_path, base, "manifest.json[0].Layers[0]", out_dir)
    assert "absolute" in line


def test_docker_archive_layer_named_with_dotdot(capsys, tmp_path, out_dir):
    m = good_manifest()
    m[0]["Layers"][1] = "../../x"
    base = docker_tar(tmp_path / "b.tar", manifest=m)
    build_fails(capsys, tmp_path, base, "Layers[1]", out_dir)


def test_docker_dir_layer_named_by_absolute_path(capsys, tmp_path, out_dir, secret):
    m = good_manifest()
    m[0]["Layers"][0] = str(secret)
    base = docker_dir(tmp_path / "b", manifest=m)
    build_fails(capsys, tmp_path, base, "Layers[0]", out_dir)


def test_docker_dir_layer_symlink_to_host_file(capsys, tmp_path, out_dir, secret):
    base = docker_dir(tmp_path / "b")
    (base / "l0" / "layer.tar").unlink()
    (base / "l0" / "layer.tar").symlink_to(secret)
    line = build_fails(capsys, tmp_path, base, "l0/layer.tar", out_dir)
    assert "outside" in line


def test_docker_dir_config_symlink_to_dev_zero(capsys, tmp_path, out_dir):
    base = docker_dir(tmp_path / "b")
    (base / "config.json").unlink()
    (base / "config.json").symlink_to("/dev/zero")
    build_fails(capsys, tmp_path, base, "config.json", out_dir)


def test_docker_dir_layer_fifo_does_not_block(tmp_path, out_dir):
    base = docker_dir(tmp_path / "b")
    (base / "l1" / "layer.tar").unlink()
    os.mkfifo(base / "l1" / "layer.tar")
    spec = spec_for(tmp_path, base)
    line = fails_proc(
        ["build", "-q", str(spec), "-o", str(out_dir / "i.tar")], "l1/layer.tar", out_dir
    )
    assert "fifo" in line


def test_docker_dir_oversized_config_is_capped(capsys, tmp_path, out_dir):
    base = docker_dir(tmp_path / "b")
    cfg = good_config()
    cfg["padding"] = "x" * (5 << 20)
    (base / "config.json").write_bytes(_j(cfg))
    line = build_fails(capsys, tmp_path, base, "config.json", out_dir)
    assert "larger than" in line


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_docker_archive_layer_link_to_host_path(capsys, tmp_path, out_dir, secret, kind):
    typ = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
    link = member("l0/layer.tar", type=typ, linkname=str(secret))
    base = docker_tar(tmp_path / "b.tar", replace={"l0/layer.tar": link})
    build_fails(capsys, tmp_path, base, "l0/layer.tar", out_dir)
    no_secret_in([tmp_path / "b.tar"], secret)


def test_docker_archive_layer_symlink_up_and_out(capsys, tmp_path, out_dir):
    link = member("l0/layer.tar", type=tarfile.SYMTYPE, linkname="../../../etc/passwd")
    base = docker_tar(tmp_path / "b.tar", replace={"l0/layer.tar": link})
    line = build_fails(capsys, tmp_path, base, "l0/layer.tar", out_dir)
    assert "outside the archive" in line


def test_docker_archive_hardlink_to_a_name_not_in_it(capsys, tmp_path, out_dir):
    link = member("l0/layer.tar", type=tarfile.LNKTYPE, linkname="nowhere/layer.tar")
    base = docker_tar(tmp_path / "b.tar", replace={"l0/layer.tar": link})
    build_fails(capsys, tmp_path, base, "not in the archive", out_dir)


def test_docker_archive_symlink_loop(capsys, tmp_path, out_dir):
    loop = {
        "l0/layer.tar": member("l0/layer.tar", type=tarfile.SYMTYPE, linkname="../a"),
        "a": member("a", type=tarfile.SYMTYPE, linkname="b"),
        "b": member("b", type=tarfile.SYMTYPE, linkname="a"),
    }
    base = docker_tar(tmp_path / "b.tar", replace=loop)
    line = build_fails(capsys, tmp_path, base, "l0/layer.tar", out_dir)
    assert "links" in line


@pytest.mark.parametrize("typ", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.DIRTYPE])
def test_docker_archive_layer_not_a_regular_member(capsys, tmp_path, out_dir, typ):
    base = docker_tar(
        tmp_path / "b.tar", replace={"l2/layer.tar": member("l2/layer.tar", type=typ)}
    )
    line = build_fails(capsys, tmp_path, base, "l2/layer.tar", out_dir)
    assert "not a regular file" in line


def test_docker_archive_config_symlink_to_host(capsys, tmp_path, out_dir, secret):
    link = member("config.json", type=tarfile.SYMTYPE, linkname=str(secret))
    base = docker_tar(tmp_path / "b.tar", replace={"config.json": link})
    build_fails(capsys, tmp_path, base, "config.json", out_dir)


def docker_save_style(path: Path) -> Path:
    """Layer 2 a relative symlink and layer 1 a hard link to other members, as
    docker save writes layers that several images share."""
    layers = [LAYERS[0], LAYERS[1], LAYERS[0]]
    links = {
        "l1/layer.tar": member("l1/layer.tar", LAYERS[1]),
        "l2/layer.tar": member("l2/layer.tar", type=tarfile.SYMTYPE, linkname="../l0/layer.tar"),
    }
    cfg = good_config(layers)
    return docker_tar(path, config=cfg, layers=layers, replace=links)


def test_links_inside_the_archive_still_build(tmp_path, capsys, secret):
    base = docker_save_style(tmp_path / "b.tar")
    out = tmp_path / "img.tar"
    assert main(["build", "-q", str(spec_for(tmp_path, base)), "-o", str(out)]) == 0
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        got = [t.extractfile(name).read() for name in manifest["Layers"][:3]]
    assert got == [LAYERS[0], LAYERS[1], LAYERS[0]]
    no_secret_in([out], secret)


def test_stream_nix_copies_a_linked_base_layer_as_a_regular_entry(tmp_path):
    base = docker_save_style(tmp_path / "b.tar")
    conf = make_store(tmp_path)
    conf["from_image"] = str(base)
    out = tmp_path / "img.tar"
    assert main(["stream-nix", "-q", str(write_conf(tmp_path, conf)), "-o", str(out)]) == 0
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        assert manifest["Layers"][:3] == _names(3)
        entries = [t.getmember(n) for n in manifest["Layers"][:3]]
        assert all(e.isreg() for e in entries)
        assert [t.extractfile(e).read() for e in entries] == [LAYERS[0], LAYERS[1], LAYERS[0]]
        assert not any(m.issym() or m.islnk() for m in t.getmembers())


def test_stream_nix_refuses_a_base_layer_link_to_host(capsys, tmp_path, out_dir, secret):
    link = member("l1/layer.tar", type=tarfile.SYMTYPE, linkname=str(secret))
    base = docker_tar(tmp_path / "b.tar", replace={"l1/layer.tar": link})
    conf = make_store(tmp_path)
    conf["from_image"] = str(base)
    argv = ["stream-nix", "-q", str(write_conf(tmp_path, conf)), "-o", str(out_dir / "i.tar")]
    fails(capsys, argv, "l1/layer.tar", out_dir)


def test_stream_nix_refuses_a_device_base_layer(capsys, tmp_path, out_dir):
    dev = member("l0/layer.tar", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
    base = docker_tar(tmp_path / "b.tar", replace={"l0/layer.tar": dev})
    conf = make_store(tmp_path)
    conf["from_image"] = str(base)
    argv = ["stream-nix", "-q", str(write_conf(tmp_path, conf)), "-o", str(out_dir / "i.tar")]
    fails(capsys, argv, "l0/layer.tar", out_dir)


# --- OCI layouts -------------------------------------------------------------------


def test_oci_digest_with_dotdot(capsys, tmp_path, out_dir, secret):
    root, docs = oci_dir(tmp_path / "oci")
    layers = copy.deepcopy(docs["layers"])
    layers[0]["digest"] = "sha256:../../../../" + str(secret).lstrip("/")
    doc = {"schemaVersion": 2, "config": docs["config"], "layers": layers}
    root2, _ = oci_dir(tmp_path / "oci2", manifest=doc)
    line = build_fails(capsys, tmp_path, root2, "layers[0].digest", out_dir)
    assert "not a digest" in line


def test_oci_blob_symlink_out_of_layout(capsys, tmp_path, out_dir, secret):
    root, docs = oci_dir(tmp_path / "oci")
    blob = root / "blobs" / "sha256" / docs["layers"][1]["digest"].split(":")[1]
    blob.unlink()
    blob.symlink_to(secret)
    line = build_fails(capsys, tmp_path, root, docs["layers"][1]["digest"].split(":")[1], out_dir)
    assert "outside" in line


def test_oci_config_blob_fifo_does_not_block(tmp_path, out_dir):
    root, docs = oci_dir(tmp_path / "oci")
    blob = root / "blobs" / "sha256" / docs["config"]["digest"].split(":")[1]
    blob.unlink()
    os.mkfifo(blob)
    spec = spec_for(tmp_path, root)
    line = fails_proc(["build", "-q", str(spec), "-o", str(out_dir / "i.tar")], "fifo", out_dir)
    assert docs["config"]["digest"].split(":")[1] in line


def test_base_image_path_itself_a_fifo(tmp_path, out_dir):
    fifo = tmp_path / "base.tar"
    os.mkfifo(fifo)
    spec = spec_for(tmp_path, fifo)
    fails_proc(["build", "-q", str(spec), "-o", str(out_dir / "i.tar")], "fifo", out_dir)
    fails_proc(["inspect", str(fifo)], "fifo")


# --- JSON of the wrong shape ----------------------------------------------------------


def _cfg(**changes) -> dict:
    cfg = good_config()
    for dotted, value in changes.items():
        target = cfg
        *path, last = dotted.split("__")
        for key in path:
            target = target[key]
        target[last] = value
    return cfg


BAD_MANIFESTS = [
    ([1], "manifest.json[0]"),
    ({"a": 1}, "manifest.json"),
    ([], "lists no image"),
    ([{"Layers": _names(3)}], "missing 'Config'"),
    ([{"Config": "config.json", "Layers": "l0/layer.tar"}], "Layers"),
    ([{"Config": "config.json", "Layers": [1, 2, 3]}], "Layers[0]"),
    ([{"Config": "config.json", "Layers": _names(3), "RepoTags": "base:1"}], "RepoTags"),
    ([{"Config": 5, "Layers": _names(3)}], "Config"),
    ([{"Config": "config.json", "Layers": _names(2)}], "2 layers but 3 diff_ids"),
]


@pytest.mark.parametrize(("manifest", "culprit"), BAD_MANIFESTS)
def test_bad_manifest_json(capsys, tmp_path, out_dir, manifest, culprit):
    base = docker_tar(tmp_path / "b.tar", manifest=manifest)
    build_fails(capsys, tmp_path, base, culprit, out_dir)


BAD_CONFIGS = [
    ({"rootfs": "layers"}, "config.json.rootfs"),
    ({"rootfs__diff_ids": [1, 2, 3]}, "rootfs.diff_ids[0]"),
    ({"rootfs__diff_ids": ["sha256:abc", "x", "y"]}, "not a digest"),
    ({"config__Env": "A=1"}, "config.Env"),
    ({"config__Env": ["A=1", 2]}, "config.Env[1]"),
    ({"config__Labels": ["k=v"]}, "config.Labels"),
    ({"config__Labels": {"k": 1}}, "config.Labels"),
    ({"config__Cmd": "/bin/sh"}, "config.Cmd"),
    ({"config__Cmd": [["x"]]}, "config.Cmd[0]"),
    ({"config__Entrypoint": {"a": 1}}, "config.Entrypoint"),
    ({"config__ExposedPorts": ["80/tcp"]}, "config.ExposedPorts"),
    ({"config__Volumes": "/data"}, "config.Volumes"),
    ({"config__WorkingDir": 5}, "WorkingDir"),
    ({"config__User": 0}, "User"),
    ({"config": "x"}, "config.json.config"),
    ({"history": {"created": "x"}}, "history"),
    ({"history": [{"created": 5}]}, "history[0].created"),
    ({"history": [{"empty_layer": "yes"}]}, "history[0].empty_layer"),
    ({"architecture": 64}, "architecture"),
    ({"created": 1}, "created"),
]


@pytest.mark.parametrize(("changes", "culprit"), BAD_CONFIGS)
def test_bad_image_config(capsys, tmp_path, out_dir, changes, culprit):
    base = docker_tar(tmp_path / "b.tar", config=_cfg(**changes))
    build_fails(capsys, tmp_path, base, culprit, out_dir)


def test_config_not_json_or_nested_too_deep(capsys, tmp_path, out_dir):
    base = docker_tar(tmp_path / "b.tar", config_bytes=b"[" * 100_000 + b"]" * 100_000)
    build_fails(capsys, tmp_path, base, "config.json", out_dir)
    base = docker_tar(tmp_path / "c.tar", config_bytes=b"\xff\xfe{")
    build_fails(capsys, tmp_path, base, "not valid JSON", out_dir)


def oci_with(tmp_path: Path, **docs) -> Path:
    return oci_dir(tmp_path / "oci", **docs)[0]


def test_oci_documents_of_wrong_types(capsys, tmp_path, out_dir):
    _, docs = oci_dir(tmp_path / "ref")
    cases = [
        ({"index": {"manifests": {"a": 1}}}, "index.json.manifests"),
        ({"index": [1]}, "index.json"),
        ({"index": {"manifests": [{"digest": 5, "size": 1}]}}, "manifests[0].digest"),
        ({"index": {"manifests": [{"digest": docs["config"]["digest"], "size": "1"}]}}, "size"),
        (
            {"index": {"manifests": [{**docs["manifest"], "mediaType": 7}]}},
            "mediaType",
        ),
        ({"manifest": {"config": docs["config"], "layers": {"a": 1}}}, "layers"),
        ({"manifest": {"config": "x", "layers": docs["layers"]}}, ".config"),
        (
            {"manifest": {"config": docs["config"], "layers": [{**docs["layers"][0], "size": -1}]}},
            "layers[0].size",
        ),
    ]
    for i, (kw, culprit) in enumerate(cases):
        root = oci_dir(tmp_path / f"oci{i}", **kw)[0]
        build_fails(capsys, tmp_path, root, culprit, out_dir)


def legacy_tar(path: Path, repositories: object, parent: object = None, link=None) -> Path:
    top = "a" * 64
    meta = {"id": top, "config": {"Env": ["A=1"]}, "os": "linux"}
    if parent is not None:
        meta["parent"] = parent
    entries = [member(f"{top}/json", _j(meta)), member(f"{top}/VERSION", b"1.0")]
    entries.append(link or member(f"{top}/layer.tar", LAYERS[0]))
    entries.append(member("repositories", _j(repositories)))
    with tarfile.open(path, "w") as t:
        for ti, data in entries:
            t.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return path


def test_legacy_archives_of_wrong_shape(capsys, tmp_path, out_dir, secret):
    top = "a" * 64
    cases = [
        (legacy_tar(tmp_path / "1.tar", [top]), "repositories"),
        (legacy_tar(tmp_path / "2.tar", {"r": {"1": 5}}), "repositories['r']['1']"),
        (legacy_tar(tmp_path / "3.tar", {"r": {"1": "../../etc"}}), "repositories['r']['1']"),
        (legacy_tar(tmp_path / "4.tar", {"r": {"1": top}}, parent="../x"), "parent"),
        (legacy_tar(tmp_path / "5.tar", {"r": {"1": top}}, parent=7), "parent"),
        (
            legacy_tar(
                tmp_path / "6.tar",
                {"r": {"1": top}},
                link=member(f"{top}/layer.tar", type=tarfile.SYMTYPE, linkname=str(secret)),
            ),
            "layer.tar",
        ),
    ]
    for base, culprit in cases:
        build_fails(capsys, tmp_path, base, culprit, out_dir)


# --- truncated and damaged archives ---------------------------------------------------


def test_truncated_tar(capsys, tmp_path, out_dir):
    whole = docker_tar(tmp_path / "whole.tar").read_bytes()
    layer_end = whole.index(b"layer 2\n") + 500
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:layer_end])
    for verify in (True, False):
        out = out_dir / "img.tar"
        spec = spec_for(tmp_path, cut, verify)
        fails(capsys, ["build", "-q", str(spec), "-o", str(out)], str(cut), out_dir)
    fails(capsys, ["inspect", str(cut)], str(cut))


def test_truncated_tar_gz(capsys, tmp_path, out_dir):
    whole = gzip.compress(docker_tar(tmp_path / "whole.tar").read_bytes())
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    build_fails(capsys, tmp_path, cut, str(cut), out_dir)
    fails(capsys, ["inspect", str(cut)], str(cut))


def test_not_an_archive_at_all(capsys, tmp_path, out_dir):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    build_fails(capsys, tmp_path, junk, "junk.tar: not a tar archive", out_dir)


# --- base layers verified as they are copied ------------------------------------------


@pytest.mark.parametrize("form", ["docker-archive", "oci"])
def test_tampered_base_layer_aborts_a_verified_build(capsys, tmp_path, out_dir, form):
    """Layer 2 of 3 holds other bytes than its diff_id says: the kernel-copy
    path with hashing beside it must notice, name the layer and leave nothing."""
    layers = [LAYERS[0], LAYERS[1].replace(b"layer 1", b"LAYER 1"), LAYERS[2]]
    cfg = good_config()  # diff_ids of the untampered layers
    if form == "docker-archive":
        base = docker_tar(tmp_path / "b.tar", config=cfg, layers=layers)
        culprit = "l1/layer.tar"
    else:
        root, docs = oci_dir(tmp_path / "oci", config=cfg)
        blob = root / "blobs" / "sha256" / docs["layers"][1]["digest"].split(":")[1]
        blob.write_bytes(layers[1])  # same size, other bytes
        base, culprit = root, docs["layers"][1]["digest"]
    line = build_fails(capsys, tmp_path, base, culprit, out_dir)
    assert "hashes to" in line and sha(LAYERS[1]) in line


# --- stream-nix confs of wrong types --------------------------------------------------

BAD_CONFS = [
    ("store_layers", [[1]], "store_layers[0][0]"),
    ("store_layers", "x", "store_layers"),
    ("uid", "-1", "'uid'"),
    ("uid", 1e20, "'uid'"),
    ("uid", "100000000000000000000", "'uid'"),
    ("gid", "abc", "'gid'"),
    ("gid", True, "'gid'"),
    ("created", 5, "'created'"),
    ("created", "10000-01-01T00:00:00", "'created'"),
    ("mtime", ["now"], "'mtime'"),
    ("mtime", "1960-01-01T00:00:00Z", "'mtime'"),
    ("uname", 5, "'uname'"),
    ("gname", None, "'gname'"),
    ("config", [], "'config'"),
    ("config", {"Env": "A=1"}, "'config'.Env"),
    ("config", {"Cmd": [["/bin/run"]]}, "'config'.Cmd[0]"),
    ("config", {"Labels": []}, "'config'.Labels"),
    ("from_image", 5, "'from_image'"),
    ("customisation_layer", ["x"], "'customisation_layer'"),
    ("repo_tag", "x:1\n\x1b[2J", "'repo_tag'"),
    ("repo_tag", "UP PER::", "'repo_tag'"),
    ("repo_tag", "", "'repo_tag'"),
    ("store_dir", "/nix/store/../../tmp", "'store_dir'"),
]


@pytest.mark.parametrize(("key", "value", "culprit"), BAD_CONFS)
def test_stream_nix_conf_field_of_wrong_type(capsys, tmp_path, out_dir, key, value, culprit):
    conf = make_store(tmp_path)
    conf[key] = value
    argv = ["stream-nix", "-q", str(write_conf(tmp_path, conf)), "-o", str(out_dir / "i.tar")]
    fails(capsys, argv, culprit, out_dir)


@pytest.mark.parametrize("tail", ["/../../etc", "/..", "/.", "/a/b", "", "/x\ny"])
def test_stream_nix_conf_path_that_is_no_store_path(capsys, tmp_path, out_dir, tail):
    # Each would archive something outside the store (or a name no store has).
    conf = make_store(tmp_path)
    conf["store_layers"][0][0] = conf["store_dir"] + tail
    argv = ["stream-nix", "-q", str(write_conf(tmp_path, conf)), "-o", str(out_dir / "i.tar")]
    fails(capsys, argv, "store_layers[0][0]", out_dir)


def test_stream_nix_integer_uid_still_accepted(tmp_path):
    conf = make_store(tmp_path)
    conf["uid"], conf["gid"] = 1000, "100"
    out = tmp_path / "img.tar"
    assert main(["stream-nix", "-q", str(write_conf(tmp_path, conf)), "-o", str(out)]) == 0
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        layer = tarfile.open(fileobj=t.extractfile(manifest["Layers"][0]))
        assert {(m.uid, m.gid) for m in layer.getmembers()} == {(1000, 100)}


# --- merge and inspect ---------------------------------------------------------------


def test_merge_refuses_a_manifest_object(capsys, tmp_path, out_dir):
    base = docker_tar(tmp_path / "b.tar", manifest={"a": 1})
    good = docker_tar(tmp_path / "g.tar")
    fails(
        capsys,
        ["merge", str(good), str(base), "-o", str(out_dir / "m.tar")],
        "manifest.json",
        out_dir,
    )


def test_merge_refuses_manifest_of_numbers(capsys, tmp_path, out_dir):
    base = docker_tar(tmp_path / "b.tar", manifest=[1])
    fails(capsys, ["merge", str(base), "-o", str(out_dir / "m.tar")], "manifest.json[0]", out_dir)


@pytest.mark.parametrize("typ", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_merge_refuses_links_to_host(capsys, tmp_path, out_dir, secret, typ):
    extra = {"evil": member("evil", type=typ, linkname=str(secret))}
    base = docker_tar(tmp_path / "b.tar", replace=extra)
    fails(capsys, ["merge", str(base), "-o", str(out_dir / "m.tar")], "evil", out_dir)


def test_merge_refuses_a_device_entry(capsys, tmp_path, out_dir):
    extra = {"dev": member("dev", type=tarfile.BLKTYPE, devmajor=8, devminor=0)}
    base = docker_tar(tmp_path / "b.tar", replace=extra)
    fails(capsys, ["merge", str(base), "-o", str(out_dir / "m.tar")], "dev", out_dir)


def test_merge_refuses_a_layer_outside(capsys, tmp_path, out_dir, secret):
    m = good_manifest()
    m[0]["Layers"][0] = str(secret)
    base = docker_tar(tmp_path / "b.tar", manifest=m)
    fails(capsys, ["merge", str(base), "-o", str(out_dir / "m.tar")], "Layers[0]", out_dir)


def test_merge_keeps_links_inside_the_archive(tmp_path, secret):
    base = docker_save_style(tmp_path / "b.tar")
    out = tmp_path / "m.tar"
    assert main(["merge", str(base), "-o", str(out)]) == 0
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))
        assert manifest == good_manifest()
        assert t.extractfile("l2/layer.tar").read() == LAYERS[0]
    no_secret_in([out], secret)


def test_inspect_refuses_what_build_refuses(capsys, tmp_path, secret):
    link = member("l0/layer.tar", type=tarfile.SYMTYPE, linkname=str(secret))
    fails(
        capsys,
        ["inspect", str(docker_tar(tmp_path / "a.tar", replace={"l0/layer.tar": link}))],
        "l0/layer.tar",
    )
    fails(
        capsys,
        ["inspect", str(docker_tar(tmp_path / "b.tar", config=_cfg(config__Env="A")))],
        "config.Env",
    )
    root, docs = oci_dir(tmp_path / "oci")
    (root / "index.json").write_text(
        json.dumps({"manifests": [{"digest": "sha256:../../x", "size": 1}]})
    )
    fails(capsys, ["inspect", str(root)], "manifests[0].digest")


def test_inspect_reads_a_docker_save_style_archive(capsys, tmp_path):
    base = docker_save_style(tmp_path / "b.tar")
    assert main(["inspect", "--json", str(base)]) == 0
    got = json.loads(capsys.readouterr().out)["images"][0]
    assert [x["diff_id"] for x in got["layers"]] == [sha(LAYERS[0]), sha(LAYERS[1]), sha(LAYERS[0])]


@pytest.mark.parametrize(
    ("repositories", "culprit"),
    [([1], "repositories"), ({"r": ["1"]}, "repositories['r']"), ({"r": {"1": 2}}, "['1']")],
)
def test_merge_refuses_a_repositories_file_of_wrong_types(
    capsys, tmp_path, out_dir, repositories, culprit
):
    extra = {"repositories": member("repositories", _j(repositories))}
    base = docker_tar(tmp_path / "b.tar", replace=extra)
    fails(capsys, ["merge", str(base), "-o", str(out_dir / "m.tar")], culprit, out_dir)


def test_merge_refuses_a_layer_that_is_not_its_diff_id(capsys, tmp_path, out_dir):
    layers = [LAYERS[0], LAYERS[1].replace(b"layer 1", b"LAYER 1"), LAYERS[2]]
    base = docker_tar(tmp_path / "b.tar", config=good_config(), layers=layers)
    line = fails(
        capsys, ["merge", str(base), "-o", str(out_dir / "m.tar")], "l1/layer.tar", out_dir
    )
    assert "hashes to" in line


def test_merge_refuses_a_config_of_wrong_types(capsys, tmp_path, out_dir):
    base = docker_tar(tmp_path / "b.tar", config=_cfg(config__Labels="x"))
    fails(capsys, ["merge", str(base), "-o", str(out_dir / "m.tar")], "config.Labels", out_dir)


def test_stream_nix_refuses_a_base_layer_that_is_not_its_diff_id(capsys, tmp_path, out_dir):
    layers = [LAYERS[0], LAYERS[1], LAYERS[2].replace(b"layer 2", b"LAYER 2")]
    base = docker_tar(tmp_path / "b.tar", config=good_config(), layers=layers)
    conf = make_store(tmp_path)
    conf["from_image"] = str(base)
    argv = ["stream-nix", "-q", str(write_conf(tmp_path, conf)), "-o", str(out_dir / "i.tar")]
    line = fails(capsys, argv, "l2/layer.tar", out_dir)
    assert "hashes to" in line


def test_docker_dir_layer_that_is_a_device_node(tmp_path, out_dir):
    base = docker_dir(tmp_path / "b")
    (base / "l0" / "layer.tar").unlink()
    try:
        os.mknod(base / "l0" / "layer.tar", 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero's
    except PermissionError:
        pytest.skip("creating a device node needs root")
    spec = spec_for(tmp_path, base)
    line = fails_proc(
        ["build", "-q", str(spec), "-o", str(out_dir / "i.tar")], "l0/layer.tar", out_dir
    )
    assert "character device" in line
    fails_proc(["inspect", str(base)], "character device")


def test_base_layers_are_verified_by_default(capsys, tmp_path, out_dir):
    layers = [LAYERS[0].replace(b"layer 0", b"LAYER 0"), LAYERS[1], LAYERS[2]]
    base = docker_tar(tmp_path / "b.tar", config=good_config(), layers=layers)
    spec = json.loads(spec_for(tmp_path, base).read_text())
    del spec["verify_base"]
    (tmp_path / "default.json").write_text(json.dumps(spec))
    argv = ["build", "-q", str(tmp_path / "default.json"), "-o", str(out_dir / "i.tar")]
    assert "hashes to" in fails(capsys, argv, "l0/layer.tar", out_dir)


# --- duplicate members and legacy layers that are not tars ---------------------------


def test_legacy_layer_with_a_damaged_header(capsys, tmp_path, out_dir):
    # No diff_id to check a legacy layer against: its tar headers are what we can see.
    damaged = bytearray(LAYERS[0])
    damaged[150] ^= 0xFF  # inside the first header's checksummed bytes
    top = "a" * 64
    link = member(f"{top}/layer.tar", bytes(damaged))
    base = legacy_tar(tmp_path / "b.tar", {"r": {"1": top}}, link=link)
    build_fails(capsys, tmp_path, base, "layer.tar: not a tar archive", out_dir)


def test_legacy_layer_that_is_not_a_tar(capsys, tmp_path, out_dir):
    top = "a" * 64
    link = member(f"{top}/layer.tar", b"[]")
    base = legacy_tar(tmp_path / "b.tar", {"r": {"1": top}}, link=link)
    fails(capsys, ["inspect", str(base)], "not a tar archive")
    build_fails(capsys, tmp_path, base, "not a tar archive", out_dir)


def with_duplicate(path: Path, name: str, data: bytes) -> Path:
    """path with a second member called name appended (tar readers take the last)."""
    with tarfile.open(path, "a") as t:
        ti, body = member(name, data)
        t.addfile(ti, io.BytesIO(body))
    return path


def test_duplicate_layer_member_is_refused(capsys, tmp_path, out_dir):
    base = with_duplicate(docker_tar(tmp_path / "b.tar"), "l0/layer.tar", LAYERS[1])
    build_fails(capsys, tmp_path, base, "holds 'l0/layer.tar' more than once", out_dir)


def test_merge_refuses_a_duplicate_manifest(capsys, tmp_path, out_dir):
    good = docker_tar(tmp_path / "g.tar")
    base = with_duplicate(docker_tar(tmp_path / "b.tar"), "manifest.json", b"[]")
    fails(
        capsys,
        ["merge", str(good), str(base), "-o", str(out_dir / "m.tar")],
        "holds 'manifest.json' more than once",
        out_dir,
    )


def test_merge_refuses_a_config_swapped_in_by_another_archive(capsys, tmp_path, out_dir):
    # evil.tar carries base's config name with other bytes of the same size.
    evil_cfg = good_config()
    evil_cfg["config"]["Cmd"] = ["/bin/xx"]  # as long as "/bin/sh"
    assert len(_j(evil_cfg)) == len(_j(good_config()))
    evil = docker_tar(tmp_path / "evil.tar", config=evil_cfg)
    base = docker_tar(tmp_path / "base.tar")
    argv = ["merge", str(evil), str(base), "-o", str(out_dir / "m.tar")]
    fails(capsys, argv, "entry config.json differs from the one in", out_dir)


def test_merge_refuses_a_layer_swapped_in_by_another_archive(capsys, tmp_path, out_dir):
    # Same name, same size, its own correct diff_id: other bytes all the same.
    swapped = LAYERS[0].replace(b"layer 0\n", b"layer X\n")
    assert len(swapped) == len(LAYERS[0]) and swapped != LAYERS[0]
    layers = [swapped, *LAYERS[1:]]
    manifest = good_manifest()
    manifest[0]["Config"] = "evil.json"  # its own config; config.json left as base's
    extra = {"evil.json": member("evil.json", _j(good_config(layers)))}
    evil = docker_tar(tmp_path / "evil.tar", layers=layers, manifest=manifest, replace=extra)
    base = docker_tar(tmp_path / "base.tar")
    argv = ["merge", str(evil), str(base), "-o", str(out_dir / "m.tar")]
    fails(capsys, argv, "entry l0/layer.tar differs from the one in", out_dir)


def test_merge_keeps_a_layer_two_archives_share(tmp_path):
    a = docker_tar(tmp_path / "a.tar")
    cfg = good_config()
    cfg["config"]["Cmd"] = ["/bin/other"]  # another image over the same layers
    b = docker_tar(tmp_path / "b.tar", config_bytes=_j(cfg))
    out = tmp_path / "m.tar"
    assert main(["merge", str(a), str(b), "-o", str(out)]) == 1  # both name config.json
    c = docker_tar(tmp_path / "c.tar")
    assert main(["merge", str(a), str(c), "-o", str(out)]) == 0
    with tarfile.open(out) as t:
        assert len(json.load(t.extractfile("manifest.json"))) == 2
        assert sha(t.extractfile("l0/layer.tar").read()) == sha(LAYERS[0])
