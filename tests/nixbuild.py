"""Real Nix for tests: build closures with nix-build (as root, into /nix/store)
and check stores with nix-store. Skips, or fails when validators are required,
without Nix or root."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from validators import require, require_root

NIX_CONFIG = (
    "build-users-group =\nexperimental-features = nix-command\nsandbox = false\nsubstituters ="
)


def nix_env() -> dict[str, str]:
    return {**os.environ, "NIX_CONFIG": NIX_CONFIG}


def nix_build(expr: str, work: Path) -> tuple[str, list[dict]]:
    """Build a Nix expression; return its output path and `nix path-info --json -r`."""
    require_root("nix-build into the real /nix/store")
    nix_build_exe, nix = require("nix-build"), require("nix")
    work.mkdir(parents=True, exist_ok=True)
    (work / "expr.nix").write_text(expr)
    top = subprocess.run(
        [nix_build_exe, str(work / "expr.nix"), "--no-out-link"],
        check=True, capture_output=True, text=True, env=nix_env(),
    ).stdout.strip()  # fmt: skip
    info = subprocess.run(
        [nix, "path-info", "--json", "-r", top], check=True, capture_output=True, env=nix_env()
    ).stdout
    return top, json.loads(info)


def verify_store(root: Path) -> subprocess.CompletedProcess:
    """`nix-store --verify --check-contents` on the store under root (Nix may repair
    what it checks: give it a copy)."""
    return subprocess.run(
        [require("nix-store"), "--store", f"local?root={root}", "--verify", "--check-contents"],
        capture_output=True, text=True, env=nix_env(),
    )  # fmt: skip


def closure_in_store(root: Path, path: str) -> list[str]:
    """`nix-store -qR path` against the store under root."""
    return subprocess.run(
        [require("nix-store"), "--store", f"local?root={root}", "-qR", path],
        check=True, capture_output=True, text=True, env=nix_env(),
    ).stdout.split()  # fmt: skip
