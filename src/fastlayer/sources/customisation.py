"""The customisation layer: what goes into `/` besides the store.

It is assembled in a staging directory (as nixpkgs' customisation layer is):
store paths' contents symlinked in the way symlinkJoin does it, root
directories and files copied (hard links where possible), fakeNss files,
then `extra_commands` run there as the invoking user. Owners and modes in
the archive come from the spec and its permission rules, never from the
staging files, so no root or fakeroot is needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from fastlayer import interrupts, untrusted
from fastlayer._native.tarstream import LayerStream
from fastlayer.emit import Owner, fsencode, walk
from fastlayer.errors import FastlayerError
from fastlayer.spec import FakeNss, Permission, Spec


def fake_nss_files(nss: FakeNss) -> dict[str, str]:
    """/etc/passwd, /etc/group and /etc/nsswitch.conf, as nixpkgs' fakeNss writes them."""
    passwd = [
        "root:x:0:0:root user:/var/empty:/bin/sh",
        *nss.passwd,
        "nobody:x:65534:65534:nobody:/var/empty:/bin/sh",
    ]
    group = ["root:x:0:", *nss.group, "nobody:x:65534:"]
    return {
        "etc/passwd": "".join(line + "\n" for line in passwd),
        "etc/group": "".join(line + "\n" for line in group),
        "etc/nsswitch.conf": "hosts: files dns\n",
    }


def stage(spec: Spec, staging: Path) -> None:
    """Fill staging with the customisation layer's tree."""
    staging.chmod(0o755)
    if spec.contents.link_store_paths:
        for store_path in spec.contents.store_paths:
            _link_join(Path(spec.on_disk(store_path)), Path(store_path), staging)
    # extra_commands may edit what it finds: then copies, so the user's files stay
    copy = _copy_regular if spec.extra_commands else _link_or_copy
    mode = spec.contents.root_layers  # per-root, per-directory: layers of their own
    for root in spec.contents.roots if mode != "per-root" else []:
        # symlinks are copied as symlinks; anything not a file or directory is refused
        shutil.copytree(
            root,
            staging,
            symlinks=True,
            dirs_exist_ok=True,
            copy_function=lambda src, dst: copy(src, dst, "contents.roots entry"),
            ignore=(lambda d, _, r=root: root_dirs(r) if d == r else [])
            if mode == "per-directory"
            else None,
        )
    for f in spec.contents.files:
        target = staging / os.path.basename(f.rstrip("/"))
        _replace(target)
        if os.path.islink(f):
            target.symlink_to(os.readlink(f))
        else:
            copy(f, str(target), "contents.files entry")
    if spec.fake_nss is not None:
        for rel, text in fake_nss_files(spec.fake_nss).items():
            p = staging / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            _replace(p)
            p.write_text(text)
        (staging / "var" / "empty").mkdir(parents=True, exist_ok=True)
    if spec.extra_commands:
        run_extra_commands(spec.extra_commands, staging)


def root_dirs(root: str) -> list[str]:
    """The names of a root's top-level directories (a symlink to one is no
    directory here), str-sorted: with root_layers = "per-directory" each is a
    layer of its own and stays out of the customisation layer."""
    return sorted(
        n for n in os.listdir(root) if stat.S_ISDIR(os.lstat(os.path.join(root, n)).st_mode)
    )


def run_extra_commands(commands: str, staging: Path) -> None:
    """`/bin/sh -ec commands` in staging, in a process group of its own that is
    killed whole when it ends or the build stops (a signal, an error), so no
    process it started keeps writing into the staging directory."""
    proc: subprocess.Popen | None = None
    try:
        # a signal during the start is raised as the block ends: inside this try,
        # once proc is set, so the group is killed (the shell may already run)
        with interrupts.deferred():
            proc = subprocess.Popen(
                ["/bin/sh", "-ec", commands],
                cwd=staging,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",  # its messages may be in any encoding
                start_new_session=True,
            )
        _, err = proc.communicate()
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        raise FastlayerError(f"extra_commands failed with exit code {proc.returncode}: {last}")


def customisation_layer(spec: Spec, staging: Path, owner: Owner) -> LayerStream:
    """Walk the staged tree into a layer with absolute names, rules applied."""
    roots = [(fsencode(str(staging / n)), fsencode("/" + n)) for n in _sorted(staging)]
    try:
        stream = walk([], roots, owner)
    except FastlayerError as e:  # e.g. a device extra_commands made: name it as in the image
        raise FastlayerError(f"customisation layer: {str(e).replace(str(staging), '')}") from None
    rules = list(spec.permissions)
    if spec.nix_db:  # the Nix state belongs to nix_uid/nix_gid; later user rules still win
        rules.insert(0, Permission("/nix/var*", spec.nix_uid, spec.nix_gid))
    if rules:
        stream.set_rules([_rule(p) for p in rules])
    return stream


def _rule(p: Permission) -> tuple[bytes, int, int, int]:
    keep = -1
    path = "/" + p.path.lstrip("/")
    return (
        fsencode(path),
        keep if p.uid is None else p.uid,
        keep if p.gid is None else p.gid,
        keep if p.mode is None else p.mode,
    )


def _sorted(d: Path) -> list[str]:
    # str order of the top names, so the whole layer is in component-wise order
    return sorted(os.listdir(d))


def _link_join(src: Path, target: Path, dst: Path) -> None:
    """symlinkJoin for one store path: real directories, symlinks at the leaves.

    src is where the path is on disk, target its name in the image (the links
    point there). A leaf already present (from an earlier path) is kept, as
    lndir does."""
    if not src.is_dir() or src.is_symlink():
        leaf = dst / _name_without_hash(src.name)
        if not os.path.lexists(leaf):
            leaf.symlink_to(target)
        return
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        out = dst / rel
        if out.is_symlink():  # an earlier path linked this directory whole: keep it
            dirnames[:] = []
            continue
        out.mkdir(parents=True, exist_ok=True)
        leaves = list(filenames)
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                leaves.append(d)  # symlinked directories are leaves
                dirnames.remove(d)
        for name in leaves:
            leaf = out / name
            if not os.path.lexists(leaf):
                leaf.symlink_to(target / rel / name)


def _name_without_hash(name: str) -> str:
    head, sep, rest = name.partition("-")
    return rest if sep and len(head) == 32 else name


def _check_regular(src: str, what: str) -> None:
    """Refuse, by type and before any read, what is no regular file (devices would
    copy without end, fifos block)."""
    mode = os.lstat(src).st_mode
    if not stat.S_ISREG(mode):
        raise untrusted.Invalid(f"{what} {src}: is {untrusted.file_kind(mode)}, not a regular file")


def _link_or_copy(src: str, dst: str, what: str) -> str:
    _check_regular(src, what)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        _copy_regular(src, dst, what)
    return dst


def _copy_regular(src: str, dst: str, what: str) -> str:
    """Copy a regular file (mode and times too); refuses anything else, a symlink too."""
    _check_regular(src, what)
    with untrusted.open_regular(src, what, follow=False) as f:
        st = os.fstat(f.fileno())
        with open(dst, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return dst


def _replace(p: Path) -> None:
    if os.path.lexists(p):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
