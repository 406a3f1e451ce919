"""The layer cache: what a layer recipe produced last time (between plan and emit).

A layer's bytes are a pure function of its recipe (keys.py): for store
paths, their names (Nix makes them content addresses) and an lstat of each
path's root; for other files, a stat fingerprint of every entry. The cache
(store.py) maps a recipe key to the layer's diff_id and size, and per
compression to its blob digest and size. The builder asks it which layers
are known and hands sinks a `model.Known` hint; sinks never see the cache.

A hint is only trusted where it is checked or harmless: a layer streamed
under a known name is hashed as it goes and a mismatch aborts the build
(and drops the entry); a blob skipped because the registry or the layout
already holds it is the very blob the key named. See README, "Layer cache".
"""

from __future__ import annotations

import os

from fastlayer.cache.store import Entry, LayerCache
from fastlayer.cachedir import default_root, home_missing

__all__ = ["Entry", "LayerCache", "default_root", "open_cache"]


def open_cache(
    where: str | os.PathLike[str] | bool | LayerCache | None = None,
) -> LayerCache | None:
    """The cache at where (a directory, or an open LayerCache as it is), at
    default_root() for None or True, or none at all for False (--no-cache) or
    when the home it would be in is missing."""
    if where is False:
        return None
    if isinstance(where, LayerCache):
        return where
    if where is None or where is True:
        return None if home_missing() else LayerCache(default_root())
    return LayerCache(os.fspath(where))
