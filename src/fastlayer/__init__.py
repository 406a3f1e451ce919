"""fastlayer: native-accelerated builder of layered container images.

Public API (imported lazily, so `import fastlayer` stays cheap):

- build(spec, output, format=..., compress=...) -> BuildResult
- stream(spec) -> BuildResult (docker-archive on stdout)
- load_spec(path_or_dict) -> Spec
- open_image(path, tag=None) -> Image (any base image format)
- load_graph(path) -> ClosureGraph; rank(graph); make_plan(graph, strategy, budget)
- nar_hash(path) -> NarInfo; nar_hash_many(paths); scan_references(store_dir, paths)
- pull(ref, output, ...); push_image(path, "docker://reg/name:tag"); push_spec(spec, dest)
"""

from __future__ import annotations

import importlib
from typing import Any

from fastlayer.errors import FastlayerError

__version__ = "0.1.0"

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
    "push_spec": "fastlayer.registry.push",
}

__all__ = ["FastlayerError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastlayer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
