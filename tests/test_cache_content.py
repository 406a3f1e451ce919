"""A fresh checkout (same bytes, new inodes and times) of a spec's roots is
known to the layer cache by its content, so a re-push skips its layers."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fastlayer.publish import push_spec


@pytest.mark.validators
def test_a_fresh_checkout_is_pushed_again_without_upload_or_production(tmp_path, registry):
    rootfs = tmp_path / "rootfs"
    (rootfs / "app").mkdir(parents=True)
    (rootfs / "app" / "data").write_bytes(bytes(range(256)) * 4096)
    (rootfs / "app" / "run").write_text("#!/bin/sh\n")
    spec = {"name": "checkout", "tag": "1",
            "contents": {"roots": [str(rootfs)], "root_layers": "per-root"}}  # fmt: skip
    dest = f"docker://{registry.host}/team/checkout:1"
    cache = str(tmp_path / "cache")
    first = push_spec(spec, dest, insecure=True, cache=cache)
    assert first.build.reused == 0

    # a fresh checkout: cp gives new inodes, times and ctimes, the same bytes
    subprocess.run(["cp", "-r", str(rootfs), str(tmp_path / "fresh")], check=True)
    shutil.rmtree(rootfs)
    (tmp_path / "fresh").rename(rootfs)
    mark = registry.mark()
    again = push_spec(spec, dest, insecure=True, cache=cache)
    assert again.digest == first.digest
    assert again.build.reused == 1  # the roots layer: known by content, HEAD only
    assert registry.uploads_since(mark) == []

    # a changed byte is a new layer, never the cached one
    (rootfs / "app" / "data").write_bytes(bytes(range(256)) * 4095 + b"x" * 256)
    changed = push_spec(spec, dest, insecure=True, cache=cache)
    assert changed.build.reused == 0 and changed.digest != first.digest
