"""Real external validators for integration tests: podman, skopeo, umoci.

Each tool is looked up with `require(name)`: a missing tool skips the test with
its reason, or fails it when FASTLAYER_REQUIRE_VALIDATORS=1 (as CI sets), so a
CI run can never pass by skipping every check.

Podman runs against a private store (`--root`/`--runroot`/`tmp_dir` under a
temporary directory, vfs driver, file locks), so tests never touch the host's
images or other podman users; see `Podman` and the `podman` fixture in
conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

REQUIRE_ENV = "FASTLAYER_REQUIRE_VALIDATORS"

# Tools some distributions keep outside a normal user's PATH (runc is in /usr/sbin).
_EXTRA_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

# Generous: podman/skopeo on a loaded 2-core machine with vfs copies.
TIMEOUT = 600


def validators_required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def unavailable(reason: str):
    """Skip the current test for `reason`, or fail it when validators are required."""
    if validators_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _EXTRA_DIRS:
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require(name: str) -> str:
    """Absolute path of validator `name`, or skip/fail the test (see `unavailable`)."""
    found = find_tool(name)
    if found is None:
        unavailable(f"validator {name!r} not installed")
    return found


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"needs root: {why}")


class ValidatorError(AssertionError):
    """A validator rejected its input; the message carries the tool's stderr."""


def run_tool(argv: list[str], *, env=None, stdin=None, input=None) -> str:
    """Run a validator; return its stdout, or raise ValidatorError with its stderr."""
    proc = subprocess.run(
        [str(a) for a in argv],
        env=env,
        stdin=stdin if input is None else None,
        input=input,
        capture_output=True,
        timeout=TIMEOUT,
    )
    if proc.returncode != 0:
        raise ValidatorError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}:\n"
            f"{proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode(errors="replace")


# --- podman ----------------------------------------------------------------

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base}/events.log"
tmp_dir = "{base}/tmp"
lock_type = "file"
image_copy_tmp_dir = "{base}/tmp"
"""


class Podman:
    """podman on a private vfs store under `base` (see module docstring).

    `tmp_dir` and `lock_type = "file"` keep libpod's per-boot state and locks
    out of /run/libpod and the host-wide /dev/shm lock segment, which other
    podman users on the machine share.
    """

    def __init__(self, exe: str, base: Path):
        self.exe = exe
        self.base = Path(base)
        (self.base / "tmp").mkdir(parents=True, exist_ok=True)
        # podman refuses a runroot longer than 50 characters, which a pytest
        # temporary path passes under xdist (.../popen-gw0/podman12/runroot)
        self.runroot = Path(tempfile.mkdtemp(prefix="fl-podman-", dir="/tmp"))
        conf = self.base / "containers.conf"
        conf.write_text(CONTAINERS_CONF.format(base=self.base))
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf), "TMPDIR": str(self.base / "tmp")}

    def argv(self, *args) -> list[str]:
        return [
            self.exe,
            "--root",
            str(self.base / "root"),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "vfs",
            *map(str, args),
        ]

    def __call__(self, *args, stdin=None, input=None) -> str:
        return run_tool(self.argv(*args), env=self.env, stdin=stdin, input=input)

    def load(self, tar: Path | None = None, *, stdin=None) -> list[str]:
        """`podman load` an archive file, or the stream `stdin`; return loaded names."""
        out = self("load", "-i", tar) if tar is not None else self("load", stdin=stdin)
        names = [
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Loaded image")
        ]
        assert names, f"podman load reported no image:\n{out}"
        return [n for name in names for n in name.split(",")]

    def inspect(self, ref: str) -> dict:
        return json.loads(self("image", "inspect", ref))[0]

    def run(self, ref: str, *cmd: str, user: str | None = None) -> str:
        """`podman run --rm --network none` and return the container's stdout."""
        require("runc")
        require("conmon")
        opts = ["--user", user] if user else []
        return self("run", "--rm", "--network", "none", *opts, ref, *cmd)

    def rmi(self, *refs: str) -> None:
        self("rmi", "--force", *refs)

    def reset(self) -> None:
        """Remove every image, container and the store itself."""
        try:
            run_tool(self.argv("system", "reset", "--force"), env=self.env)
        finally:
            shutil.rmtree(self.runroot, ignore_errors=True)


# --- skopeo / umoci --------------------------------------------------------

_POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


def skopeo_copy_to_oci(archive: Path, oci_dir: Path, tag: str) -> Path:
    """`skopeo copy docker-archive:ARCHIVE oci:OCI_DIR:TAG` (verifies every diff_id)."""
    skopeo = require("skopeo")
    oci_dir = Path(oci_dir)
    policy = oci_dir.parent / f"{oci_dir.name}.policy.json"
    policy.write_text(_POLICY)
    env = {**os.environ, "TMPDIR": str(oci_dir.parent)}
    run_tool(
        [
            skopeo,
            "--policy",
            policy,
            "copy",
            "--quiet",
            f"docker-archive:{archive}",
            f"oci:{oci_dir}:{tag}",
        ],
        env=env,
    )
    return oci_dir


def umoci_unpack(oci_dir: Path, tag: str, bundle: Path) -> Path:
    """`umoci unpack` (checks every blob digest); return the bundle's rootfs.

    As root, file owners are kept as the layers say; otherwise `--rootless`
    maps them all to the caller (tests that check owners call require_root).
    """
    umoci = require("umoci")
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    run_tool([umoci, "unpack", *rootless, "--image", f"{oci_dir}:{tag}", bundle])
    return Path(bundle) / "rootfs"


# --- reading results -------------------------------------------------------


class Entry(NamedTuple):
    """One file system object: kind, permission bits, owner and what it holds.

    `data` is the symlink target, the sha256 of a regular file, or None.
    `mtime` is None unless asked for.
    """

    kind: str
    mode: int
    uid: int
    gid: int
    data: str | None
    mtime: int | None = None


_KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFSOCK: "socket",
}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def entry_of(path: str | Path, *, uid=None, gid=None, mtime=None, with_mtime=False) -> Entry:
    """The Entry of `path` (lstat), with owner/mtime overridden when given."""
    st = os.lstat(path)
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "other")
    if kind == "symlink":
        data = os.readlink(path)
    elif kind == "file":
        data = sha256_file(path)
    else:
        data = None
    return Entry(
        kind,
        stat.S_IMODE(st.st_mode),
        st.st_uid if uid is None else uid,
        st.st_gid if gid is None else gid,
        data,
        (int(st.st_mtime) if mtime is None else mtime) if with_mtime else None,
    )


def walk_tree(top: str | Path, prefix: str = "", *, with_mtime=False, **override) -> dict:
    """{prefix + "/" + relative path: Entry} for everything below `top`
    (not `top` itself), never following symlinks."""
    result = {}
    top = str(top)
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        base = prefix if rel == "." else f"{prefix}/{rel}"
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            result[f"{base}/{name}"] = entry_of(path, with_mtime=with_mtime, **override)
    return result


def walk_rootfs(rootfs: str | Path, *, with_mtime=False) -> dict:
    """{"/abs/path": Entry} for an unpacked image rootfs."""
    return walk_tree(rootfs, with_mtime=with_mtime)


class DockerArchive(NamedTuple):
    manifest: list
    config: dict
    config_digest: str  # hex sha256 of the config file bytes (the image id)
    layer_names: list  # manifest order
    layer_digests: list  # hex sha256 of each layer.tar, manifest order
    member_names: list  # every member, archive order


def read_docker_archive(path: str | Path) -> DockerArchive:
    """Parse a docker-archive and hash its config and every layer it lists."""
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        config_bytes = tar.extractfile(manifest[0]["Config"]).read()
        digests = []
        for name in manifest[0]["Layers"]:
            h = hashlib.sha256()
            f = tar.extractfile(name)
            while chunk := f.read(1 << 20):
                h.update(chunk)
            digests.append(h.hexdigest())
        members = tar.getnames()
    return DockerArchive(
        manifest,
        json.loads(config_bytes),
        hashlib.sha256(config_bytes).hexdigest(),
        list(manifest[0]["Layers"]),
        digests,
        members,
    )


def tool_version(name: str) -> str:
    exe = find_tool(name)
    if exe is None:
        return f"{name}: missing"
    try:
        out = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{name}: {e}"
    return out.splitlines()[0] if out else f"{name}: ?"
