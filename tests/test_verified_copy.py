"""Verified base layers (issue 9): a base layer stored as it is goes to the
output by a kernel copy while other threads hash it. A base file that
shrinks or changes meanwhile must end the build with one error line naming
the layer (exit 1, nothing left behind), never a signal death (an mmap of a
truncated file raises SIGBUS); tampered bytes are still refused, and a
verified build writes the same bytes as a trusted one."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from test_hostile_base import spec_for

from fastlayer import emit
from fastlayer.cli import main
from fastlayer.errors import FastlayerError
from fastlayer.model import Layer

MiB = 1 << 20


def layer_tar(name: str, size: int, seed: int) -> bytes:
    """A one-file layer of size bytes, a repeated random block (cheap, not compressible
    into a shortcut: every byte is hashed)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    data = (block * (size // MiB + 1))[:size]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime = len(data), 1
        t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def docker_archive(path: Path, layers: list[bytes], diff_ids: list[str] | None = None) -> Path:
    """A docker-archive base: the layers stored uncompressed (so they are kernel-copied)."""
    diff_ids = diff_ids or ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    names = [f"l{i}/layer.tar" for i in range(len(layers))]
    manifest = [{"Config": "config.json", "RepoTags": ["base:1"], "Layers": names}]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        members = [("config.json", json.dumps(config).encode()), *zip(names, layers, strict=True)]
        for name, data in [*members, ("manifest.json", json.dumps(manifest).encode())]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture
def own_tmpdir(tmp_path, monkeypatch) -> Path:
    """A TMPDIR of this test alone, to see that no staging directory is left."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return d


def one_error_line(err: str, *culprits: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlayer: error: "), err
    for c in culprits:
        assert c in lines[0], lines[0]
    return lines[0]


def test_base_truncated_during_a_verified_build(tmp_path, own_tmpdir):
    """The issue's repro, made deterministic: the base (4 x 96 MiB layers) is
    truncated as soon as the output's .part file exists, while its layers are
    being copied and hashed ahead. Before the fix the build died of SIGBUS."""
    layers = [layer_tar(f"f{i}", 96 * MiB, i) for i in range(4)]
    base = docker_archive(tmp_path / "base.tar", layers)
    del layers
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [sys.executable, "-m", "fastlayer", "build", "-q", str(spec_for(tmp_path, base))]
    proc = subprocess.Popen(
        [*argv, "-o", str(out_dir / "img.tar")], stderr=subprocess.PIPE, env=os.environ.copy()
    )
    deadline = time.monotonic() + 60
    while not any(out_dir.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    os.truncate(base, 10 * MiB)  # inside the first layer: every later region is gone
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, (proc.returncode, err.decode())
    line = one_error_line(err.decode(), "base layer", str(base))
    assert "changed while it was read" in line or "truncated" in line, line
    assert list(out_dir.iterdir()) == []
    assert list(own_tmpdir.iterdir()) == []


def layers_in_file(tmp_path: Path, n: int, size: int) -> tuple[Path, list[Layer]]:
    """n layers back to back in one file, as model.Layers with their regions."""
    blobs = [layer_tar(f"f{i}", size, i) for i in range(n)]
    path = tmp_path / "regions"
    path.write_bytes(b"".join(blobs))
    layers, offset = [], 0
    for i, blob in enumerate(blobs):
        diff_id = "sha256:" + hashlib.sha256(blob).hexdigest()
        opener = lambda: open(path, "rb")  # noqa: E731 (not used by copy_to)
        layers.append(Layer(diff_id, opener, len(blob), f"layer{i}", (str(path), offset)))
        offset += len(blob)
    emit.RegionHasher.hash_ahead([(str(path), x.region[1], x.size) for x in layers])
    return path, layers


@pytest.mark.parametrize("verify", [True, False])
def test_base_truncated_between_two_layer_copies(tmp_path, verify):
    """Deterministic: the file shrinks after layer 0 was copied (and layers 1
    and 2 were being hashed ahead): layer 1's copy fails with an error naming
    layer 1 and the file, whichever of hash and copy meets the end first."""
    path, layers = layers_in_file(tmp_path, 3, 3 * MiB)
    with open(tmp_path / "out", "w+b") as out:
        src = emit.ReaderSource(layers[0], verify=verify)
        assert src.copy_to(out.fileno(), 0) == layers[0].diff_id.removeprefix("sha256:")
        os.truncate(path, layers[1].region[1] + MiB)
        with pytest.raises(FastlayerError) as e:
            emit.ReaderSource(layers[1], verify=verify).copy_to(out.fileno(), layers[0].size)
    assert "base layer layer1" in str(e.value) and str(path) in str(e.value)


def test_base_rewritten_in_place_between_hash_and_copy(tmp_path):
    """Same size, other bytes, after the hash of layer 1 may already have run
    on the old bytes: the file's new mtime aborts the copy of layer 1."""
    path, layers = layers_in_file(tmp_path, 3, 3 * MiB)
    with open(tmp_path / "out", "w+b") as out:
        emit.ReaderSource(layers[0], verify=True).copy_to(out.fileno(), 0)
        with open(path, "r+b") as f:
            f.seek(layers[1].region[1] + 2 * MiB)
            f.write(b"X" * 100)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(FastlayerError) as e:
            emit.ReaderSource(layers[1], verify=True).copy_to(out.fileno(), layers[0].size)
    assert "layer1" in str(e.value) and "changed while it was read" in str(e.value)


def test_hash_range_of_a_shrunk_file_reports_the_missing_bytes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 3 * MiB)
    with open(path, "rb") as f:
        os.truncate(path, MiB)
        with pytest.raises(emit.SourceEnded) as e:
            emit.hash_range(f.fileno(), 0, 3 * MiB)
    assert e.value.missing == 2 * MiB


def test_tampered_layer_hashed_ahead_is_refused(capsys, tmp_path, own_tmpdir):
    """Layer 3 of 5 (hashed ahead, beside the copy of an earlier one) has one
    byte changed near its end, beyond the first read buffers."""
    layers = [layer_tar(f"f{i}", 3 * MiB + 1000 * i, i) for i in range(5)]
    diff_ids = ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]
    bad = bytearray(layers[3])
    bad[-2000] ^= 1  # inside the file's data, before the tar's end blocks
    layers[3] = bytes(bad)
    base = docker_archive(tmp_path / "base.tar", layers, diff_ids)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = main(["build", "-q", str(spec_for(tmp_path, base)), "-o", str(out_dir / "img.tar")])
    err = capsys.readouterr().err
    assert rc == 1, err
    line = one_error_line(err, "l3/layer.tar", diff_ids[3])
    assert "hashes to sha256:" + hashlib.sha256(layers[3]).hexdigest() in line
    assert list(out_dir.iterdir()) == []
    assert list(own_tmpdir.iterdir()) == []


def test_verified_and_trusted_builds_are_byte_identical(tmp_path):
    layers = [layer_tar(f"f{i}", (i + 1) * MiB + 7 * i, i) for i in range(5)]
    base = docker_archive(tmp_path / "base.tar", layers)
    outs = []
    for verify in (True, False):
        out = tmp_path / f"img-{verify}.tar"
        assert main(["build", "-q", str(spec_for(tmp_path, base, verify)), "-o", str(out)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    with tarfile.open(tmp_path / "img-True.tar") as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        assert [t.extractfile(n).read() for n in manifest["Layers"][:5]] == layers
