"""The layer tar as nixpkgs' stream script writes it, with stdlib tarfile.

The reference that fastlayer's native streamer must equal byte for byte:
`/nix` and `/nix/store` first, then each path and everything below it in
sorted(pathlib.Path) order, owners and mtime forced, hard links as regular
files, symlinked directories not entered, PAX format, streamed ("w|").
"""

from __future__ import annotations

import io
import pathlib
import tarfile


def reference_layer(
    paths: list[str], mtime: int, uid: int, gid: int, uname: str, gname: str, out=None
) -> bytes:
    """The layer bytes; with out (any object with write()), streamed there instead."""
    sink = out if out is not None else io.BytesIO()

    def owned(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mtime, uid, gid, uname, gname
        return ti

    with tarfile.open(fileobj=sink, mode="w|") as tar:
        for top in ("/nix", "/nix/store"):
            ti = tarfile.TarInfo(top)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tar.addfile(owned(ti))
        for p in paths:
            root = pathlib.Path(p)
            found = [root] if root.is_symlink() else [root, *root.rglob("*")]
            for f in sorted(found):
                ti = tar.gettarinfo(f)
                ti.name = "/" + ti.name
                if ti.islnk():
                    ti.type, ti.linkname, ti.size = tarfile.REGTYPE, "", f.stat().st_size
                owned(ti)
                if ti.isfile():
                    with open(f, "rb") as fh:
                        tar.addfile(ti, fh)
                else:
                    tar.addfile(ti)
    return b"" if out is not None else sink.getvalue()
