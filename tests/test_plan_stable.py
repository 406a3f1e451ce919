"""stable: still-valid layers of the previous plan survive byte for byte, and a
version bump re-uploads fewer bytes than popularity or auto would."""

from __future__ import annotations

import json
import random

from test_plan_popularity import expected_order

from fastlayer.cli import main
from fastlayer.graph import graph_from_json
from fastlayer.plan import make_plan
from fastlayer.plan.planfile import Plan

S = "/nix/store/"


def store(seed=3, n=400):
    """A layered random DAG: node i references a few nodes below it, often the
    low (popular) ones. Returns exportReferencesGraph-style nodes, top last."""
    r = random.Random(seed)
    nodes = []
    for i in range(n):
        refs = {int(i * r.random() ** 2) for _ in range(min(i, r.randint(1, 5)))}
        nodes.append({"i": i, "refs": sorted(refs), "size": int(r.lognormvariate(10, 2))})
    return nodes


def as_json(nodes, gen: dict[int, int]) -> list[dict]:
    """exportReferencesGraph nodes where node i has build generation gen.get(i, 0)."""

    def name(i):
        return f"{S}{gen.get(i, 0)}h{i:04d}-pkg{i}"

    return [
        {"path": name(x["i"]), "references": [name(j) for j in x["refs"]], "narSize": x["size"]}
        for x in nodes
    ]


def build(nodes, gen: dict[int, int]):
    """The graph where node i has build generation gen.get(i, 0) (its hash)."""
    return graph_from_json(as_json(nodes, gen))


def bumped(nodes, changed: int) -> dict[int, int]:
    """`changed` and everything above it get a new hash, as Nix does."""
    users: dict[int, set[int]] = {x["i"]: set() for x in nodes}
    for x in nodes:
        for j in x["refs"]:
            users[j].add(x["i"])
    todo, seen = [changed], {changed}
    while todo:
        for u in users[todo.pop()]:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return {i: 1 for i in seen}


def reupload(previous: Plan, plan: Plan) -> int:
    old = {tuple(x.paths) for x in previous.layers}
    return sum(x.size for x in plan.layers if tuple(x.paths) not in old)


def check_complete(graph, plan, budget):
    paths = [p for x in plan.layers for p in x.paths]
    assert sorted(paths) == sorted(graph.names)
    assert len(plan.layers) <= budget


def test_unchanged_graph_reuses_every_layer():
    g = build(store(), {})
    first = make_plan(g, "stable", 40)
    again = make_plan(g, "stable", 40, previous=first)
    assert [x.paths for x in again.layers] == [x.paths for x in first.layers]
    assert reupload(first, again) == 0


def test_first_build_gives_popular_paths_their_own_layers():
    g = build(store(), {})
    plan = make_plan(g, "stable", 40)
    top = expected_order(as_json(store(), {}))[0]  # the most popular path, by the formula
    assert [top] in [x.paths for x in plan.layers]
    check_complete(g, plan, 40)


def test_top_level_bump_only_touches_its_layer():
    nodes = store()
    g0 = build(nodes, {})
    top = len(nodes) - 1
    g1 = build(nodes, bumped(nodes, top))
    assert sum(a != b for a, b in zip(g0.names, g1.names, strict=True)) == 1
    p0 = make_plan(g0, "stable", 40)
    p1 = make_plan(g1, "stable", 40, previous=p0)
    check_complete(g1, p1, 40)
    kept = [x.paths for x in p0.layers if g0.names[top] not in x.paths]
    assert all(paths in [x.paths for x in p1.layers] for paths in kept)
    broken = next(x for x in p0.layers if g0.names[top] in x.paths)
    assert reupload(p0, p1) <= broken.size + int(g1.nar_size[top])


def test_bumps_reupload_less_than_popularity_and_auto():
    nodes = store()
    g0 = build(nodes, {})
    budget = 40
    plans0 = {s: make_plan(g0, s, budget) for s in ("popularity", "auto", "stable")}
    totals = dict.fromkeys(plans0, 0)
    for changed in (5, 30, 120, 250, 399):  # from popular low-level to top-level
        g1 = build(nodes, bumped(nodes, changed))
        for s, p0 in plans0.items():
            p1 = make_plan(g1, s, budget, previous=p0 if s == "stable" else None)
            check_complete(g1, p1, budget)
            totals[s] += reupload(p0, p1)
    assert totals["stable"] < totals["popularity"]
    assert totals["stable"] < totals["auto"]


def test_smaller_budget_gives_up_the_smallest_kept_layers():
    g = build(store(), {})
    first = make_plan(g, "stable", 40)
    plan = make_plan(g, "stable", 10, previous=first)
    check_complete(g, plan, 10)
    kept = [x for x in plan.layers if x.paths in [y.paths for y in first.layers]]
    dropped = [x for x in first.layers if x.paths not in [y.paths for y in plan.layers]]
    assert kept and dropped
    assert min(x.size for x in kept) >= max(x.size for x in dropped)


def test_previous_plan_of_another_graph_is_harmless(tmp_path):
    g = build(store(seed=4, n=60), {})
    other = build(store(seed=5, n=50), {9: 9})
    prev = make_plan(other, "stable", 8)
    plan = make_plan(g, "stable", 8, previous=prev)
    check_complete(g, plan, 8)
    f = tmp_path / "g.json"
    f.write_text(
        json.dumps(
            [
                {
                    "path": n,
                    "references": [g.names[j] for j in g.references(i)],
                    "narSize": int(g.nar_size[i]),
                }
                for i, n in enumerate(g.names)
            ]
        )
    )
    prev_file = tmp_path / "prev.json"
    prev_file.write_text(prev.dumps())
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                str(f),
                "--strategy",
                "stable",
                "--max-layers",
                "9",
                "--previous",
                str(prev_file),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    written = [x["paths"] for x in json.loads(out.read_text())["layers"]]
    assert sorted(p for paths in written for p in paths) == sorted(g.names)  # each path once
    assert len(written) <= 8  # --max-layers 9 leaves one for the customisation layer
    assert written == [x.paths for x in plan.layers]  # the command passes --previous on
