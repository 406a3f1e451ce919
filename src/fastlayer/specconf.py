"""A spec as nixpkgs' stream_layered_image conf: what the Nix functions build.

`write_conf_dir` plans the store layers and stages the customisation layer
exactly as `fastlayer build` would, then writes, into a new directory:
`conf.json` (the conf `fastlayer stream-nix` and nixpkgs' script take),
`customisation/layer.tar` + `checksum`, `spec.json` (the spec, its graph
copied beside it as `closure.json`) and, if asked, a script streaming the
image. Streaming that conf later reads each file once, with no staging.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastlayer import untrusted
from fastlayer.emit import Owner, pump
from fastlayer.errors import FastlayerError
from fastlayer.sources.customisation import customisation_layer, stage
from fastlayer.spec import Spec, parse_time

# A store path's base name: 32 nix-base32 characters, a dash, a name.
_STORE_NAME = re.compile(r"([0-9a-df-np-sv-z]{32})-.+")
# Nix's .attrs.json holds the whole closure graph (real ones pass 80 MB); the
# graph loader itself takes any size.
MAX_ATTRS = 1 << 31


def unsupported(spec: Spec) -> list[str]:
    """Spec settings nixpkgs' conf has no room for."""
    bad = []
    if spec.layers:
        bad.append("layers")
    if spec.contents.root_layers != "customisation":
        bad.append("contents.root_layers")
    if spec.os != "linux":
        bad.append("os")
    for key in ("variant", "store_root", "from_image_tag"):
        if getattr(spec, key):
            bad.append(key)
    return bad


def conf_tag(spec: Spec, out_dir: str) -> str:
    """The spec's tag, else the hash part of the output's store name (as nixpkgs
    tags an untagged image: Nix knows it before the build, so does the user)."""
    if spec.tag:
        return spec.tag
    m = _STORE_NAME.fullmatch(os.path.basename(os.path.abspath(out_dir)))
    if not m:
        raise FastlayerError(
            f"nix-conf: the spec has no tag and {out_dir} is not named HASH-NAME "
            "as a store path is; give a tag"
        )
    return m[1]


def write_conf_dir(
    spec: Spec, out_dir: str, *, script: str | None = None, fastlayer: str | None = None
) -> dict[str, Any]:
    """Write conf.json, customisation/, spec.json, closure.json into out_dir
    (made here, removed whole if anything fails); return the conf."""
    from fastlayer.builder import closure_graph, plan_store_layers
    from fastlayer.sources.base_image import open_image

    bad = unsupported(spec)
    if bad:
        raise FastlayerError(f"nix-conf: nixpkgs' conf cannot express {', '.join(bad)}")
    if os.path.lexists(out_dir):
        raise FastlayerError(f"nix-conf: {out_dir} exists; give a new directory")
    if script is not None and not fastlayer:
        raise FastlayerError("nix-conf: --script needs --fastlayer (the executable it runs)")
    final = os.path.abspath(out_dir)
    tag = conf_tag(spec, final)
    mtime = int(parse_time(spec.mtime, "mtime").timestamp())
    owner = Owner(mtime=mtime, uid=spec.uid, gid=spec.gid, uname=spec.uname, gname=spec.gname)
    base = open_image(spec.from_image, tag=spec.from_image_tag) if spec.from_image else None
    graph = closure_graph(spec) if (spec.nix_db or spec.include_store_paths) else None
    plan = plan_store_layers(spec, len(base.layers) if base else 0, graph)
    # made in place, removed whole on failure: in a Nix build the output's own
    # path is the one place the builder may write to
    work = Path(final)
    work.mkdir(mode=0o755)
    try:
        with tempfile.TemporaryDirectory(prefix="fastlayer-stage-") as staging_dir:
            _customisation(spec, graph, base, Path(staging_dir), work, owner)
        conf = {
            "architecture": spec.architecture,
            "config": spec.config,
            "os": "linux",
            "store_dir": spec.store_dir,
            "from_image": spec.from_image,
            "store_layers": [layer.paths for layer in plan.layers] if plan else [],
            "customisation_layer": f"{final}/customisation",
            "repo_tag": f"{spec.name}:{tag}",
            "created": _conf_time(spec.created),
            "mtime": _conf_time(spec.mtime),
            "uid": str(spec.uid),
            "gid": str(spec.gid),
            "uname": spec.uname,
            "gname": spec.gname,
        }
        (work / "conf.json").write_text(json.dumps(conf, indent=2) + "\n")
        _write_spec(spec, tag, work, final)
        if script is not None:
            _write_script(work / "stream", fastlayer or "", f"{final}/conf.json")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if script is not None:  # the script may be another Nix output: a copy, not a link
        shutil.copy2(os.path.join(final, "stream"), script)
    return conf


def _customisation(
    spec: Spec, graph: Any, base: Any, staging: Path, work: Path, owner: Owner
) -> None:
    """customisation/layer.tar and its checksum, staged as `fastlayer build` stages it."""
    from fastlayer.builder import stage_nix_db

    stage(spec, staging)
    if spec.nix_db:
        stage_nix_db(spec, graph, base, staging, owner.mtime)
    custom = work / "customisation"
    custom.mkdir()
    with open(custom / "layer.tar", "wb") as f:
        checksum = pump(customisation_layer(spec, staging, owner), f.write)
    (custom / "checksum").write_text(checksum + "\n")


def _conf_time(value: str) -> str:
    """As the conf takes it: "now" or ISO 8601 (a spec's epoch seconds converted)."""
    return value if value == "now" else parse_time(value, "time").isoformat()


def _write_spec(spec: Spec, tag: str, work: Path, final: str) -> None:
    """spec.json: the spec with its tag fixed and its graph copied as closure.json,
    so `fastlayer build DIR/spec.json` gives the same contents later (and the
    directory's references keep the whole closure alive)."""
    data = asdict(spec)
    data["tag"] = tag
    graph = spec.contents.graph
    if graph:
        nodes = None if os.path.isdir(graph) else untrusted.load_json_file(graph, "g", MAX_ATTRS)
        if isinstance(nodes, dict):  # an attrs file: keep only its list of paths
            lists = [v for v in nodes.values() if isinstance(v, list) and v and "path" in v[0]]
            nodes = lists[0] if len(lists) == 1 else nodes
        if nodes is None:
            shutil.copytree(graph, work / "closure")
            data["contents"]["graph"] = f"{final}/closure"
        else:
            (work / "closure.json").write_text(json.dumps(nodes) + "\n")
            data["contents"]["graph"] = f"{final}/closure.json"
    for key in ("variant", "store_root", "fake_nss", "previous_plan", "pipeline"):
        if data[key] is None:
            del data[key]
    for rule in data["permissions"]:
        if rule["mode"] is not None:
            rule["mode"] = f"{rule['mode']:04o}"
    (work / "spec.json").write_text(json.dumps(data, indent=2) + "\n")


def _write_script(path: Path, fastlayer: str, conf: str) -> None:
    path.write_text(
        f'#!/bin/sh\nexec {shlex.quote(fastlayer)} stream-nix {shlex.quote(conf)} "$@"\n'
    )
    path.chmod(0o555)
