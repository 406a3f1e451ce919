"""Layers of plain files and directories: the spec's [[layers]] and root layers.

- Explicit layers: each [[layers]] entry is one layer. Every path (a file, a
  directory or a glob's matches) goes to `dest/<its name>`; `dest`'s own
  directories lead the layer, mode 0755.
- Root layers: with `contents.root_layers = "per-root"` each `contents.roots`
  entry is a layer (its contents at `/`); with `"per-directory"` each
  top-level directory of each root is one (`/<name>`), the roots' top-level
  files and symlinks staying in the customisation layer.

Nothing is staged or copied: the native walker lists each layer from disk
(refusing fifos, sockets and devices by type before anything is opened) and
the layer streams in the same single read | hash | write pass as the store
layers. Owners, mtime and `permissions` rules are the spec's, so a layer's
bytes depend only on what it holds and those rules: the same directory gives
the same diff_id in any image.

Order in the image: base layers, store layers, explicit layers (spec order),
root layers, the customisation layer: what changes least often lowest.
The budget (`fit`): base, explicit and the one customisation layer come off
`max_layers` first; root layers take what is left but one when there are
store paths (merged into the last root layer past that, nothing dropped);
store layers get the rest.
"""

from __future__ import annotations

import glob
import os
import posixpath
import stat
from dataclasses import dataclass, field

from fastlayer import untrusted
from fastlayer._native.tarstream import LayerStream
from fastlayer.emit import Owner, fsencode, walk
from fastlayer.errors import FastlayerError
from fastlayer.plan.limit import limit_layers
from fastlayer.sources.customisation import _rule, root_dirs
from fastlayer.spec import LayerSpec, Spec, is_glob


@dataclass
class FileLayer:
    """One layer walked from disk: roots [(path on disk, archive name)] in
    archive order, after lead_dirs (archive names of directories, 0755)."""

    comment: str
    roots: list[tuple[str, str]]
    lead_dirs: list[str] = field(default_factory=list)

    def stream(self, spec: Spec, owner: Owner) -> LayerStream:
        """Walk the layer (reads no file yet), permission rules applied."""
        lead = [(fsencode(d), 0o755) for d in self.lead_dirs]
        roots = [(fsencode(fs), fsencode(arc)) for fs, arc in self.roots]
        try:
            layer = walk(lead, roots, owner)
        except FastlayerError as e:
            raise FastlayerError(f"{self.comment}: {e}") from None
        if spec.permissions:
            layer.set_rules([_rule(p) for p in spec.permissions])
        return layer


def explicit_layers(spec: Spec) -> list[FileLayer]:
    """One FileLayer per [[layers]] entry, globs expanded now."""
    return [_explicit(layer, f"layers[{i}]") for i, layer in enumerate(spec.layers)]


def _explicit(layer: LayerSpec, where: str) -> FileLayer:
    dest = "/" + posixpath.normpath(layer.dest).lstrip("/")
    dest = "/" if dest == "/." else dest
    placed: dict[str, str] = {}  # archive name -> path on disk
    for j, pattern in enumerate(layer.paths):
        at = f"{where}.paths[{j}]"
        if is_glob(pattern):
            found = sorted(glob.glob(pattern))
        else:
            found = [pattern] if os.path.lexists(pattern) else []
        if not found:
            raise untrusted.Invalid(f"{at} matches nothing: {pattern}")
        for path in found:
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                raise untrusted.Invalid(
                    f"{at}: {path} is {untrusted.file_kind(mode)}; "
                    "layers hold only files, directories and symlinks"
                )
            name = os.path.basename(path.rstrip("/"))
            if name in ("", ".", ".."):
                raise untrusted.Invalid(f"{at}: {path} has no name to place under {dest}")
            arc = posixpath.join(dest, name)
            if arc in placed:
                raise untrusted.Invalid(f"{where}: {placed[arc]} and {path} both go to {arc}")
            placed[arc] = path
    parts = [p for p in dest.split("/") if p]
    lead = ["/" + "/".join(parts[: k + 1]) for k in range(len(parts))]
    label = f"layer {layer.name}" if layer.name else f"{where} in {dest}"
    return FileLayer(label, [(placed[a], a) for a in sorted(placed)], lead)


def root_layers(spec: Spec) -> list[FileLayer]:
    """The root layers `contents.root_layers` asks for, before the budget."""
    mode = spec.contents.root_layers
    layers = []
    for i, root in enumerate(spec.contents.roots):
        if mode == "per-root":
            names = sorted(os.listdir(root))
            roots = [(os.path.join(root, n), "/" + n) for n in names]
            layers.append(FileLayer(f"contents.roots[{i}]", roots))
        elif mode == "per-directory":
            for n in root_dirs(root):
                layers.append(FileLayer(f"root directory /{n}", [(os.path.join(root, n), "/" + n)]))
    return layers


def fit(
    spec: Spec, base_layers: int, explicit: int, roots: list[FileLayer], has_store: bool
) -> list[FileLayer]:
    """The root layers within the budget (see the module doc); raises when
    max_layers cannot hold the base, explicit and customisation layers, or
    leaves no layer for store paths or for root layers that were asked for."""
    fixed = base_layers + explicit + 1
    parts = f"{base_layers} base image layers + {explicit} explicit layers + 1 customisation layer"
    if fixed > spec.max_layers:
        raise FastlayerError(f"max_layers {spec.max_layers} is less than {fixed}: {parts}")
    rest = spec.max_layers - fixed
    need_store = 1 if has_store else 0
    if roots:
        room = rest - need_store
        if room < 1:
            raise FastlayerError(
                f"max_layers {spec.max_layers} leaves no layer for contents.root_layers = "
                f"{spec.contents.root_layers!r} ({parts} + {need_store} store layer)"
            )
        groups = limit_layers([layer.roots for layer in roots], room)
        merged = roots[: len(groups)]
        if len(roots) > room:
            more = len(roots) - room
            last = FileLayer(f"{merged[-1].comment} and {more} more", groups[-1])
            merged = [*merged[:-1], last]
        roots = merged
    if has_store and rest - len(roots) < 1:
        raise FastlayerError(
            f"max layers {spec.max_layers} leaves no layer for store paths ({parts})"
        )
    return roots
