"""The plan file: the JSON document `fastlayer plan` writes and the builder reads.

Format, version 1 (keys in this order; readers ignore unknown keys):

    {
      "version": 1,
      "strategy": "popularity" | "limit" | "auto" | "pipeline" | "stable" | "shared",
      "store_dir": "/nix/store",
      "budget": 99,               # store layers allowed (null: not limited)
      "total_size": 123456,       # sum of narSize over every path of the graph
      "layers": [                 # bottom first
        {"paths": ["/nix/store/...", ...], "size": 1234},   # size = sum of narSize
        ...
      ]
    }

Every path of the graph is in exactly one layer; no layer is empty. `stable`
reads a previous plan to keep its groupings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from fastlayer import untrusted
from fastlayer.untrusted import Invalid

VERSION = 1


@dataclass
class Layer:
    paths: list[str]
    size: int


@dataclass
class Plan:
    strategy: str
    layers: list[Layer]
    store_dir: str = "/nix/store"
    budget: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "strategy": self.strategy,
            "store_dir": self.store_dir,
            "budget": self.budget,
            "total_size": self.total_size,
            "layers": [{"paths": layer.paths, "size": layer.size} for layer in self.layers],
            **self.extra,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"


def plan_from_json(data: Any, source: str = "plan") -> Plan:
    """A plan document checked against the format above (unknown keys ignored)."""
    if not isinstance(data, dict) or "layers" not in data:
        raise Invalid(f"{source}: not a fastlayer plan (no 'layers')")
    version = data.get("version")
    if type(version) is not int or version != VERSION:
        raise Invalid(f"{source}: unsupported plan version {untrusted.short(version)}")
    items = untrusted.of_type(data["layers"], list, f"{source}: layers")
    layers = [_layer(item, source, i) for i, item in enumerate(items)]
    budget = data.get("budget")
    if budget is not None:
        untrusted.integer(budget, f"{source}: budget", 1)
    return Plan(
        strategy=untrusted.field(data, "strategy", str, source, ""),
        layers=layers,
        store_dir=untrusted.field(data, "store_dir", str, source, "/nix/store"),
        budget=budget,
    )


def _layer(item: Any, source: str, i: int) -> Layer:
    """layers[i]: {"paths": [str, ...], "size": int in [0, 2^63)}."""
    paths = item.get("paths") if isinstance(item, dict) else None
    size = item.get("size", 0) if isinstance(item, dict) else None
    if (
        not isinstance(paths, list)
        or not all(isinstance(p, str) for p in paths)
        or type(size) is not int
    ):
        raise Invalid(f"{source}: malformed layer {i}")
    untrusted.integer(size, f"{source}: layers[{i}].size")
    return Layer(paths=paths, size=size)


def read_plan(path: str | os.PathLike[str]) -> Plan:
    """A plan file: a regular file (no size cap: a plan is smaller than its graph)."""
    name = os.fspath(path)
    with untrusted.open_regular(name, "plan") as f:
        raw = f.read()
    data = untrusted.parse_json(raw, f"malformed JSON in {name}")
    return plan_from_json(data, name)
