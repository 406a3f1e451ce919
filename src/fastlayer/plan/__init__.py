"""Layer planning: a closure graph plus a layer budget in, an ordered list of layers out.

Strategies (pure functions over the graph's CSR arrays, one module each):

- `popularity`: nixpkgs' referencesByPopularity order, the first budget-1 paths
  alone and the rest in one layer (dockerTools' classic layering);
- `limit`: the same cut over the graph's own order (for input already ranked);
- `auto`: nixpkgs' auto-layer;
- `pipeline`: nixpkgs' layeringPipeline steps, given as JSON;
- `stable`: keeps the previous plan's still-valid layers (see `stable`);
- `shared`: several images planned together so that they share identical
  layers (`shared_plans`; for one graph, that graph alone).
"""

from __future__ import annotations

import importlib
from typing import Any

# Names and the module holding each, imported on first use: the budget
# arithmetic and plan files need no numpy, so a build without store paths
# never loads it.
_EXPORTS = {
    "STRATEGIES": "fastlayer.spec",
    "Layer": "fastlayer.plan.planfile",
    "Plan": "fastlayer.plan.planfile",
    "read_plan": "fastlayer.plan.planfile",
    "store_layer_budget": "fastlayer.plan.limit",
    "make_plan": "fastlayer.plan.make",
    "rank": "fastlayer.plan.make",
    "ranked_lines": "fastlayer.plan.popularity",
    "shared_plans": "fastlayer.plan.shared",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastlayer.plan' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
