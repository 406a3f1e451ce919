"""`fastlayer inspect IMAGE [IMAGE2]`: layers, what is in them, config, shared layers.

Reads anything `open_image` reads (docker-archive current or legacy, OCI
layout or archive, by anyone). Every layer is read once: that gives its
size and contents and checks its diff_id on the way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
from typing import Any, BinaryIO

from fastlayer.errors import FastlayerError
from fastlayer.model import Image, Layer
from fastlayer.sources.base_image import open_image


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show an image's layers, their contents and config; which layers two images share",
        description="Show each layer (diff_id, size, store paths or top directories), the "
        "config, and with two images the layers they share. Reads docker-archives (current "
        "or legacy spec), OCI layouts and OCI archives.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="one or two images")
    p.add_argument(
        "-t",
        "--tag",
        action="append",
        default=[],
        help="pick the image with this tag in an archive that holds several "
        "(give once per IMAGE, in order)",
    )
    p.add_argument("--os", default="linux", help="platform of a multi-platform image")
    p.add_argument("--arch", help="default: this machine's (amd64, arm64, ...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


class _Counting:
    """A reader that counts and hashes the bytes it hands on."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.size = 0
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.size += len(data)
        self.sha256.update(data)
        return data


def layer_contents(layer: Layer, what: str) -> dict[str, Any]:
    """Size and contents of a layer: store paths (second level under /nix/store), and
    top directories of everything else. Its bytes are checked against its diff_id."""
    store: dict[str, None] = {}
    tops: dict[str, None] = {}
    with layer.open() as raw:
        f = _Counting(raw)
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:  # type: ignore[call-overload]
                for m in tar:
                    parts = [p for p in m.name.split("/") if p not in ("", ".")]
                    if parts[:2] == ["nix", "store"] and len(parts) > 2:
                        store.setdefault("/nix/store/" + parts[2])
                    elif parts and parts not in (["nix"], ["nix", "store"]):
                        tops.setdefault("/" + parts[0])
        except tarfile.TarError as e:
            raise FastlayerError(f"{what}: layer {layer.diff_id} is no tar: {e}") from None
        while f.read(1 << 20):  # the rest (padding): the digest covers every byte
            pass
    if "sha256:" + f.sha256.hexdigest() != layer.diff_id:
        raise FastlayerError(
            f"{what}: layer {layer.comment or layer.diff_id} hashes to "
            f"sha256:{f.sha256.hexdigest()}, not its diff_id {layer.diff_id}"
        )
    return {
        "diff_id": layer.diff_id,
        "size": f.size,
        "store_paths": list(store),
        "top_dirs": sorted(tops),
    }


def describe(
    path: str, tag: str | None, os_name: str = "linux", arch: str | None = None
) -> dict[str, Any]:
    image: Image = open_image(path, tag, os_name, arch)
    return {
        "image": path,
        "repo_tags": image.repo_tags,
        "config": image.config,
        "layers": [layer_contents(x, path) for x in image.layers],
    }


def shared_layers(a: dict, b: dict) -> list[dict[str, Any]]:
    """diff_ids in both images, in A's order, with their 1-based positions in each."""
    where_b = {x["diff_id"]: i for i, x in reversed(list(enumerate(b["layers"], 1)))}
    return [
        {"diff_id": x["diff_id"], "size": x["size"], "in_a": i, "in_b": where_b[x["diff_id"]]}
        for i, x in enumerate(a["layers"], 1)
        if x["diff_id"] in where_b
    ]


def run(args: argparse.Namespace) -> int:
    if len(args.images) > 2:
        raise FastlayerError("inspect takes one or two images")
    if len(args.tag) > len(args.images):
        raise FastlayerError("more --tag options than images")
    tags = args.tag + [None] * (len(args.images) - len(args.tag))
    described = [describe(p, t, args.os, args.arch) for p, t in zip(args.images, tags, strict=True)]
    result: dict[str, Any] = {"images": described}
    if len(described) == 2:
        result["shared"] = shared_layers(*described)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_text(result)
    return 0


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def print_text(result: dict[str, Any]) -> None:
    for img in result["images"]:
        cfg = img["config"]
        total = sum(x["size"] for x in img["layers"])
        print(f"image {img['image']}: {', '.join(img['repo_tags']) or '(untagged)'}")
        print(
            f"  {cfg.get('os', '?')}/{cfg.get('architecture', '?')}, created {cfg.get('created')}"
            f", {plural(len(img['layers']), 'layer')}, {human(total)}"
        )
        print("  config: " + json.dumps(cfg.get("config") or {}, sort_keys=True))
        for i, x in enumerate(img["layers"], 1):
            print(f"  layer {i}: {x['diff_id']}  {human(x['size'])}")
            for p in x["store_paths"]:
                print(f"    {p}")
            if x["top_dirs"]:
                print("    top directories: " + " ".join(x["top_dirs"]))
    if "shared" in result:
        shared = result["shared"]
        size = sum(x["size"] for x in shared)
        print(f"shared: {plural(len(shared), 'layer')}, {human(size)}")
        for x in shared:
            print(f"  {x['diff_id']}  A layer {x['in_a']}, B layer {x['in_b']}")
