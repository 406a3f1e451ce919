"""Fit an ordered list of paths into a layer budget, and the budget arithmetic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from fastlayer.errors import FastlayerError
from fastlayer.untrusted import integer

T = TypeVar("T")


def store_layer_budget(max_layers: int, base_layers: int = 0) -> int:
    """Layers left for store paths: the base image's layers and the customisation
    layer come out of `max_layers` (as nixpkgs computes `availableLayers`)."""
    integer(max_layers, "max layers", 1)
    integer(base_layers, "base layers", 0)  # a negative count would widen the budget
    budget = max_layers - base_layers - 1
    if budget < 1:
        raise FastlayerError(
            f"max layers {max_layers} leaves no layer for store paths "
            f"({base_layers} base image layers + 1 customisation layer)"
        )
    return budget


def limit_layers(groups: Sequence[Sequence[T]], budget: int) -> list[list[T]]:
    """The first budget-1 groups as they are, everything after merged into the last
    layer. Never drops a path (nixpkgs issue 78744)."""
    if budget < 1:
        raise FastlayerError(f"layer budget must be at least 1, got {budget}")
    head = [list(g) for g in groups[: budget - 1]]
    tail = [p for g in groups[budget - 1 :] for p in g]
    return head + [tail] if tail else head


def one_per_layer(order: Sequence[T], budget: int) -> list[list[T]]:
    """`limit_layers` over single paths: the popularity/limit strategy."""
    return limit_layers([[p] for p in order], budget)
