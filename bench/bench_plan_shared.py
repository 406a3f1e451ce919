"""Benchmark of the `shared` strategy (issue 10, part 4). Run from the repository root:

    PYTHONPATH=src python bench/bench_plan_shared.py [--images 20] [--budget 100]

Sections:
- batch: the issue's batch (20 images sharing a 256 MiB base closure of 2,000
  paths, each with 30 MiB of its own in 50 paths), planned by `popularity`
  (each image alone, budget 100) and by `shared` (all together): distinct layer
  bytes (a layer is its exact path list) against the unique input bytes, bytes
  two images share at the layer level, layers per image, planning time;
- speed: `shared_plans` alone on bigger batches (images x paths per image),
  against planning each image alone with `popularity` in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphgen  # noqa: E402

from fastlayer.graph import ClosureGraph  # noqa: E402
from fastlayer.plan import make_plan, shared_plans  # noqa: E402
from fastlayer.plan.planfile import Plan  # noqa: E402

MIB = 1 << 20


def scaled(sizes: np.ndarray, total: int) -> np.ndarray:
    """sizes rescaled to add up to about `total` bytes (each at least 1)."""
    return np.maximum(1, (sizes * (total / sizes.sum())).astype(np.int64))


def batch(
    images: int, base_n: int, own_n: int, base_bytes: int, own_bytes: int, seed: int = 1
) -> list[ClosureGraph]:
    """`images` closures: one base closure (a store-shaped DAG) in every image, plus
    `own_n` paths of the image's own, each referencing a few base paths and earlier
    own paths. Every graph has its own name strings, as graphs read from files do."""
    base = graphgen.generate(base_n, seed=seed)
    base_sizes = scaled(base.nar_size, base_bytes)
    rng = np.random.default_rng(seed)
    graphs = []
    for i in range(images):
        own_names = [
            f"/nix/store/{graphgen.store_hash(seed, f'app{i}/{j}', 0)}-app{i}-part{j}"
            for j in range(own_n)
        ]
        # Own path j references ~3 base paths (popular ones more) and ~2 earlier own paths.
        k = rng.poisson(3, own_n)
        src = np.repeat(np.arange(own_n), k)
        dst = np.floor(base_n * rng.random(len(src)) ** 2).astype(np.int64)
        k2 = np.where(np.arange(own_n) > 0, rng.poisson(2, own_n), 0)
        src2 = np.repeat(np.arange(own_n), k2)
        dst2 = base_n + np.floor(src2 * rng.random(len(src2))).astype(np.int64)
        src_all = np.concatenate([np.repeat(np.arange(base_n), np.diff(base.indptr)),
                                  base_n + src, base_n + src2])  # fmt: skip
        dst_all = np.concatenate([base.indices.astype(np.int64), dst, dst2])
        n = base_n + own_n
        keys = np.unique(src_all * n + dst_all)
        indptr = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.bincount(keys // n, minlength=n), out=indptr[1:])
        own_sizes = scaled(np.exp(rng.normal(0, 1.5, own_n)), own_bytes)
        graph = ClosureGraph(
            names=[s.encode().decode() for s in base.names] + own_names,
            indptr=indptr,
            indices=(keys % n).astype(np.int32),
            nar_size=np.concatenate([base_sizes, own_sizes]),
            nar_hash=[None] * n,
        )
        graph.index()  # as load_graph leaves it: every name hashed once already
        graphs.append(graph)
    return graphs


def unique_bytes(graphs: list[ClosureGraph]) -> int:
    sizes: dict[str, int] = {}
    for g in graphs:
        sizes.update(zip(g.names, g.nar_size.tolist(), strict=True))
    return sum(sizes.values())


def distinct_layer_bytes(plans: list[Plan]) -> tuple[int, int]:
    """(bytes, count) of the distinct layers, a layer being its exact path list."""
    layers = {tuple(x.paths): x.size for p in plans for x in p.layers}
    return sum(layers.values()), len(layers)


def shared_between(a: Plan, b: Plan) -> int:
    mine = {tuple(x.paths) for x in a.layers}
    return sum(x.size for x in b.layers if tuple(x.paths) in mine)


def timed(fn, repeat: int = 3):  # type: ignore[no-untyped-def]
    """(best wall seconds, best CPU seconds of this process, result): the CPU time
    says more than the wall time on a machine shared with other jobs."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu, out


def section_batch(images: int, budget: int) -> None:
    graphs = batch(images, 2000, 50, 256 * MIB, 30 * MIB)
    unique = unique_bytes(graphs)
    per_image = graphs[0].total_size()
    print(f"## batch: {images} images, {per_image / MIB:.0f} MiB and {graphs[0].n} paths each, "
          f"unique input {unique / MIB:.0f} MiB, budget {budget}")  # fmt: skip
    print("| strategy | distinct layers | distinct layer bytes | / unique input | shared by "
          "images 0 and 1 | layers per image | largest layer | planning time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    runs = {
        "popularity (each alone)": lambda: [make_plan(g, "popularity", budget) for g in graphs],
        "shared (together)": lambda: shared_plans(graphs, [budget] * len(graphs)),
    }
    for name, fn in runs.items():
        t, c, plans = timed(fn)
        total, count = distinct_layer_bytes(plans)
        both = shared_between(plans[0], plans[1])
        counts = sorted({len(p.layers) for p in plans})
        largest = max(x.size for p in plans for x in p.layers)
        print(
            f"| {name} | {count} | {total / MIB:.0f} MiB | {total / unique:.3f}x | "
            f"{both / MIB:.1f} of {per_image / MIB:.0f} MiB | "
            f"{'-'.join(map(str, counts))} | {largest / MIB:.1f} MiB | "
            f"{t * 1000:.0f} ms ({c * 1000:.0f} ms CPU) |"
        )


def section_speed(budget: int) -> None:
    print("\n## speed: shared_plans against popularity per image (same graphs, same run)")
    print("| images | paths per image (own) | occurrences | unique paths | shared | "
          "popularity x images | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for images, base_n, own_n in ((20, 10_000, 500), (200, 10_000, 100), (20, 100_000, 1_000)):
        graphs = batch(images, base_n, own_n, 1 << 30, 100 * MIB)
        t_shared, c_shared, _ = timed(lambda g=graphs: shared_plans(g, [budget] * len(g)))
        t_pop, c_pop, _ = timed(lambda g=graphs: [make_plan(x, "popularity", budget) for x in g], 1)
        occ = sum(g.n for g in graphs)
        print(
            f"| {images} | {base_n + own_n} ({own_n}) | {occ} | {base_n + images * own_n} | "
            f"{t_shared * 1000:.0f} ms ({c_shared * 1000:.0f} ms CPU) | "
            f"{t_pop * 1000:.0f} ms ({c_pop * 1000:.0f} ms CPU) | {t_shared / t_pop:.2f}x |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--no-speed", action="store_true", help="skip the bigger batches")
    args = ap.parse_args()
    section_batch(args.images, args.budget)
    if not args.no_speed:
        section_speed(args.budget)


if __name__ == "__main__":
    main()
