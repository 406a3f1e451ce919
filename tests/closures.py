"""Fake Nix closures on disk for tests: store paths under ROOT/nix/store plus
an exportReferencesGraph JSON describing them (no Nix needed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
STORE = "/nix/store"


def store_name(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return STORE + "/" + "".join(ALPHABET[b % 32] for b in digest[:32]) + "-" + name


def make_closure(
    root: Path, packages: dict[str, dict[str, bytes | str]], refs: dict[str, list[str]]
) -> tuple[dict[str, str], Path]:
    """packages: name -> {relative file: content (bytes, or "->target" for a symlink)};
    refs: name -> names it references. Returns (name -> store path, graph file)."""
    paths = {name: store_name(name) for name in packages}
    nodes = []
    for name, files in packages.items():
        top = root / paths[name].lstrip("/")
        top.mkdir(parents=True, exist_ok=True)
        size = 0
        for rel, content in files.items():
            f = top / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str) and content.startswith("->"):
                f.symlink_to(content[2:].format(**{k: v for k, v in paths.items()}))
                continue
            data = content if isinstance(content, bytes) else content.encode()
            f.write_bytes(data)
            if rel.startswith("bin/"):
                f.chmod(0o755)
            size += len(data)
        nodes.append({
            "path": paths[name],
            "references": [paths[r] for r in refs.get(name, [])] + [paths[name]],
            "narSize": size + 128,
            "narHash": "",
            "closureSize": 0,
        })  # fmt: skip
    graph = root / "graph.json"
    graph.write_text(json.dumps(nodes))
    return paths, graph


def busybox_closure(root: Path) -> tuple[dict[str, str], Path]:
    """A runnable closure: busybox-static (bin/sh etc. linked to it) and a data path."""
    bb = shutil.which("busybox") or "/bin/busybox"
    data = Path(bb).read_bytes() if os.path.exists(bb) else b"#!/bin/false\n"
    applets = ["sh", "cat", "echo", "id", "whoami", "ls", "stat"]
    files: dict[str, bytes | str] = {"bin/busybox": data}
    files.update({f"bin/{a}": "->busybox" for a in applets})
    return make_closure(
        root,
        {
            "busybox": files,
            "greeting": {"share/greeting": "hello from fastlayer\n"},
        },
        {"busybox": ["greeting"]},
    )
