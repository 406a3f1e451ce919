"""Record nixpkgs' scripts' outputs as test data (this directory's *.json.gz).

The compatibility tests compare fastlayer with nixpkgs' scripts. The scripts are
not part of this repository, so their outputs for the tests' inputs are recorded
here once, and the tests compare against these files on any machine (and, when
FASTLAYER_REF_DIR holds the scripts, against a live run as well; see
tests/nixpkgs_ref.py). Each file holds the inputs and the script's output:

    auto.json.gz        auto-layer.py GRAPH /dev/null LIMIT on 15 random graphs
                        (tests/test_plan_auto.py's generator, seeds 0-14)
    popularity.json.gz  closure-graph.py GRAPH graph on 12 random graphs (seeds
                        100-111) and a 140-level diamond chain (test_plan_popularity.py)
    pipeline.json.gz    flatten_references_graph(graph, pipeline, exclude_paths) on
                        the first 30 random cases (test_plan_pipeline.py's generator,
                        seeds from 0) the script does not crash on; the seeds it
                        crashes on are listed under "failed"
    stream.json.gz      stream_layered_image.py on the confs of
                        nixpkgs_ref.stream_cases() over nixpkgs_ref.fixed_store: the
                        archive's sha256 and size and each member's name/size/sha256
    validators.json.gz  stream_layered_image.py on test_stream_nix_validators.py's
                        fake store, per owner: the sha256 of the store layers that do
                        not hold the host's busybox

To regenerate (all files, or the ones named), with the scripts in DIR laid out
as tests/nixpkgs_ref.py describes, `pip install igraph toolz`, and as root with
unshare and a /nix directory (stream_layered_image.py reads /nix/store paths
from a private mount namespace; busybox-static is needed for validators):

    FASTLAYER_REF_DIR=DIR python tests/data/nixpkgs/record.py [auto popularity ...]

then run the tests. Only these outputs are kept; never copy the scripts here.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TESTS))

import nixpkgs_ref as ref  # noqa: E402


def need(name: str) -> Path:
    path = ref.script(name)
    if path is None:
        sys.exit(f"record.py: {name} not found in {ref.REF_DIR} (set FASTLAYER_REF_DIR)")
    return path


def record_auto(tmp: Path) -> dict:
    from test_plan_auto import random_nodes

    need("auto-layer.py")
    cases = []
    for seed in range(15):
        r = random.Random(seed)
        nodes = random_nodes(seed, r.randint(1, 50), r.choice([0.03, 0.1, 0.3]))
        limit = r.choice([1, 2, 4, 10, 100])
        layers = ref.run_auto_layer(nodes, limit, tmp)
        cases.append({"seed": seed, "nodes": nodes, "limit": limit, "layers": layers})
    return {"script": "pkgs/build-support/docker/auto-layer.py", "cases": cases}


def record_popularity(tmp: Path) -> dict:
    from test_plan_popularity import diamond_chain, random_nodes

    need("closure-graph.py")
    inputs = []
    for seed in range(12):
        r = random.Random(100 + seed)
        nodes = random_nodes(100 + seed, r.randint(1, 40), r.choice([0.05, 0.2, 0.5]))
        inputs.append((f"seed{100 + seed}", nodes))
    inputs.append(("diamonds140", diamond_chain(140)))
    cases = [
        {"name": name, "nodes": nodes, "ranked": ref.run_closure_graph(nodes, tmp)}
        for name, nodes in inputs
    ]
    return {
        "script": "pkgs/build-support/references-by-popularity/closure-graph.py",
        "cases": cases,
    }


def record_pipeline(tmp: Path) -> dict:
    from test_plan_pipeline import random_case

    need("flatten_references_graph")
    if ref.flatten_references_graph() is None:
        sys.exit("record.py: flatten_references_graph needs igraph and toolz")
    cases, failed, seed = [], [], 0
    while len(cases) < 30:
        graph, steps, exclude = random_case(seed)
        out = ref.run_pipeline(graph, steps, exclude)
        if "error" in out:
            failed.append({"seed": seed, "error": out["error"]})
        else:
            cases.append({"seed": seed, "graph": graph, "steps": steps, "exclude": exclude, **out})
        seed += 1
    return {
        "script": "pkgs/build-support/flatten-references-graph (flatten_references_graph)",
        "cases": cases,
        "failed": failed,
    }


def record_stream(tmp: Path) -> dict:
    exe = need("stream_layered_image.py")
    root = tmp / "stream-root"
    ref.fixed_store(root)
    outputs, cases = {}, []
    for case in ref.stream_cases():
        if "base" in case:
            base = root / ref.BASE.lstrip("/")
            base.write_bytes(outputs[case["base"]])
        conf = tmp / f"{case['name']}.json"
        conf.write_text(json.dumps(case["conf"]))
        data = ref.stream_in_namespace(exe, conf, root, case["tag"])
        outputs[case["name"]] = data
        cases.append({**case, **ref.archive_summary(data)})
    return {"script": "pkgs/build-support/docker/stream_layered_image.py", "cases": cases}


def record_validators(tmp: Path) -> dict:
    import test_stream_nix_validators as v
    from validators import read_docker_archive

    exe = need("stream_layered_image.py")
    store = v.make_store(tmp / "validators-store")
    owners = {}
    for owner in sorted(v.OWNERS):
        work = tmp / f"validators-{owner}"
        work.mkdir()
        conf, layers, _, _ = v.image_conf(store, work, owner)
        out = work / "image.tar"
        out.write_bytes(ref.stream_in_namespace(exe, conf, store.root))
        digests = read_docker_archive(out).layer_digests
        owners[owner] = {
            "layers": layers,
            "checked": list(v.HOST_INDEPENDENT_LAYERS),
            "layer_digests": [digests[i] for i in v.HOST_INDEPENDENT_LAYERS],
        }
    return {"script": "pkgs/build-support/docker/stream_layered_image.py", "owners": owners}


RECORDERS = {
    "auto": record_auto,
    "popularity": record_popularity,
    "pipeline": record_pipeline,
    "stream": record_stream,
    "validators": record_validators,
}


def main(argv: list[str]) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":  # set order, hence ties: the same files
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, __file__, *argv], env)
    names = argv or list(RECORDERS)
    unknown = [n for n in names if n not in RECORDERS]
    if unknown:
        sys.exit(f"record.py: unknown {unknown}; known: {', '.join(RECORDERS)}")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            path = ref.write_recorded(name, RECORDERS[name](Path(tmp)))
        print(f"{path.relative_to(TESTS.parent)}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
