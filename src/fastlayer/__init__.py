"""fastlayer: native-accelerated builder of layered container images.

Public API (imported lazily, so `import fastlayer` stays cheap):

- build(spec, output, format=..., compress=...) -> BuildResult
- stream(spec) -> BuildResult (docker-archive on stdout)
- load_spec(path_or_dict) -> Spec
- open_image(path, tag=None) -> Image (any base image format)
- load_graph(path) -> ClosureGraph; rank(graph); make_plan(graph, strategy, budget)
- nar_hash(path) -> NarInfo; nar_hash_many(paths); scan_references(store_dir, paths)
- pull(ref, output, ...); push_image(path, "docker://reg/name:tag"); push_spec(spec, dest)
- build_many(specs, output_dir, ...), push_many(specs, "docker://reg/prefix") -> BatchResult
"""

from __future__ import annotations

import importlib
from typing import Any

from fastlayer.errors import FastlayerError

_LAZY = {
    "build": "fastlayer.builder",
    "stream": "fastlayer.builder",
    "BuildResult": "fastlayer.builder",
    "load_spec": "fastlayer.spec",
    "Spec": "fastlayer.spec",
    "open_image": "fastlayer.sources.base_image",
    "Image": "fastlayer.model",
    "Layer": "fastlayer.model",
    "load_graph": "fastlayer.graph",
    "ClosureGraph": "fastlayer.graph",
    "rank": "fastlayer.plan",
    "make_plan": "fastlayer.plan",
    "read_plan": "fastlayer.plan",
    "Plan": "fastlayer.plan",
    "nar_hash": "fastlayer.nix.nar",
    "nar_hash_many": "fastlayer.nix.nar",
    "NarInfo": "fastlayer.nix.nar",
    "scan_references": "fastlayer.nix.scan",
    "scan_store": "fastlayer.nix.scan",
    "pull": "fastlayer.registry.pull",
    "push_image": "fastlayer.registry.push",
    "push_spec": "fastlayer.publish",
    "build_many": "fastlayer.batch",
    "push_many": "fastlayer.batch",
    "BatchResult": "fastlayer.batch",
}

__all__ = ["FastlayerError", "__version__", *_LAZY]


def _version() -> str:
    """The installed distribution's version (its metadata); run from a source
    tree that is not installed, the version pyproject.toml declares."""
    from importlib import metadata

    try:
        return metadata.version("fastlayer")
    except metadata.PackageNotFoundError:
        pass
    import os
    import re

    here = os.path.dirname(os.path.abspath(__file__))
    pyproject = os.path.join(here, os.pardir, os.pardir, "pyproject.toml")  # src/fastlayer/..
    try:
        with open(pyproject, encoding="utf-8") as f:
            found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # looked up when asked: importlib.metadata costs start-up time
        return _version()
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastlayer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
