"""Nix store integration: NAR hashing, nix-base32, reference scanning."""

from fastlayer.nix.nar import NarInfo, nar_hash, nar_hash_many
from fastlayer.nix.scan import PathInfo, scan_references, scan_store, write_graph

__all__ = [
    "NarInfo",
    "PathInfo",
    "nar_hash",
    "nar_hash_many",
    "scan_references",
    "scan_store",
    "write_graph",
]
