"""A simulated CI machine for the shared-cache tests: a store of its own (a copy
of one closure under its own root) and a cache home of its own."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


class Machine:
    def __init__(self, base: Path, name: str, origin: Path, paths: dict[str, str]):
        self.base = base / name
        self.root = self.base / "root"
        shutil.copytree(origin, self.root, symlinks=True)
        self.home = self.base / "xdg"
        spec = {
            "name": "app", "tag": "1", "store_root": str(self.root),
            "created": "2024-01-01T00:00:00Z",
            "contents": {"store_paths": [paths["app-1"]], "graph": str(self.root / "graph.json")},
            "config": {"Cmd": ["/bin/app"]},
        }  # fmt: skip
        self.spec = self.base / "app.json"
        self.spec.write_text(json.dumps(spec))

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a child process on this machine (its cache home)."""
        env = {**os.environ, "XDG_CACHE_HOME": str(self.home)}
        env.pop("FASTLAYER_CACHE", None)
        env.pop("FASTLAYER_CACHE_FETCH", None)
        return {**env, **extra}
