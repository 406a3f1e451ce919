"""Benchmarks for layer planning (issue #3). Run from the repository root:

    PYTHONPATH=src python bench/bench_plan.py [--reference /tmp/ref] [--big] [--only NAME]

Sections:
- speed: popularity and auto on 20,000 paths, against nixpkgs' closure-graph.py
  and auto-layer.py when `--reference DIR` holds them (same run, same input);
- big (`--big`): rank 1,000,000 paths / ~10,000,000 references, kernel and
  end to end (`fastlayer rank` on the JSON file, in a child process), with peak RSS;
- reupload: bytes to re-upload after synthetic version bumps, and bytes shared by
  two images with a common base closure, for popularity, auto and stable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphgen  # noqa: E402

from fastlayer.graph import ClosureGraph  # noqa: E402
from fastlayer.plan import make_plan, popularity  # noqa: E402
from fastlayer.plan.auto import auto_layers  # noqa: E402
from fastlayer.plan.planfile import Plan  # noqa: E402

STRATEGIES = ("popularity", "auto", "stable")


def closure_graph(g: graphgen.SynthGraph) -> ClosureGraph:
    return ClosureGraph(
        names=list(g.names),
        indptr=g.indptr,
        indices=g.indices,
        nar_size=g.nar_size,
        nar_hash=[None] * g.n,
    )


def timed(fn, *args, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out


def run_timed(cmd: list[str], timeout: float | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return time.perf_counter() - t, p.stdout


def image_graph(n_store: int, seed: int, apps: int = 1) -> graphgen.SynthGraph:
    store = graphgen.generate(n_store, seed=seed, core=300, cluster=1500)
    top = list(range(n_store - apps, n_store))
    return graphgen.image(store, top)


# --- speed -------------------------------------------------------------------


def bench_speed(ref: Path | None, n: int = 20_000) -> None:
    g = graphgen.generate(n, seed=11, mean_refs=10.7)
    cg = closure_graph(g)
    print(f"## speed: {n} paths, {len(g.indices)} references")
    t_rank, _ = timed(popularity.rank, cg, repeat=7)
    t_auto, _ = timed(auto_layers, cg, 99, repeat=7)
    print(f"fastlayer popularity (rank): {t_rank:.3f} s")
    print(f"fastlayer auto (limit 99):   {t_auto:.3f} s")
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "graph.json"
        g.write_json(str(f), key="graph")
        t_cli, out = run_timed([sys.executable, "-m", "fastlayer", "rank", str(f), "graph"])
        print(f"fastlayer rank (CLI, incl. start-up and JSON): {t_cli:.3f} s")
        if ref is None:
            print("(no --reference: skipping closure-graph.py / auto-layer.py)")
            return
        script = ref / "closure-graph.py"
        if script.exists():
            t_ref, ref_out = run_timed([sys.executable, str(script), str(f), "graph"])
            same = ref_out.split() == out.split()
            print(
                f"closure-graph.py: {t_ref:.1f} s -> {t_ref / t_rank:.0f}x (kernel), "
                f"{t_ref / t_cli:.0f}x (CLI); same output: {same}"
            )
        script = ref / "auto-layer.py"
        if script.exists():
            nodes = Path(d) / "nodes.json"
            nodes.write_text(json.dumps(json.loads(f.read_text())["graph"]))
            t_ref, ref_out = run_timed([sys.executable, str(script), str(nodes), "/dev/null", "99"])
            mine = auto_layers(cg, 99)
            same = sorted(map(tuple, json.loads(ref_out))) == sorted(map(tuple, mine))
            print(f"auto-layer.py: {t_ref:.1f} s -> {t_ref / t_auto:.0f}x; same layers: {same}")


# --- big ---------------------------------------------------------------------


def bench_big(n: int = 1_000_000) -> None:
    t, g = timed(graphgen.generate, n, 21, None, 2000, 10.7)
    print(f"## big: {n} paths, {len(g.indices)} references (generated in {t:.0f} s)")
    cg = closure_graph(g)
    t_rank, _ = timed(popularity.rank, cg)
    print(f"popularity.rank on CSR arrays: {t_rank:.1f} s (threads: {popularity.threads()})")
    print(f"peak RSS of this process so far: {peak_rss_mib():.0f} MiB")
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "graph.json"
        g.write_json(str(f))
        size = f.stat().st_size
        del g, cg
        cmd = [sys.executable, "-c", _CHILD, str(f)]
        t, out = run_timed(cmd)
        print(
            f"fastlayer rank on the {size / 2**20:.0f} MiB JSON, end to end: {t:.1f} s, "
            f"child {out.strip()}"
        )


# Runs `fastlayer rank` in a fresh process and reports its own peak RSS.
_CHILD = """
import resource, sys, time, io, contextlib
from fastlayer.cli import main
t = time.perf_counter()
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    main(["rank", sys.argv[1]])
lines = buf.getvalue().count(chr(10))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"ranked {lines} paths in {time.perf_counter() - t:.1f} s, peak RSS {rss:.0f} MiB")
"""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- reupload ----------------------------------------------------------------


def new_bytes(previous: Plan, plan: Plan) -> int:
    """Bytes of `plan`'s layers that `previous` does not have (same paths, same order)."""
    old = {tuple(x.paths) for x in previous.layers}
    return sum(x.size for x in plan.layers if tuple(x.paths) not in old)


def shared_bytes(a: Plan, b: Plan) -> int:
    old = {tuple(x.paths) for x in a.layers}
    return sum(x.size for x in b.layers if tuple(x.paths) in old)


def scenarios(g: graphgen.SynthGraph, count: int, seed: int):
    """(kind, changed ids): a leaf (a path nothing references: only it changes) and
    a mid-level library (it and everything above it change)."""
    rng = np.random.default_rng(seed)
    refs = np.diff(g.indptr)
    users = np.bincount(g.indices, minlength=g.n)
    leaves = np.flatnonzero(users == 0)
    mids = np.flatnonzero((refs > 0) & (users > 0))
    for _ in range(count):
        yield "leaf", [int(rng.choice(leaves))]
        yield "mid", [int(rng.choice(mids))]


def bench_reupload(budget: int = 99, count: int = 20) -> None:
    g0 = image_graph(20_000, seed=5, apps=8)
    print(
        f"## reupload: image of {g0.n} paths, {len(g0.indices)} references, "
        f"{g0.nar_size.sum() / 2**20:.0f} MiB, {budget} store layers, "
        f"{2 * count} bumps"
    )
    c0 = closure_graph(g0)
    p0 = {s: make_plan(c0, s, budget) for s in STRATEGIES}
    kinds = ("leaf", "mid")
    totals = {(s, kind): 0 for s in STRATEGIES for kind in kinds}
    changed_bytes = dict.fromkeys(kinds, 0)
    for gen, (kind, changed) in enumerate(scenarios(g0, count, seed=9), start=1):
        g1 = graphgen.bump(g0, changed, gen)
        c1 = closure_graph(g1)
        renamed = np.array([a != b for a, b in zip(g0.names, g1.names, strict=True)])
        changed_bytes[kind] += int(g1.nar_size[renamed].sum())
        for s in STRATEGIES:
            p1 = make_plan(c1, s, budget, previous=p0[s] if s == "stable" else None)
            totals[(s, kind)] += new_bytes(p0[s], p1)
    mib = 2**20
    print("| strategy | leaf bumps | mid-level bumps | total |")
    print("|---|---|---|---|")
    print(
        "| (the changed paths alone: the floor) | "
        + " | ".join(f"{changed_bytes[k] / mib:.0f} MiB" for k in kinds)
        + f" | {sum(changed_bytes.values()) / mib:.0f} MiB |"
    )
    for s in STRATEGIES:
        row = [totals[(s, k)] for k in kinds]
        print(
            f"| {s} | "
            + " | ".join(f"{x / mib:.0f} MiB" for x in row)
            + f" | {sum(row) / mib:.0f} MiB |"
        )

    # A chain of builds, each a bump of the one before (stable plans against it).
    g, plans, chain = g0, dict(p0), dict.fromkeys(STRATEGIES, 0)
    floor = 0
    for gen, (_, changed) in enumerate(scenarios(g0, count, seed=13), start=1000):
        g1 = graphgen.bump(g, changed, gen)
        c1 = closure_graph(g1)
        floor += int(g1.nar_size[[a != b for a, b in zip(g.names, g1.names, strict=True)]].sum())
        for s in STRATEGIES:
            p1 = make_plan(c1, s, budget, previous=plans[s] if s == "stable" else None)
            chain[s] += new_bytes(plans[s], p1)
            plans[s] = p1
        g = g1
    print(f"\n{2 * count} successive builds (each bumps the last; floor {floor / mib:.0f} MiB):")
    print("| strategy | bytes re-uploaded over the chain |")
    print("|---|---|")
    for s in STRATEGIES:
        print(f"| {s} | {chain[s] / mib:.0f} MiB |")

    # Two images sharing a base: two apps of the same store.
    store = graphgen.generate(20_000, seed=5, core=300, cluster=1500)
    a = closure_graph(graphgen.image(store, [store.n - 1]))
    b = closure_graph(graphgen.image(store, [store.n - 1 - 1500]))  # another cluster
    common = sum(int(a.nar_size[i]) for i, p in enumerate(a.names) if p in set(b.names))
    print(
        f"\nshared base: image A {a.n} paths, image B {b.n} paths, "
        f"{common / mib:.0f} MiB of paths in common"
    )
    print("| strategy | bytes of B's layers already in A's |")
    print("|---|---|")
    for s in STRATEGIES:
        pa, pb = make_plan(a, s, budget), make_plan(b, s, budget)
        print(f"| {s} | {shared_bytes(pa, pb) / mib:.0f} MiB |")
    pa = make_plan(a, "stable", budget)
    pb = make_plan(b, "stable", budget, previous=pa)
    print(
        f"| stable, B planned with A's plan as --previous | {shared_bytes(pa, pb) / mib:.0f} MiB |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, help="dir with closure-graph.py, auto-layer.py")
    ap.add_argument("--big", action="store_true", help="also the 1M paths / 10M refs run")
    ap.add_argument("--only", choices=("speed", "big", "reupload"))
    args = ap.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src"))
    if args.only in (None, "speed"):
        bench_speed(args.reference)
    if args.only == "big" or (args.only is None and args.big):
        bench_big()
    if args.only in (None, "reupload"):
        bench_reupload()


if __name__ == "__main__":
    main()
