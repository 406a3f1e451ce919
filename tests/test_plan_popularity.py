"""popularity: the formula on hand-made graphs, exactness past 2**128, and nixpkgs'
closure-graph.py's outputs (recorded in tests/data/nixpkgs/; also run live when present)."""

from __future__ import annotations

import copy
import json
import random

import pytest
from nixpkgs_ref import recorded, run_closure_graph

from fastlayer.cli import main
from fastlayer.graph import graph_from_json
from fastlayer.plan import popularity as popularity_module
from fastlayer.plan.popularity import popularity, ranked_paths, tie_key

S = "/nix/store/"
POPULARITY_CASES = recorded("popularity")["cases"]


def graph(edges: dict[str, str]):
    """One-letter nodes: {"A": "BG"} means A references B and G."""
    return graph_from_json(
        [
            {"path": f"{S}h{k}-{k}", "references": [f"{S}h{r}-{r}" for r in v]}
            for k, v in edges.items()
        ]
    )


def short(paths):
    return [p.rsplit("-", 1)[1] for p in paths]


def brute_force(nodes: list[dict]) -> dict[str, int]:
    """The formula, written independently: W by memoised recursion over referrers,
    ancestor sets by walking referrers. Python ints, so exact at any size."""
    refs = {n["path"]: {r for r in n["references"] if r != n["path"]} for n in nodes}
    users = {p: set() for p in refs}
    for p, rs in refs.items():
        for r in rs:
            users[r].add(p)
    w: dict[str, int] = {}

    def count(p: str) -> int:
        if p not in w:
            w[p] = 1 if not users[p] else sum(count(u) for u in users[p])
        return w[p]

    out = {}
    for p in refs:
        seen, todo = {p}, [p]
        while todo:
            for u in users[todo.pop()]:
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        out[p] = sum(count(u) for u in seen)
    return out


def tie_order(path: str) -> str:
    """closure-graph.py's tie-break, written out here: the path's dash-separated
    fields with the first one (`/nix/store/<hash>`) moved to the end."""
    fields = path.split("-")
    return "-".join(fields[1:] + fields[:1])


def expected_order(nodes: list[dict]) -> list[str]:
    pop = brute_force(nodes)
    return sorted(pop, key=lambda p: (-pop[p], tie_order(p)))


def random_nodes(seed: int, n: int, p: float) -> list[dict]:
    r = random.Random(seed)
    names = [
        f"{S}{r.choice('abc')}{i:03d}-{r.choice(['foo', 'bar', 'foo-1.0', 'x'])}" for i in range(n)
    ]
    nodes = []
    for i in range(n):
        refs = [names[j] for j in range(i + 1, n) if r.random() < p]
        if r.random() < 0.5:
            refs.append(names[i])  # self reference
        nodes.append({"path": names[i], "references": refs, "narSize": r.randint(1, 99)})
    r.shuffle(nodes)
    return nodes


def test_the_example_in_closure_graph_py():
    # A->B,G; B->C,E; C->D,E; D->F; E->F. By hand: W(A)=1, W(B)=1, W(G)=1,
    # W(C)=1, W(D)=1, W(E)=W(B)+W(C)=2, W(F)=W(D)+W(E)=3. popularity sums W over
    # the node and its ancestors: A=1, B=1+1=2, G=1+1=2, C=1+2=3, D=1+3=4,
    # E=2+{A,B,C}=5, F=3+{A,B,C,D,E}=3+1+1+1+1+2=9.
    g = graph({"A": "BG", "B": "CE", "C": "DE", "D": "F", "E": "F", "F": "", "G": ""})
    pops = dict(zip(short(g.names), popularity(g), strict=True))
    assert pops == {"A": 1, "B": 2, "C": 3, "D": 4, "E": 5, "F": 9, "G": 2}
    # B and G tie at 2: "B-/nix/store/hB" < "G-/nix/store/hG".
    assert short(ranked_paths(g)) == ["F", "E", "D", "C", "B", "G", "A"]


def test_ties_sort_by_name_with_the_hash_moved_to_the_end():
    # Two roots and nothing else: all popularity 1, so the order is the tie key's.
    nodes = [
        {"path": S + "zzz-alpha", "references": []},
        {"path": S + "aaa-beta", "references": []},
        {"path": S + "mmm-alpha", "references": []},
    ]
    g = graph_from_json(nodes)
    assert ranked_paths(g) == [S + "mmm-alpha", S + "zzz-alpha", S + "aaa-beta"]
    assert tie_key(S + "abc-foo-1.0") == "foo-1.0-/nix/store/abc"


def test_two_roots_sharing_a_dependency():
    # R1->X, R2->X, X->Y: W(X)=2, W(Y)=2; pop X = 2+1+1 = 4, Y = 2+4 = 6.
    g = graph({"R": "X", "Q": "X", "X": "Y", "Y": ""})
    assert dict(zip(short(g.names), popularity(g), strict=True)) == {"R": 1, "Q": 1, "X": 4, "Y": 6}


def diamond_chain(levels: int) -> list[dict]:
    """Each level has two paths referencing both paths of the next: W doubles per level."""
    nodes = []
    for lv in range(levels):
        for s in "ab":
            below = [f"{S}{x}{lv + 1:03d}-{x}" for x in "ab"] if lv + 1 < levels else []
            nodes.append({"path": f"{S}{s}{lv:03d}-{s}", "references": below})
    return nodes


def test_exact_past_2_to_the_128():
    nodes = diamond_chain(150)
    g = graph_from_json(nodes)
    pops = dict(zip(g.names, popularity(g), strict=True))
    assert pops == brute_force(nodes)
    assert max(pops.values()) > 2**140
    # the two bottom paths tie exactly (a differs from b only in the tie key)
    assert ranked_paths(g)[:2] == [f"{S}a149-a", f"{S}b149-b"]
    assert ranked_paths(g) == expected_order(nodes)


def test_order_just_above_2_to_the_64_is_exact():
    # Two huge popularities that differ by 2 (a new root above a065 adds its own
    # W of 1 and one more path into a065): floats could not order them.
    nodes = diamond_chain(66)
    nodes.append({"path": S + "zzz-extra", "references": [f"{S}a065-a"]})
    g = graph_from_json(nodes)
    pops = dict(zip(g.names, popularity(g), strict=True))
    assert pops == brute_force(nodes)
    assert pops[f"{S}a065-a"] == pops[f"{S}b065-b"] + 2 > 2**64
    assert ranked_paths(g)[:2] == [f"{S}a065-a", f"{S}b065-b"]


@pytest.mark.parametrize("seed", range(25))
def test_random_graphs_match_the_formula(seed):
    r = random.Random(seed)
    nodes = random_nodes(seed, r.randint(1, 45), r.choice([0.03, 0.1, 0.3, 0.6]))
    assert ranked_paths(graph_from_json(nodes)) == expected_order(nodes)


@pytest.mark.parametrize("case", POPULARITY_CASES, ids=lambda c: c["name"])
def test_graphs_match_closure_graph_py(case, tmp_path, capsys):
    """closure-graph.py's recorded ranking of random graphs and of a 140-level
    diamond chain (popularities past 2**128), and a live run when it is present."""
    nodes = case["nodes"]
    references = [case["ranked"]]
    live = run_closure_graph(nodes, tmp_path)
    if live is not None:
        references.append(live)
    mine = ranked_paths(graph_from_json(copy.deepcopy(nodes)))
    # and the command is a drop-in: same lines on stdout
    f = tmp_path / "graph.json"
    f.write_text(json.dumps({"graph": nodes}))
    assert main(["rank", str(f), "graph"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for ref in references:
        assert mine == ref
        assert printed == ref


def test_recorded_popularity_inputs():
    # the deep case is the diamond chain these tests build, and the set holds
    # graphs with edges, self references and ties
    deep = {c["name"]: c for c in POPULARITY_CASES}["diamonds140"]
    assert deep["nodes"] == diamond_chain(140)
    assert len(POPULARITY_CASES) == 13
    nodes = [n for c in POPULARITY_CASES for n in c["nodes"]]
    assert any(n["path"] in n["references"] for n in nodes)
    assert sum(len(n["references"]) for n in nodes) > 500


def test_rank_command_writes_a_file(tmp_path):
    f = tmp_path / "g.json"
    f.write_text(json.dumps(diamond_chain(3)))
    out = tmp_path / "ranked.txt"
    assert main(["rank", str(f), "-o", str(out)]) == 0
    assert out.read_text().splitlines() == expected_order(diamond_chain(3))
    # written through a temporary file renamed into place: nothing else is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "ranked.txt"]


@pytest.mark.parametrize("seed", range(3))
def test_wide_graphs_match_the_formula(seed):
    # Hundreds of roots over a shared base: whole 64-source words of the native
    # bitsets reach the base paths, which take the kernel's full-word shortcut.
    r = random.Random(seed)
    base = [f"{S}b{i:03d}-base{i % 7}" for i in range(40)]
    nodes = [
        {"path": p, "references": base[i + 1 : i + 1 + r.randint(0, 3)]} for i, p in enumerate(base)
    ]
    for i in range(r.randint(300, 700)):
        refs = r.sample(base, r.randint(1, 4))
        nodes.append({"path": f"{S}r{i:04d}-app{i % 5}", "references": refs})
    r.shuffle(nodes)
    assert ranked_paths(graph_from_json(nodes)) == expected_order(nodes)


@pytest.mark.parametrize("seed", range(4))
def test_ties_ranked_on_a_second_thread_give_the_same_order(seed, monkeypatch):
    # Big graphs sort their tie keys beside the counts; force that path here.
    monkeypatch.setattr(popularity_module, "OVERLAP_TIES", 0)
    monkeypatch.setenv("FASTLAYER_THREADS", "2")
    nodes = random_nodes(100 + seed, 40, 0.1)
    assert ranked_paths(graph_from_json(nodes)) == expected_order(nodes)


def test_rank_command_prints_utf8_names(tmp_path):
    nodes = [
        {"path": S + "h1-caf\u00e9", "references": [S + "h2-na\u00efve"]},
        {"path": S + "h2-na\u00efve", "references": []},
        {"path": S + "h3-\u65e5\u672c", "references": []},
    ]
    f = tmp_path / "g.json"
    f.write_text(json.dumps(nodes))
    out = tmp_path / "ranked.txt"
    assert main(["rank", str(f), "-o", str(out)]) == 0
    want = "".join(p + "\n" for p in expected_order(nodes)).encode("utf-8")
    assert out.read_bytes() == want
