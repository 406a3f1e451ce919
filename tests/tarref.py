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


def _time(value: str):
    from datetime import datetime, timezone

    if value == "now":
        return datetime.now(tz=timezone.utc)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime = len(data), mtime
    tar.addfile(ti, io.BytesIO(data))


def reference_image(conf: dict, repo_tag: str | None = None) -> bytes:
    """The whole docker-archive the nixpkgs script writes for conf (DESIGN.md §2):
    base layer entries copied, one `<sha256>/layer.tar` per store layer, the
    customisation layer, `<sha256>.json` config and manifest.json."""
    import hashlib
    import json
    import os

    created = _time(conf["created"])
    mtime = int(_time(conf["mtime"]).timestamp())
    uid, gid = int(conf["uid"]), int(conf["gid"])
    out = io.BytesIO()
    layers: list[tuple[str, str, list[str]]] = []
    config = conf["config"]
    with tarfile.open(fileobj=out, mode="w|") as tar:
        if conf["from_image"]:
            with tarfile.open(conf["from_image"]) as base:
                manifest = json.load(base.extractfile("manifest.json"))[0]
                base_config = json.load(base.extractfile(manifest["Config"]))
                diff_ids = base_config["rootfs"]["diff_ids"]
                for name, diff_id in zip(manifest["Layers"], diff_ids, strict=True):
                    ti = base.getmember(name)
                    tar.addfile(ti, base.extractfile(ti))
                    layers.append((diff_id.removeprefix("sha256:"), ti.path, [ti.path]))
            env = base_config["config"].get("Env", []) + config.get("Env", [])
            if env:
                by_name: dict[str, str] = {}
                for entry in env:
                    by_name[entry.split("=", 1)[0]] = entry
                config["Env"] = list(by_name.values())
        for paths in conf["store_layers"]:
            data = reference_layer(paths, mtime, uid, gid, conf["uname"], conf["gname"])
            digest = hashlib.sha256(data).hexdigest()
            _add_bytes(tar, f"{digest}/layer.tar", data, mtime)
            layers.append((digest, f"{digest}/layer.tar", paths))
        custom = conf["customisation_layer"]
        with open(os.path.join(custom, "checksum")) as f:
            checksum = f.read().strip()
        ti = tar.gettarinfo(os.path.join(custom, "layer.tar"))
        ti.name, ti.mtime = f"{checksum}/layer.tar", mtime
        with open(os.path.join(custom, "layer.tar"), "rb") as f:
            tar.addfile(ti, f)
        layers.append((checksum, ti.name, [custom]))
        image = {
            "created": created.isoformat(),
            "architecture": conf["architecture"],
            "os": "linux",
            "config": config,
            "rootfs": {"diff_ids": [f"sha256:{c}" for c, _, _ in layers], "type": "layers"},
            "history": [
                {"created": created.isoformat(), "comment": f"store paths: {p}"}
                for _, _, p in layers
            ],
        }
        image_json = json.dumps(image, indent=4).encode()
        config_name = hashlib.sha256(image_json).hexdigest() + ".json"
        _add_bytes(tar, config_name, image_json, mtime)
        manifest_out = [
            {
                "Config": config_name,
                "RepoTags": [repo_tag or conf["repo_tag"]],
                "Layers": [p for _, p, _ in layers],
            }
        ]
        _add_bytes(tar, "manifest.json", json.dumps(manifest_out, indent=4).encode(), mtime)
    return out.getvalue()
