"""pipeline: nixpkgs' layeringPipeline steps on a hand-worked graph, and
flatten_references_graph's outputs on random graphs and pipelines (recorded in
tests/data/nixpkgs/; also run live when present)."""

from __future__ import annotations

import copy
import json
import random

import pytest
from nixpkgs_ref import recorded, run_pipeline

from fastlayer.cli import main
from fastlayer.errors import FastlayerError
from fastlayer.graph import graph_from_json
from fastlayer.plan.pipeline import pipeline_layers

S = "/nix/store/"
PIPELINE_CASES = recorded("pipeline")["cases"]
APP, LIBA, LIBB, GLIBC = S + "h1-app", S + "h2-libA", S + "h3-libB", S + "h4-glibc"


def nodes():
    # app(100) -> libA(50), libB(40); libA -> glibc(60); libB -> glibc.
    # Vertex order (narSize ascending): libB, libA, glibc, app.
    return [
        {"path": APP, "references": [APP, LIBA, LIBB], "narSize": 100},
        {"path": LIBA, "references": [GLIBC], "narSize": 50},
        {"path": LIBB, "references": [GLIBC], "narSize": 40},
        {"path": GLIBC, "references": [], "narSize": 60},
    ]


def run(steps, exclude=()):
    return pipeline_layers(graph_from_json(nodes()), steps, exclude)


def test_split_every_keeps_size_order():
    assert run([["split_every", 3]]) == [[LIBB, LIBA, GLIBC], [APP]]


def test_subcomponents():
    assert run([["subcomponent_out", [LIBA]]]) == [[LIBA, GLIBC], [LIBB, APP]]
    assert run([["subcomponent_in", [LIBA]]]) == [[LIBA, APP], [LIBB, GLIBC]]
    # an unknown path matches nothing: "main" is empty and still printed
    assert run([["subcomponent_out", [S + "x-none"]]]) == [[], [LIBB, LIBA, GLIBC, APP]]


def test_split_paths():
    # Cutting app->libA: libA alone ("main"), glibc reachable from both ("common"),
    # the rest from the root ("rest").
    assert run([["split_paths", [LIBA]]]) == [[LIBA], [GLIBC], [LIBB, APP]]
    # children_of app = libA and libB: both split off, glibc common to nothing else
    assert run([["split_paths", [{"children_of": APP}]]]) == [[LIBB, LIBA, GLIBC], [APP]]
    # the root itself: everything is "main"
    assert run([["split_paths", [APP]]]) == [[LIBB, LIBA, GLIBC, APP]]
    assert run([["split_paths", [S + "x-none"]]]) == [[LIBB, LIBA, GLIBC, APP]]


def test_popularity_contest_and_limit_layers():
    # W: app 1, libA 1, libB 1, glibc 2; popularity: glibc 2+1+1+1=5, libA 2,
    # libB 2 (tie: "libA-..." < "libB-..."), app 1.
    assert run([["popularity_contest"]]) == [[GLIBC], [LIBA], [LIBB], [APP]]
    assert run([["popularity_contest"], ["limit_layers", 2]]) == [[GLIBC], [LIBA, LIBB, APP]]
    assert run([["popularity_contest"], ["reverse"], ["limit_layers", 3]]) == [
        [APP],
        [LIBB],
        [LIBA, GLIBC],
    ]


def test_over_map_pipe_flatten_remove():
    steps = [
        ["subcomponent_in", [LIBA]],
        ["over", "rest", ["pipe", [["popularity_contest"], ["limit_layers", 1]]]],
    ]
    assert run(steps) == [[LIBA, APP], [GLIBC, LIBB]]
    steps = [["split_every", 2], ["map", ["remove_paths", LIBA]], ["flatten"]]
    assert run(steps) == [[LIBB], [GLIBC, APP]]
    assert run([["remove_paths", [APP, LIBB]], ["split_every", 1]]) == [[LIBA], [GLIBC]]


def test_exclude_paths_drop_vertices_and_edges():
    # without glibc, libA and libB are leaves: popularity 2 each, app 1
    assert run([["popularity_contest"]], exclude=[GLIBC]) == [[LIBA], [LIBB], [APP]]


@pytest.mark.parametrize(
    "steps, message",
    [
        ([["nope"]], "unknown step 'nope'"),
        ([["limit_layers", 0]], "needs a count > 0"),
        ([["split_every", 2], ["over", "main", ["flatten"]]], "expected a dict"),
        ([["subcomponent_in", [APP]], ["over", "other", ["flatten"]]], "no key 'other'"),
        ([["popularity_contest"], ["split_every", 2]], "expected a graph"),
        ("popularity_contest", "expected a list of steps"),
        ([["over", "main"]], "expected 2 argument"),
    ],
)
def test_bad_pipelines(steps, message):
    with pytest.raises(FastlayerError, match=message):
        run(steps)


def test_plan_command_with_a_pipeline_file(tmp_path, capsys):
    g = tmp_path / "g.json"
    g.write_text(json.dumps(nodes()))
    p = tmp_path / "pipeline.json"
    p.write_text(json.dumps([["popularity_contest"], ["limit_layers", 2]]))
    out = tmp_path / "plan.json"
    assert (
        main(["plan", str(g), "--strategy", "pipeline", "--pipeline", str(p), "-o", str(out)]) == 0
    )
    plan = json.loads(out.read_text())
    assert [x["paths"] for x in plan["layers"]] == [[GLIBC], [LIBA, LIBB, APP]]
    assert [x["size"] for x in plan["layers"]] == [60, 190]
    # too many layers for the budget is an error, not a silent merge
    assert (
        main(
            [
                "plan",
                str(g),
                "--strategy",
                "pipeline",
                "--max-layers",
                "2",
                "--pipeline",
                '[["split_every", 1]]',
            ]
        )
        == 1
    )
    assert "more than the budget of 1" in capsys.readouterr().err


def random_case(seed):
    r = random.Random(seed)
    n = r.randint(2, 25)
    names = [f"{S}{r.choice('abc')}{i:03d}-{r.choice(['foo', 'bar', 'x-1'])}" for i in range(n)]
    graph = [
        {
            "path": names[i],
            "references": [names[j] for j in range(i + 1, n) if r.random() < 0.15],
            "narSize": r.randint(1, 20),
        }
        for i in range(n)
    ]
    r.shuffle(graph)

    def some():
        return r.sample(names, r.randint(1, min(3, n)))

    # limit_layers(k) on fewer than k items crashes nixpkgs' script (it merges
    # nothing): one layer per path gives n items, n - 1 after an exclude
    most = max(1, n - 1)
    steps = r.choice(
        [
            [["popularity_contest"], ["limit_layers", r.randint(1, n)]],
            [["split_every", r.randint(1, 4)]],
            [["subcomponent_out", some()], ["over", "rest", ["split_every", 2]]],
            [["subcomponent_in", some()], ["over", "main", ["popularity_contest"]]],
            [["split_paths", some()]],
            [
                ["split_paths", [{"children_of": r.choice(names)}]],
                ["flatten"],
                ["map", ["split_every", 3]],
            ],
            [
                ["split_paths", some()],
                ["flatten"],
                ["map", ["popularity_contest"]],
                ["flatten"],
                ["limit_layers", r.randint(1, most)],
                ["reverse"],
            ],
            [
                ["subcomponent_in", some()],
                [
                    "over",
                    "rest",
                    ["pipe", [["popularity_contest"], ["reverse"], ["limit_layers", 1]]],
                ],
            ],
            [
                ["remove_paths", some()],
                ["popularity_contest"],
                ["limit_layers", r.randint(1, most) if n > 2 else 1],
            ],
        ]
    )
    exclude = r.sample(names, 1) if r.random() < 0.3 else None
    return graph, steps, exclude


@pytest.mark.parametrize("case", PIPELINE_CASES, ids=lambda c: f"seed{c['seed']}")
def test_random_pipelines_match_flatten_references_graph(case):
    """flatten_references_graph's recorded layers for random graphs and pipelines
    (and a live run when FASTLAYER_REF_DIR holds it, with igraph and toolz)."""
    graph, steps, exclude = case["graph"], case["steps"], case["exclude"]
    mine = pipeline_layers(graph_from_json(copy.deepcopy(graph)), steps, exclude or ())
    assert mine == case["layers"]
    live = run_pipeline(graph, steps, exclude)
    if live is not None:
        assert live == {"layers": mine}


STEPS = {
    "popularity_contest", "limit_layers", "split_every", "subcomponent_out", "subcomponent_in",
    "over", "split_paths", "flatten", "map", "remove_paths", "reverse", "pipe",
}  # fmt: skip


def step_names(x):
    if isinstance(x, list):
        if x and isinstance(x[0], str) and x[0] in STEPS:
            yield x[0]
        for y in x:
            yield from step_names(y)


def test_recorded_pipeline_cases_cover_every_step():
    used = {name for case in PIPELINE_CASES for name in step_names(case["steps"])}
    assert used == STEPS
    assert len(PIPELINE_CASES) == 30
    assert any(case["exclude"] for case in PIPELINE_CASES)
