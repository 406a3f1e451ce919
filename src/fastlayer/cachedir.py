"""Where fastlayer keeps what it caches (the layer cache, the registry blob
cache): one place, read by both without either importing the other."""

from __future__ import annotations

import os


def default_root() -> str:
    """$FASTLAYER_CACHE, else $XDG_CACHE_HOME/fastlayer, else ~/.cache/fastlayer."""
    given = os.environ.get("FASTLAYER_CACHE")
    if given:
        return given
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastlayer")


def home_missing() -> bool:
    """Whether the default cache would live in a home directory that does not
    exist (a Nix build's /homeless-shelter): then there is no default cache,
    rather than one that creates it."""
    if os.environ.get("FASTLAYER_CACHE") or os.environ.get("XDG_CACHE_HOME"):
        return False
    return not os.path.isdir(os.path.expanduser("~"))
