"""Outputs, signals and contents a hostile or careless user gives (issue 9).

Every case runs the real CLI in a child process with TMPDIR pointed at a
directory of the test, and checks the exit code, the one stderr line, that
nothing special given to -o was replaced, and that nothing is left behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from closures import make_closure

from fastlayer.sinks import open_sink
from fastlayer.sinks.oci import OciDirSink

IS_ROOT = os.geteuid() == 0
SPARSE = 2 << 30  # a sparse file this big takes seconds to archive, no disk to make


# helpers


def cli(
    tmp: Path, *args: str, stdout=subprocess.PIPE, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastlayer", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=tmp,
        env=env_for(tmp),
        timeout=timeout,
    )


def env_for(tmp: Path) -> dict[str, str]:
    (tmp / "tmpdir").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp / "tmpdir")}


def one_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit 1 and one `fastlayer: error:` line holding words."""
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlayer: error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def leftovers(*dirs: Path) -> list[str]:
    """Temporary files of ours (.part files, staging directories) under dirs."""
    found = []
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            for name in dirnames + filenames:
                if name.endswith(".part") or name.startswith("fastlayer-"):
                    found.append(os.path.join(dirpath, name))
    return found


def small_spec(tmp: Path, **extra) -> Path:
    rootfs = tmp / "rootfs"
    (rootfs / "etc").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "hello").write_text("hello\n")
    spec = {"name": "test/app", "tag": "1", "contents": {"roots": [str(rootfs)]}, **extra}
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def image_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return t.getnames()


def same_node(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev, a.st_mode, a.st_rdev) == (b.st_ino, b.st_dev, b.st_mode, b.st_rdev)


def read_fifo_in_thread(path: Path) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []

    def read() -> None:
        with open(path, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, got


# -o: what is given is written into or refused, never replaced


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_fifo_output_streams_and_stays_a_fifo(tmp_path, fmt):
    spec, fifo = small_spec(tmp_path), tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader, got = read_fifo_in_thread(fifo)
    r = cli(tmp_path, "build", str(spec), "-o", str(fifo), "--format", fmt)
    reader.join(10)
    assert r.returncode == 0, r.stderr.decode()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    names = image_names(got[0])
    assert ("manifest.json" if fmt == "docker-archive" else "index.json") in names
    assert r.stdout.decode() == "1\n"  # the tag, not part of the stream
    assert leftovers(tmp_path) == []


def char_device(tmp_path: Path) -> Path:
    """A null device of our own (as root), else /dev/null itself (which a user
    who is not root cannot replace, so a regression cannot break the machine)."""
    if not IS_ROOT:
        return Path("/dev/null")
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return dev


def test_char_device_output_is_written_into_not_replaced(tmp_path):
    spec, dev = small_spec(tmp_path), char_device(tmp_path)
    before = os.stat(dev)
    r = cli(tmp_path, "build", str(spec), "-o", str(dev))
    assert r.returncode == 0, r.stderr.decode()
    assert same_node(before, os.stat(dev))
    assert leftovers(tmp_path) == []


def test_terminal_output_is_refused(tmp_path):
    master, slave = pty.openpty()
    try:
        tty = os.ttyname(slave)
        r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", tty)
        one_error(r, tty, "terminal")
        os.set_blocking(master, False)
        with pytest.raises(BlockingIOError):
            os.read(master, 1024)  # not one byte of the image reached the terminal
    finally:
        os.close(master)
        os.close(slave)


def test_symlink_output_replaces_its_target_and_stays_a_link(tmp_path):
    target, link = tmp_path / "real.tar", tmp_path / "link.tar"
    target.write_bytes(b"old")
    link.symlink_to("real.tar")
    r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(link))
    assert r.returncode == 0, r.stderr.decode()
    assert os.readlink(link) == "real.tar"
    assert "manifest.json" in image_names(target.read_bytes())
    assert leftovers(tmp_path) == []


def test_dangling_symlink_output_creates_its_target(tmp_path):
    link = tmp_path / "link.tar"
    link.symlink_to("made.tar")
    r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(link))
    assert r.returncode == 0, r.stderr.decode()
    assert link.is_symlink() and "manifest.json" in image_names(
        (tmp_path / "made.tar").read_bytes()
    )


def test_symlink_to_a_fifo_streams_into_the_fifo(tmp_path):
    fifo, link = tmp_path / "p", tmp_path / "link"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    reader, got = read_fifo_in_thread(fifo)
    r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(link))
    reader.join(10)
    assert r.returncode == 0, r.stderr.decode()
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert "manifest.json" in image_names(got[0])


# /proc/self/fd/1 is what /dev/stdout links to; named directly, a regression
# cannot replace the machine's /dev/stdout (nothing can be created in /proc)
@pytest.mark.parametrize("output", ["-", "/proc/self/fd/1"])
def test_stdout_output_carries_only_the_image(tmp_path, output):
    r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", output)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.decode() == "1\n"  # the tag goes to stderr
    assert len(r.stdout) % 512 == 0 and "manifest.json" in image_names(r.stdout)


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_directory_output_for_an_archive_is_refused(tmp_path, fmt):
    out = tmp_path / "outdir"
    out.mkdir()
    r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(out), "--format", fmt)
    line = one_error(r, str(out), "a directory")
    assert ".part" not in line
    assert list(out.iterdir()) == [] and leftovers(tmp_path) == []


def test_socket_output_is_refused(tmp_path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(path))
    one_error(r, str(path), "socket")
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


@pytest.mark.parametrize("kind", ["fifo", "file", "device"])
def test_oci_dir_onto_a_non_directory_is_refused(tmp_path, kind):
    path = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "file":
        path.write_bytes(b"keep")
    else:
        path = char_device(tmp_path)
    before = os.stat(path)
    r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(path), "--format", "oci-dir")
    one_error(r, str(path), "not an OCI image layout directory")
    assert same_node(before, os.stat(path))
    if kind == "file":
        assert path.read_bytes() == b"keep"


# signals: SIGTERM and SIGHUP clean up as SIGINT does


def big_store_spec(tmp: Path) -> Path:
    """A store path holding a large sparse file: seconds of layer writing."""
    root = tmp / "store"
    paths, graph = make_closure(root, {"big": {"data/big": b"x"}}, {})
    os.truncate(root / paths["big"].lstrip("/") / "data" / "big", SPARSE)
    spec = {
        "name": "test/big",
        "tag": "1",
        "store_root": str(root),
        "contents": {"store_paths": [paths["big"]], "graph": str(graph)},
    }
    path = tmp / "big.json"
    path.write_text(json.dumps(spec))
    return path


def wait_for_bytes(where: Path, timeout: float = 30) -> None:
    """Until a .part file under where holds some bytes: the image is being written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for dirpath, _, filenames in os.walk(where):
            for name in filenames:
                if name.endswith(".part"):
                    try:
                        if os.path.getsize(os.path.join(dirpath, name)) > 0:
                            return
                    except FileNotFoundError:
                        pass
        time.sleep(0.005)
    raise AssertionError(f"no .part file grew under {where}")


def stop_with(proc: subprocess.Popen, signo: int) -> str:
    proc.send_signal(signo)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signo, err.decode()
    assert "Traceback" not in err.decode()
    assert err.decode().splitlines() == [f"fastlayer: stopped by {signal.Signals(signo).name}"]
    return err.decode()


def start(tmp: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fastlayer", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp,
        env=env_for(tmp),
    )


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_write_leaves_nothing(tmp_path, signo):
    spec, out = big_store_spec(tmp_path), tmp_path / "out" / "image.tar"
    out.parent.mkdir()
    proc = start(tmp_path, "build", str(spec), "-o", str(out), "-q")
    wait_for_bytes(out.parent)
    stop_with(proc, signo)
    assert list(out.parent.iterdir()) == []
    assert list((tmp_path / "tmpdir").iterdir()) == []


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP])
def test_signal_during_extra_commands_stops_them_and_removes_staging(tmp_path, signo):
    pidfile = tmp_path / "sleep.pid"
    spec = small_spec(tmp_path, extra_commands=f"sleep 60 & echo $! > {pidfile}; wait")
    proc = start(tmp_path, "build", str(spec), "-o", str(tmp_path / "out.tar"), "-q")
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop_with(proc, signo)
    assert list((tmp_path / "tmpdir").iterdir()) == []  # no staging directory
    assert not (tmp_path / "out.tar").exists() and leftovers(tmp_path) == []
    assert gone(int(pidfile.read_text()))


def gone(pid: int, timeout: float = 10) -> bool:
    """Whether pid dies within timeout (a SIGKILL takes effect when it is next scheduled)."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def layout_state(layout: Path) -> dict[str, str]:
    """Every file of a layout with the sha256 of its bytes."""
    state = {}
    for dirpath, _, filenames in os.walk(layout):
        for name in filenames:
            p = Path(dirpath) / name
            state[str(p.relative_to(layout))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def test_signal_while_adding_to_an_oci_layout_leaves_it_as_it_was(tmp_path):
    layout = tmp_path / "layout"
    r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(layout), "--format", "oci-dir")
    assert r.returncode == 0, r.stderr.decode()
    before = layout_state(layout)
    spec = big_store_spec(tmp_path)
    proc = start(tmp_path, "build", str(spec), "-o", str(layout), "--format", "oci-dir", "-q")
    wait_for_bytes(layout)
    stop_with(proc, signal.SIGTERM)
    assert layout_state(layout) == before


def test_failure_after_the_index_was_written_restores_it(tmp_path):
    """A layout is left as it was even when the failure comes after index.json
    was replaced (a signal between finish() and the end of the build)."""
    layout = tmp_path / "layout"
    r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(layout), "--format", "oci-dir")
    assert r.returncode == 0, r.stderr.decode()
    before = layout_state(layout)
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    with pytest.raises(RuntimeError, match="late"), open_sink(str(layout), "oci-dir") as sink:
        assert isinstance(sink, OciDirSink)
        sink.finish(config, ["test/app:other"])
        assert layout_state(layout) != before  # the new index and blobs were in place
        raise RuntimeError("late")
    assert layout_state(layout) == before


# devices, fifos and sockets in contents are refused by type, before a read


def test_device_in_files_is_refused(tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"name": "t/a", "contents": {"files": ["/dev/zero"]}}))
    t0 = time.monotonic()
    r = cli(tmp_path, "build", str(spec), "-o", str(tmp_path / "o.tar"), timeout=30)
    one_error(r, "contents.files", "/dev/zero", "character device")
    assert time.monotonic() - t0 < 20
    assert list((tmp_path / "tmpdir").iterdir()) == [] and not (tmp_path / "o.tar").exists()


def test_directory_in_files_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"name": "t/a", "contents": {"files": [str(tmp_path / "d")]}}))
    one_error(cli(tmp_path, "build", str(spec), "-o", "o.tar"), str(tmp_path / "d"), "directory")


def special_file(path: Path, kind: str) -> socket.socket | None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        if not IS_ROOT:
            pytest.skip("making a device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        return s
    return None


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
@pytest.mark.parametrize("extra", [None, "true"], ids=["linked", "copied"])
def test_special_file_under_roots_is_refused(tmp_path, kind, extra):
    spec = small_spec(tmp_path, **({"extra_commands": extra} if extra else {}))
    path = tmp_path / "rootfs" / "etc" / "odd"
    sock = special_file(path, kind)
    try:
        r = cli(tmp_path, "build", str(spec), "-o", str(tmp_path / "o.tar"), timeout=30)
    finally:
        if sock is not None:
            sock.close()
    want = {"fifo": "a fifo", "device": "a character device", "socket": "a socket"}[kind]
    one_error(r, "contents.roots", str(path), want)
    assert list((tmp_path / "tmpdir").iterdir()) == [] and not (tmp_path / "o.tar").exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_file_made_by_extra_commands_is_refused(tmp_path, kind):
    if kind == "device" and not IS_ROOT:
        pytest.skip("making a device node needs root")
    make = "mkfifo odd" if kind == "fifo" else "mknod odd c 1 5"
    spec = small_spec(tmp_path, extra_commands=make)
    r = cli(tmp_path, "build", str(spec), "-o", str(tmp_path / "o.tar"), timeout=30)
    line = one_error(r, "customisation layer", "/odd ", "a fifo" if kind == "fifo" else "device")
    assert str(tmp_path / "tmpdir") not in line  # named as in the image, not the staging path
    assert list((tmp_path / "tmpdir").iterdir()) == [] and not (tmp_path / "o.tar").exists()


@pytest.mark.parametrize("extra", [None, "true"], ids=["linked", "copied"])
def test_symlinks_in_contents_are_copied_as_symlinks(tmp_path, extra):
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    spec = small_spec(tmp_path, **({"extra_commands": extra} if extra else {}))
    (tmp_path / "rootfs" / "etc" / "abs").symlink_to(secret)
    (tmp_path / "rootfs" / "etc" / "rel").symlink_to("../../secret")
    (tmp_path / "lnk").symlink_to(secret)
    data = json.loads(spec.read_text())
    data["contents"]["files"] = [str(tmp_path / "lnk")]
    spec.write_text(json.dumps(data))
    r = cli(tmp_path, "build", str(spec), "-o", "-")
    assert r.returncode == 0, r.stderr.decode()
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as image:
        manifest = json.load(image.extractfile("manifest.json"))[0]
        top = image.extractfile(manifest["Layers"][-1]).read()
    assert b"host secret" not in top
    with tarfile.open(fileobj=io.BytesIO(top)) as layer:
        links = {m.name: m.linkname for m in layer.getmembers() if m.issym()}
    assert links == {"/etc/abs": str(secret), "/etc/rel": "../../secret", "/lnk": str(secret)}


@pytest.mark.parametrize(
    "index, words",
    [
        (b"[1]", "must be an object"),
        (b'{"manifests": "x"}', "manifests: must be a list"),
        (b'{"manifests": [1]}', "manifests[0]: must be an object"),
        (b"{not json", "not valid JSON"),
        (None, "a fifo"),
    ],
    ids=["list", "manifests-string", "manifest-int", "not-json", "fifo"],
)
def test_broken_index_of_an_existing_layout_fails_before_any_blob(tmp_path, index, words):
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    if index is None:
        os.mkfifo(layout / "index.json")
    else:
        (layout / "index.json").write_bytes(index)
    before = sorted(p.name for p in layout.rglob("*"))
    r = cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(layout), "--format", "oci-dir")
    one_error(r, str(layout / "index.json"), words)
    assert sorted(p.name for p in layout.rglob("*")) == before


def test_metadata_into_a_fifo_streams_and_stays_a_fifo(tmp_path):
    fifo, dev = tmp_path / "meta", char_device(tmp_path)
    os.mkfifo(fifo)
    reader, got = read_fifo_in_thread(fifo)
    before = os.stat(dev)
    spec = str(small_spec(tmp_path))
    r = cli(tmp_path, "build", spec, "-o", str(dev), "--metadata", str(fifo))
    reader.join(10)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(got[0])["tag"] == "1"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and same_node(before, os.stat(dev))


def test_ignored_sighup_stays_ignored(tmp_path):
    """Under nohup (SIGHUP ignored when started) a hangup does not stop the build."""
    marker = tmp_path / "started"
    spec = small_spec(tmp_path, extra_commands=f"touch {marker}; sleep 1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastlayer", "build", str(spec), "-o", "out.tar"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env_for(tmp_path),
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert out == b"1\n" and "manifest.json" in image_names((tmp_path / "out.tar").read_bytes())


# --- --metadata is checked before the image is built ---------------------------------


def test_metadata_into_a_directory_fails_before_the_image_is_written(tmp_path):
    spec = small_spec(tmp_path)
    (tmp_path / "meta").mkdir()
    r = cli(tmp_path, "build", "-q", str(spec), "-o", "img.tar", "--metadata", "meta")
    one_error(r, "cannot write meta", "directory")
    assert not (tmp_path / "img.tar").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("meta", ["img.tar", "./img.tar"])
def test_metadata_on_the_image_path_is_refused(tmp_path, meta):
    spec = small_spec(tmp_path)
    r = cli(tmp_path, "build", "-q", str(spec), "-o", "img.tar", "--metadata", meta)
    one_error(r, "--metadata", "the image's own -o path")
    assert not (tmp_path / "img.tar").exists()


def test_full_disk_names_the_output_and_leaves_nothing(tmp_path, tiny_fs):
    """An image bigger than the disk its output is on: one line naming the output
    and the cause, and no temporary file left filling the disk."""
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "big").write_bytes(os.urandom(256 << 10))  # 4x the 64 KiB disk
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "app", "tag": "1", "contents": {"roots": [str(rootfs)]}}))
    out = tiny_fs / "image.tar"
    r = cli(tmp_path, "build", str(spec), "-o", str(out), "--no-cache")
    one_error(r, str(out), "No space left on device")
    assert os.listdir(tiny_fs) == []


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_rank_to_stdout_on_a_full_disk_is_one_line(tmp_path, tiny_fs, unbuffered):
    """`fastlayer rank` writes its lines to stdout, here a file on a full disk:
    one line and exit 1, never exit 0 with the ranking cut short. With
    PYTHONUNBUFFERED=1 (common in containers) stdout's binary layer is raw, so
    one write() may take only part of the lines."""
    S = "/nix/store/"
    nodes = [{"path": f"{S}{i:032d}-p{i}", "references": []} for i in range(3000)]
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(nodes))  # about 150 KiB of lines: over the 64 KiB disk
    out = tiny_fs / "ranked.txt"
    with open(out, "wb") as f:
        r = subprocess.run([sys.executable, "-m", "fastlayer", "rank", str(graph)], stdout=f,
                           stderr=subprocess.PIPE, timeout=60,
                           env={**env_for(tmp_path), "PYTHONUNBUFFERED": unbuffered})  # fmt: skip
    one_error(r, "No space left on device")


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_plan_to_stdout_on_a_full_disk_is_one_line(tmp_path, tiny_fs, unbuffered):
    """Every command that prints to stdout (here `plan`, through print and
    text writes, not rank's own loop) fails on a full disk with one line,
    PYTHONUNBUFFERED or not: never exit 0 with its output cut short."""
    S = "/nix/store/"
    nodes = [{"path": f"{S}{i:032d}-p{i}", "references": []} for i in range(3000)]
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(nodes))
    out = tiny_fs / "plan.txt"
    with open(out, "wb") as f:
        r = subprocess.run([sys.executable, "-m", "fastlayer", "plan", str(graph),
                            "--max-layers", "3000"], stdout=f,
                           stderr=subprocess.PIPE, timeout=60,
                           env={**env_for(tmp_path), "PYTHONUNBUFFERED": unbuffered})  # fmt: skip
    one_error(r, "No space left on device")


def test_closed_stdout_is_no_traceback(tmp_path):
    nodes = [{"path": "/nix/store/aaa-x", "references": []}]
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(nodes))
    r = subprocess.run(["sh", "-c", f'exec "$0" -m fastlayer rank {graph} >&-', sys.executable],
                       stderr=subprocess.PIPE, timeout=60, env=env_for(tmp_path))  # fmt: skip
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_reader_gone_early_is_quiet(tmp_path, unbuffered):
    """`fastlayer inspect IMAGE | true`: the reader is gone before the lines are
    written; exit 1 with nothing on stderr (no 'Exception ignored ...
    BrokenPipeError' from the flush at exit)."""
    image = tmp_path / "image.tar"
    assert cli(tmp_path, "build", str(small_spec(tmp_path)), "-o", str(image)).returncode == 0
    r = subprocess.run(["bash", "-c", 'set -o pipefail; "$0" -m fastlayer inspect '
                        '"$1" | true', sys.executable, str(image)],
                       stderr=subprocess.PIPE, timeout=60,
                       env={**env_for(tmp_path), "PYTHONUNBUFFERED": unbuffered})  # fmt: skip
    assert r.stderr == b"", r.stderr.decode()
    assert r.returncode == 1
