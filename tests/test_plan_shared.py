"""`shared`: several images planned together share identical layers (issue 10, part 4).

The expected layers below are worked out by hand from the rules in
fastlayer.plan.shared's docstring, not computed by the code under test.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlayer.cli import main
from fastlayer.errors import FastlayerError
from fastlayer.graph import ClosureGraph
from fastlayer.plan import make_plan, shared_plans
from fastlayer.plan.planfile import Plan, read_plan

S = "/nix/store/"

# name: (references, narSize). Who uses what (images 0, 1, 2):
#   glibc, zlib: 0 1 2    bash: 0 1    py: 1 2
#   lib0, app0: 0 only    app1: 1 only    app2: 2 only
NODES = {
    "glibc": ([], 10),
    "zlib": (["glibc"], 4),
    "bash": (["glibc"], 5),
    "py": (["zlib", "glibc"], 8),
    "lib0": (["zlib"], 2),
    "app0": (["bash", "lib0"], 7),
    "app1": (["bash", "py"], 3),
    "app2": (["py"], 1),
}
IMAGES = (
    ["glibc", "zlib", "bash", "lib0", "app0"],
    ["glibc", "zlib", "bash", "py", "app1"],
    ["glibc", "zlib", "py", "app2"],
)


def graph(names, nodes=NODES, store=S, shuffle: int | None = None) -> ClosureGraph:
    order = list(names)
    if shuffle is not None:
        random.Random(shuffle).shuffle(order)
    return ClosureGraph.from_nodes(
        [(store + p, [store + r for r in nodes[p][0]], nodes[p][1], None, None, None)
         for p in order],
        store_dir=store.rstrip("/"),
    )  # fmt: skip


def short(plan: Plan) -> list[list[str]]:
    return [[p.rsplit("/", 1)[1] for p in layer.paths] for layer in plan.layers]


def plans(budgets, images=IMAGES, **kw) -> list[list[list[str]]]:
    return [short(p) for p in shared_plans([graph(i) for i in images], budgets, **kw)]


def test_groups_by_image_set_widest_first_own_paths_alone():
    # Budgets equal to the group counts (3, 4, 3): no merge, no split.
    # Within a group: popularity (glibc above zlib, lib0 above app0, which uses it).
    # img1's width-2 groups: py (8 bytes) before bash (5 bytes).
    assert plans([3, 4, 3]) == [
        [["glibc", "zlib"], ["bash"], ["lib0", "app0"]],
        [["glibc", "zlib"], ["py"], ["bash"], ["app1"]],
        [["glibc", "zlib"], ["py"], ["app2"]],
    ]


def test_equal_width_and_bytes_ordered_by_image_bitmask():
    nodes = {**NODES, "bash": (["glibc"], 8)}  # bash {0,1} now weighs what py {1,2} does
    got = [short(p) for p in shared_plans([graph(i, nodes) for i in IMAGES], [3, 4, 3])]
    assert got[1] == [["glibc", "zlib"], ["bash"], ["py"], ["app1"]]  # mask 3 before 6


def test_tight_budget_two_merges_all_shared_groups_keeps_own_layer():
    assert plans([2, 2, 2]) == [
        [["glibc", "zlib", "bash"], ["lib0", "app0"]],
        [["glibc", "zlib", "py", "bash"], ["app1"]],
        [["glibc", "zlib", "py"], ["app2"]],
    ]


def test_budget_one_is_one_layer():
    assert plans([1, 1, 1]) == [
        [["glibc", "zlib", "bash", "lib0", "app0"]],
        [["glibc", "zlib", "py", "bash", "app1"]],
        [["glibc", "zlib", "py", "app2"]],
    ]


def test_image_over_budget_merges_its_least_shared_groups_for_itself_only():
    # img1 has 4 groups for 3 layers: py and bash (width 2) merge, in img1 only;
    # img2 keeps py as its own layer, img0 keeps bash.
    assert plans([3, 3, 3]) == [
        [["glibc", "zlib"], ["bash"], ["lib0", "app0"]],
        [["glibc", "zlib"], ["py", "bash"], ["app1"]],
        [["glibc", "zlib"], ["py"], ["app2"]],
    ]


def test_split_waits_for_every_image_holding_the_group():
    # Slack 1, 0, 0: glibc+zlib stays whole (img1 and img2 have no layer to
    # spare); img0 splits its own group.
    assert plans([4, 4, 3]) == [
        [["glibc", "zlib"], ["bash"], ["lib0"], ["app0"]],
        [["glibc", "zlib"], ["py"], ["bash"], ["app1"]],
        [["glibc", "zlib"], ["py"], ["app2"]],
    ]


def test_split_goes_to_the_biggest_gain_first_and_is_the_same_everywhere():
    # Slack 2, 1, 1. Halving glibc|zlib gains 2*10*4 = 80, lib0|app0 2*2*7 = 28:
    # glibc and zlib split apart in all three images, then img0's own group.
    assert plans([5, 5, 4]) == [
        [["glibc"], ["zlib"], ["bash"], ["lib0"], ["app0"]],
        [["glibc"], ["zlib"], ["py"], ["bash"], ["app1"]],
        [["glibc"], ["zlib"], ["py"], ["app2"]],
    ]
    # More budget than paths: one path per layer, no empty layer.
    assert plans([50, 50, 50])[2] == [["glibc"], ["zlib"], ["py"], ["app2"]]


CHAIN = {"a": ([], 1), "b": (["a"], 1), "c": (["b"], 1), "d": (["c"], 9)}


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (1, [["a", "b", "c", "d"]]),
        # Byte midpoints 0.5 1.5 2.5 7.5 of 12: the halving falls before d.
        (2, [["a", "b", "c"], ["d"]]),
        # Then a|b,c (gain 2*1*2) beats b|c.
        (3, [["a"], ["b", "c"], ["d"]]),
        (4, [["a"], ["b"], ["c"], ["d"]]),
    ],
)
def test_one_image_halves_by_bytes_in_popularity_order(budget, expected):
    g = graph("dcba", CHAIN)  # popularity order: a (used by all), b, c, d
    assert short(shared_plans([g], [budget])[0]) == expected
    assert short(make_plan(g, "shared", budget)) == expected
    assert make_plan(g, "shared", budget).strategy == "shared"


def test_unknown_sizes_still_spread_popular_first():
    zero = {k: (refs, 0) for k, (refs, _) in CHAIN.items()}
    assert short(shared_plans([graph("abcd", zero)], [3])[0]) == [["a"], ["b"], ["c", "d"]]


def test_exclude_takes_a_path_out_of_one_image():
    # Without bash in img0, bash is img1's alone: it joins app1's own group
    # (popularity: app1 uses bash, so bash comes first). img0, down to two
    # groups, spends its spare layer on its own group.
    got = plans([3, 3, 3], exclude=[{S + "bash"}, set(), set()])
    assert got == [
        [["glibc", "zlib"], ["lib0"], ["app0"]],
        [["glibc", "zlib"], ["py"], ["bash", "app1"]],
        [["glibc", "zlib"], ["py"], ["app2"]],
    ]


def test_sizes_budget_and_strategy_in_the_plans():
    p = shared_plans([graph(i) for i in IMAGES], [3, 4, 3])
    assert [x.size for x in p[1].layers] == [14, 8, 5, 3]
    assert [x.budget for x in p] == [3, 4, 3]
    assert {x.strategy for x in p} == {"shared"}
    assert {x.store_dir for x in p} == {"/nix/store"}


def test_same_plans_whatever_the_order_of_paths():
    want = plans([5, 5, 4])
    for seed in range(5):
        graphs = [graph(i, shuffle=seed * 3 + k) for k, i in enumerate(IMAGES)]
        assert [short(p) for p in shared_plans(graphs, [5, 5, 4])] == want


def test_store_dir_mismatch_is_an_error():
    other = graph(["glibc", "zlib"], store="/gnu/store/")
    with pytest.raises(FastlayerError, match="disagree on the store dir: /nix/store"):
        shared_plans([graph(IMAGES[0]), other], [5, 5])


def test_first_graph_holding_a_path_gives_its_references_and_size():
    one = graph(["x", "y"], {"x": (["y"], 1), "y": ([], 1)})  # y used by x: y first
    two = graph(["x", "y"], {"x": ([], 5), "y": (["x"], 1)})  # x used by y: x first
    p = shared_plans([one, two], [1, 1])
    assert [short(x) for x in p] == [[["y", "x"]]] * 2
    assert [x.layers[0].size for x in p] == [2, 2]
    assert [short(x) for x in shared_plans([two, one], [1, 1])] == [[["x", "y"]]] * 2


def test_argument_errors():
    g = graph(IMAGES[0])
    with pytest.raises(FastlayerError, match="2 graphs but 1 layer budgets"):
        shared_plans([g, g], [3])
    with pytest.raises(FastlayerError, match="budget of image 1 must be at least 1, got 0"):
        shared_plans([g, g], [3, 0])
    with pytest.raises(FastlayerError, match="budget of image 0 must be at least 1, got True"):
        shared_plans([g], [True])
    assert short(shared_plans([g], [np.int64(1)])[0]) == [["glibc", "zlib", "bash", "lib0", "app0"]]
    with pytest.raises(FastlayerError, match="2 graphs but 1 exclude lists"):
        shared_plans([g, g], [3, 3], [()])
    assert shared_plans([], []) == []
    assert shared_plans([graph([])], [3])[0].layers == []


def test_cli_plans_several_graphs_into_a_directory(tmp_path, capsys):
    files = []
    for k, names in enumerate(IMAGES):
        f = tmp_path / f"img{k}.json"
        nodes = [{"path": S + p, "references": [S + r for r in NODES[p][0]],
                  "narSize": NODES[p][1]} for p in names]  # fmt: skip
        f.write_text(json.dumps(nodes))
        files.append(str(f))
    out = tmp_path / "plans"
    argv = ["plan", *files, "--strategy", "shared", "--max-layers", "4", "-o", str(out)]
    assert main(argv) == 0
    assert sorted(x.name for x in out.iterdir()) == [f"img{k}.plan.json" for k in range(3)]
    # --max-layers 4: 3 store layers each (one for the customisation layer).
    assert short(read_plan(out / "img1.plan.json")) == [
        ["glibc", "zlib"], ["py", "bash"], ["app1"]
    ]  # fmt: skip
    # One graph: a plan on stdout, as with every strategy. img1 alone, budget 4:
    # popularity glibc 7, zlib 3, bash 2, py 2 (tie: by name), app1 1; bytes
    # 10 4 5 8 3. Halvings: glibc zlib | bash py app1 (gain 448), then bash |
    # py app1 (110 beats glibc | zlib, 80), then glibc | zlib (80 beats py | app1, 48).
    assert main(["plan", files[1], "--strategy", "shared", "--max-layers", "5"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert [[p.rsplit("/", 1)[1] for p in x["paths"]] for x in one["layers"]] == [
        ["glibc"], ["zlib"], ["bash"], ["py", "app1"]
    ]  # fmt: skip
    assert main(["plan", *files, "--strategy", "shared"]) == 1
    assert "several graphs need -o DIR" in capsys.readouterr().err
    assert main(["plan", *files, "-o", str(tmp_path / "x")]) == 1
    assert "several graphs need --strategy shared" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    twin = tmp_path / "sub"
    twin.mkdir()
    (twin / "img0.json").write_text((tmp_path / "img0.json").read_text())
    argv = ["plan", files[0], str(twin / "img0.json"), "--strategy", "shared", "-o", str(out)]
    assert main(argv) == 1
    assert "would both write" in capsys.readouterr().err


# --- Properties over random small batches ------------------------------------


@st.composite
def batches(draw: st.DrawFn):
    """A random DAG of up to 12 paths (path i refers to lower ids only), 1-5
    images each holding the closure of random roots, budgets 1-7."""
    n = draw(st.integers(1, 12))
    refs = [sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else [] for i in range(n)]
    sizes = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    images = []
    for _ in range(draw(st.integers(1, 5))):
        seen: set[int] = set()
        stack = list(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=3)))
        while stack:
            v = stack.pop()
            if v not in seen:
                seen.add(v)
                stack += refs[v]
        images.append(sorted(seen))
    budgets = [draw(st.integers(1, 7)) for _ in images]
    seed = draw(st.integers(0, 1000))
    return refs, sizes, images, budgets, seed


def _graph_of(refs, sizes, rows, seed=None):
    rows = list(rows)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    name = f"{S}{{:02d}}-p".format
    return ClosureGraph.from_nodes(
        [(name(i), [name(r) for r in refs[i]], sizes[i], None, None, None) for i in rows]
    )


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(batches())
def test_invariants_of_random_batches(batch):
    refs, sizes, images, budgets, seed = batch
    graphs = [_graph_of(refs, sizes, rows) for rows in images]
    result = shared_plans(graphs, budgets)
    users: dict[str, frozenset[int]] = {}
    for k, g in enumerate(graphs):
        for p in g.names:
            users[p] = users.get(p, frozenset()) | {k}
    size_of = {f"{S}{i:02d}-p": sizes[i] for i in range(len(sizes))}
    pure: dict[frozenset[int], dict[str, tuple[str, ...]]] = {}
    for g, plan, budget in zip(graphs, result, budgets, strict=True):
        paths = [p for layer in plan.layers for p in layer.paths]
        assert sorted(paths) == sorted(g.names)  # every path, exactly once
        assert 0 < len(plan.layers) <= budget
        widths = []
        for layer in plan.layers:
            assert layer.paths and layer.size == sum(size_of[p] for p in layer.paths)
            sets = {users[p] for p in layer.paths}
            if budget >= 2:  # one image's paths never share a layer with others'
                assert len({len(s) == 1 for s in sets}) == 1
            if len(sets) == 1:  # a layer of one group: identical wherever it is
                (s,) = sets
                for p in layer.paths:
                    assert pure.setdefault(s, {}).setdefault(p, tuple(layer.paths)) == tuple(
                        layer.paths
                    )
            widths.append(min(len(s) for s in sets))
        assert widths == sorted(widths, reverse=True)  # widest first
    shuffled = [_graph_of(refs, sizes, rows, seed + k) for k, rows in enumerate(images)]
    again = shared_plans(shuffled, budgets)
    assert [short(p) for p in again] == [short(p) for p in result]
