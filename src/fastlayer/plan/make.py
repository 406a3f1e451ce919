"""make_plan: a strategy by name, over a closure graph, within a layer budget."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np

from fastlayer.errors import FastlayerError
from fastlayer.graph import ClosureGraph
from fastlayer.plan import auto, limit, pipeline, popularity, shared, stable
from fastlayer.plan.planfile import Layer, Plan
from fastlayer.spec import STRATEGIES


def rank(graph: ClosureGraph) -> list[str]:
    """Paths in closure-graph.py order (most popular first)."""
    return popularity.ranked_paths(graph)


def make_plan(
    graph: ClosureGraph,
    strategy: str = "popularity",
    budget: int | None = 99,
    *,
    previous: Plan | None = None,
    steps: Any = None,
    exclude: Collection[str] = (),
) -> Plan:
    """Plan store layers for `graph` within `budget` store layers (see
    `store_layer_budget`). `exclude`d paths go in no layer. `budget` may be None
    only for `pipeline`, whose steps then decide alone."""
    if strategy not in STRATEGIES:
        raise FastlayerError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if strategy == "pipeline":
        if steps is None:
            raise FastlayerError("the pipeline strategy needs a pipeline (--pipeline)")
        layers = [p for p in pipeline.pipeline_layers(graph, steps, exclude) if p]
        if budget is not None and len(layers) > budget:
            raise FastlayerError(
                f"the pipeline made {len(layers)} layers, more than the budget of {budget}"
            )
        return _plan(graph, strategy, budget, layers)
    if budget is None or budget < 1:
        raise FastlayerError(f"layer budget must be at least 1, got {budget}")
    if strategy == "auto":
        return _plan(graph, strategy, budget, auto.auto_layers(graph, budget, exclude))
    if strategy == "shared":
        return shared.shared_plans([graph], [budget], [exclude])[0]
    keep = _keep(graph, exclude)
    if strategy == "stable":
        groups = stable.stable_groups(graph, budget, previous)
    else:
        order = popularity.rank(graph) if strategy == "popularity" else np.arange(graph.n)
        groups = limit.one_per_layer([int(i) for i in order if keep[i]], budget)
    names = graph.names
    layers = [[names[i] for i in g if keep[i]] for g in groups]
    return _plan(graph, strategy, budget, [p for p in layers if p])


def _keep(graph: ClosureGraph, exclude: Collection[str]) -> np.ndarray:
    keep = np.ones(graph.n, dtype=bool)
    if exclude:
        index = graph.index()
        keep[[index[p] for p in exclude if p in index]] = False
    return keep


def _plan(graph: ClosureGraph, strategy: str, budget: int | None, layers: list[list[str]]) -> Plan:
    index = graph.index()
    sizes = graph.nar_size.tolist()
    return Plan(
        strategy=strategy,
        layers=[Layer(paths=p, size=sum(sizes[index[x]] for x in p)) for p in layers],
        store_dir=graph.store_dir,
        budget=budget,
    )
