"""`fastlayer stream-nix` writes the archive nixpkgs' script writes, byte for byte."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from nixpkgs_ref import BASE, archive_summary, fixed_store, recorded
from tarref import reference_image

REF_SCRIPT = Path(os.environ.get("FASTLAYER_REF_DIR", "/tmp/ref")) / "stream_layered_image.py"
STREAM_CASES = recorded("stream")["cases"]


def run_cli(*args: str, stdout=subprocess.PIPE, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastlayer", *args], stdout=stdout, stderr=subprocess.PIPE, cwd=cwd
    )


def make_store(top: Path) -> dict:
    """A small store with two layers' worth of paths and a customisation layer."""
    s = top / "nix" / "store"
    lib = s / "1b2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-lib-2.0"
    app = s / "0a2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-app-1.0"
    (lib / "lib").mkdir(parents=True)
    (lib / "lib" / "libx.so").write_bytes(os.urandom(100_000))
    (app / "bin").mkdir(parents=True)
    (app / "bin" / "app").write_text(f"#!/bin/sh\ncat {lib}/lib/libx.so\n")
    (app / "bin" / "app").chmod(0o755)
    (app / ("long-" + "n" * 120)).write_text("long name")
    (app / "share").symlink_to(lib / "lib")
    custom = s / "2c2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-customisation-layer"
    custom.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        ti = tarfile.TarInfo("bin")
        ti.type, ti.linkname = tarfile.SYMTYPE, f"{app}/bin"
        t.addfile(ti)
    (custom / "layer.tar").write_bytes(buf.getvalue())
    (custom / "checksum").write_text(hashlib.sha256(buf.getvalue()).hexdigest())
    return {
        "architecture": "amd64",
        "config": {"Env": ["PATH=/bin", "FROM_CHILD=1", "LAST=child"], "Cmd": ["/bin/app"]},
        "os": "linux",
        "store_dir": str(s),
        "from_image": None,
        "store_layers": [[str(lib)], [str(app)]],
        "customisation_layer": str(custom),
        "repo_tag": "reg.example:5000/team/app:1.0",
        "created": "1970-01-01T00:00:01Z",
        "mtime": "1970-01-01T00:00:01Z",
        "uid": "0",
        "gid": "0",
        "uname": "root",
        "gname": "root",
    }


@pytest.fixture
def conf(tmp_path) -> dict:
    return make_store(tmp_path)


def write_conf(tmp_path: Path, conf: dict, name: str = "conf.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(conf))
    return p


def test_file_output_equals_reference(tmp_path, conf):
    out = tmp_path / "img.tar"
    r = run_cli("stream-nix", "-q", str(write_conf(tmp_path, conf)), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == reference_image(copy.deepcopy(conf))


def test_pipe_output_equals_reference_and_tag_override(tmp_path, conf):
    r = run_cli("stream-nix", "-q", "-t", "other:tag", str(write_conf(tmp_path, conf)))
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference_image(copy.deepcopy(conf), repo_tag="other:tag")
    manifest = json.load(tarfile.open(fileobj=io.BytesIO(r.stdout)).extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == ["other:tag"]


def test_from_image_env_merge_and_owners(tmp_path, conf):
    base_conf = copy.deepcopy(conf)
    base_conf["config"] = {"Env": ["FROM_PARENT=1", "LAST=parent", "PATH=/usr/bin"]}
    base = tmp_path / "base.tar"
    assert (
        run_cli(
            "stream-nix", "-q", str(write_conf(tmp_path, base_conf, "b.json")), "-o", str(base)
        ).returncode
        == 0
    )
    child = copy.deepcopy(conf)
    child.update(from_image=str(base), uid="1000", gid="100", uname="user", gname="users")
    child.update(mtime="2024-01-02T03:04:05+00:00", created="2024-05-06T07:08:09+02:00")
    r = run_cli("stream-nix", "-q", str(write_conf(tmp_path, child)))
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference_image(copy.deepcopy(child))
    t = tarfile.open(fileobj=io.BytesIO(r.stdout))
    manifest = json.load(t.extractfile("manifest.json"))[0]
    config = json.load(t.extractfile(manifest["Config"]))
    assert len(manifest["Layers"]) == 3 + 3
    base_t = tarfile.open(base)
    assert manifest["Layers"][:3] == json.load(base_t.extractfile("manifest.json"))[0]["Layers"]
    assert config["config"]["Env"] == [
        "FROM_PARENT=1",
        "LAST=child",
        "PATH=/bin",
        "FROM_CHILD=1",
    ]
    assert config["created"] == "2024-05-06T07:08:09+02:00"
    store_layer = tarfile.open(fileobj=t.extractfile(manifest["Layers"][3]))
    member = store_layer.getmember(conf["store_layers"][0][0] + "/lib/libx.so")
    assert (member.uid, member.gid, member.uname, member.mtime) == (1000, 100, "user", 1704164645)


def test_created_now(tmp_path, conf):
    conf["created"] = "now"
    r = run_cli("stream-nix", "-q", str(write_conf(tmp_path, conf)))
    assert r.returncode == 0, r.stderr
    t = tarfile.open(fileobj=io.BytesIO(r.stdout))
    config = json.load(t.extractfile(json.load(t.extractfile("manifest.json"))[0]["Config"]))
    from datetime import datetime

    created = datetime.fromisoformat(config["created"]).timestamp()
    assert abs(created - time.time()) < 120


def test_root_reads_a_chroot_store(tmp_path, conf):
    moved = json.loads(json.dumps(conf).replace(str(tmp_path), ""))
    assert moved["store_dir"] == "/nix/store"
    out = tmp_path / "img.tar"
    r = run_cli(
        "stream-nix",
        "-q",
        "--root",
        str(tmp_path),
        str(write_conf(tmp_path, moved)),
        "-o",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    t = tarfile.open(out)
    manifest = json.load(t.extractfile("manifest.json"))[0]
    names = tarfile.open(fileobj=t.extractfile(manifest["Layers"][1])).getnames()
    assert "/nix/store/0a2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-app-1.0/bin/app" in names


def stream_recorded_case(case: dict, root: Path, tmp_path: Path, **replace) -> bytes:
    """`fastlayer stream-nix` on a recorded case's conf (its /nix/store paths read
    under ROOT unless `replace` rewrites them)."""
    text = json.dumps(case["conf"])
    for old, new in replace.items():
        text = text.replace(old, new)
    conf = tmp_path / f"{case['name']}.json"
    conf.write_text(text)
    args = ["--root", str(root)] if not replace else []
    tag = ["-t", case["tag"]] if case["tag"] else []
    r = run_cli("stream-nix", "-q", *args, str(conf), *tag)
    assert r.returncode == 0, r.stderr
    return r.stdout


def assert_recorded(data: bytes, case: dict) -> None:
    summary = archive_summary(data)
    assert summary["members"] == case["members"]  # names, sizes and digests first
    assert (summary["size"], summary["sha256"]) == (case["size"], case["sha256"])


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c["name"])
def test_equals_the_nixpkgs_script(case, tmp_path):
    """The archive nixpkgs' script wrote for fixed inputs (recorded: sha256 of the
    whole archive and of each member); with the script in FASTLAYER_REF_DIR, also
    the same bytes as a live run."""
    root = tmp_path / "root"
    fixed_store(root)
    if "base" in case:  # a base image made by fastlayer, checked like the others
        base = next(c for c in STREAM_CASES if c["name"] == case["base"])
        data = stream_recorded_case(base, root, tmp_path)
        assert_recorded(data, base)
        (root / BASE.lstrip("/")).write_bytes(data)
    mine = stream_recorded_case(case, root, tmp_path)
    assert_recorded(mine, case)
    if REF_SCRIPT.exists():  # live: the same store read at its real path by both
        store = str(root / "nix" / "store")
        conf = tmp_path / "live.json"
        conf.write_text(json.dumps(case["conf"]).replace("/nix/store", store))
        tag = ["-t", case["tag"]] if case["tag"] else []
        ref = subprocess.run(
            [sys.executable, str(REF_SCRIPT), str(conf), *tag], capture_output=True
        )
        assert ref.returncode == 0, ref.stderr
        assert stream_recorded_case(case, root, tmp_path, **{"/nix/store": store}) == ref.stdout


def test_recorded_stream_cases():
    # what the recorded archives hold: PAX long names, a hard link copied as a
    # file, base layers first, the tag override
    by_name = {c["name"]: c for c in STREAM_CASES}
    plain = by_name["plain"]
    assert len(plain["members"]) == 5 and plain["members"][-1][0] == "manifest.json"
    assert by_name["tag-override"]["sha256"] != plain["sha256"]
    child = [m[0] for m in by_name["from-image"]["members"]]
    assert child[:2] == [m[0] for m in by_name["base"]["members"][:2]]


def error_of(tmp_path: Path, conf_text: str, *extra: str) -> str:
    p = tmp_path / "bad.json"
    p.write_text(conf_text)
    out = tmp_path / "out" / "img.tar"
    out.parent.mkdir(exist_ok=True)
    r = run_cli("stream-nix", str(p), "-o", str(out), *extra)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert list(out.parent.iterdir()) == []  # nothing half-written left behind
    return err


def test_errors_are_one_line_and_leave_nothing(tmp_path, conf):
    missing = copy.deepcopy(conf)
    missing["store_layers"][1].append(conf["store_dir"] + "/3d2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-gone")
    assert "3d2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-gone" in error_of(tmp_path, json.dumps(missing))
    outside = copy.deepcopy(conf)
    outside["store_layers"][0].append("/etc")
    assert "'/etc' is not a store path under store_dir" in error_of(tmp_path, json.dumps(outside))
    assert "not valid JSON" in error_of(tmp_path, "{nope")
    partial = {k: v for k, v in conf.items() if k != "store_layers"}
    assert "missing key(s) store_layers" in error_of(tmp_path, json.dumps(partial))
    Path(conf["customisation_layer"], "checksum").write_text("zz")
    assert "does not hold a sha256" in error_of(tmp_path, json.dumps(conf))


def test_failure_mid_stream_leaves_no_file(tmp_path, conf):
    fifo = Path(conf["store_layers"][1][0]) / "fifo"
    os.mkfifo(fifo)
    err = error_of(tmp_path, json.dumps(conf))
    assert f"{fifo} is a fifo" in err


def test_appending_stdout_and_full_disk(tmp_path, conf):
    path = str(write_conf(tmp_path, conf))
    out = tmp_path / "appended.tar"
    with open(out, "ab") as f:  # O_APPEND: header write-back is impossible, so it spools
        assert run_cli("stream-nix", path, stdout=f).returncode == 0
    assert out.read_bytes() == reference_image(copy.deepcopy(conf))
    with open("/dev/full", "wb") as full:
        r = run_cli("stream-nix", path, stdout=full)
    assert r.returncode == 1
    assert r.stderr.decode() == "fastlayer: error: No space left on device\n"


@pytest.mark.parametrize("memory", ["0", str(1 << 30)])
def test_disk_and_memory_spools_give_the_same_bytes(tmp_path, conf, memory):
    env = {**os.environ, "FASTLAYER_SPOOL_MEMORY": memory, "TMPDIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "fastlayer", "stream-nix", "--no-cache",
         str(write_conf(tmp_path, conf))],
        capture_output=True,
        env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference_image(copy.deepcopy(conf))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fastlayer-spool")]


def test_many_layers_through_a_slow_pipe(tmp_path):
    """Spools copied into a pipe by sendfile share pages with it: reusing one
    too early would change bytes the reader has not taken yet."""
    store = tmp_path / "nix" / "store"
    paths = []
    for i in range(24):
        p = store / f"{i:02d}a2k8c1n7dq5h0d8z2b4l6c1w3x4y5-p{i}"
        p.mkdir(parents=True)
        (p / "data").write_bytes(bytes([i]) * (300_000 + 4096 * i))
        paths.append(str(p))
    conf = make_store(tmp_path)
    conf["store_layers"] = [[p] for p in paths]
    path = write_conf(tmp_path, conf)
    script = f"{sys.executable} -m fastlayer stream-nix {path} | (sleep 1; cat)"
    r = subprocess.run(["/bin/sh", "-c", script], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference_image(copy.deepcopy(conf))
