"""limit: the layer budget arithmetic and the cut that never drops a path; the plan
file and the `plan` command around them."""

from __future__ import annotations

import json

import pytest

from fastlayer.cli import main
from fastlayer.errors import FastlayerError
from fastlayer.graph import graph_from_json
from fastlayer.plan import make_plan, read_plan
from fastlayer.plan.limit import limit_layers, one_per_layer, store_layer_budget
from fastlayer.plan.planfile import plan_from_json

S = "/nix/store/"


def test_budget_arithmetic():
    assert store_layer_budget(100) == 99  # the customisation layer
    assert store_layer_budget(100, base_layers=10) == 89
    assert store_layer_budget(2) == 1
    with pytest.raises(FastlayerError, match="max layers 5 leaves no layer.*5 base image"):
        store_layer_budget(5, base_layers=5)
    with pytest.raises(FastlayerError, match="leaves no layer"):
        store_layer_budget(1)


def test_first_n_minus_1_alone_the_rest_together():
    assert one_per_layer(list("abcdef"), 3) == [["a"], ["b"], ["c", "d", "e", "f"]]
    assert one_per_layer(list("abc"), 3) == [["a"], ["b"], ["c"]]
    assert one_per_layer(list("ab"), 5) == [["a"], ["b"]]
    assert one_per_layer(list("abc"), 1) == [["a", "b", "c"]]
    assert one_per_layer([], 4) == []
    assert limit_layers([["a", "b"], ["c"], ["d"]], 2) == [["a", "b"], ["c", "d"]]
    with pytest.raises(FastlayerError):
        one_per_layer(["a"], 0)


def chain(n):
    names = [f"{S}{i:03d}-p{i}" for i in range(n)]
    return graph_from_json(
        [
            {"path": names[i], "references": names[i + 1 : i + 2], "narSize": 10 + i}
            for i in range(n)
        ]
    )


def test_no_path_is_dropped():
    # nixpkgs issue 78744: every path must land in some layer
    g = chain(30)
    for strategy in ("popularity", "limit", "auto", "stable"):
        for budget in (1, 2, 5, 29, 30, 31):
            plan = make_plan(g, strategy, budget)
            paths = [p for layer in plan.layers for p in layer.paths]
            assert sorted(paths) == sorted(g.names), (strategy, budget)
            assert 1 <= len(plan.layers) <= budget
            assert all(layer.paths for layer in plan.layers)


def test_popularity_plan_is_the_ranked_cut():
    # In a chain the deepest path is the most popular: popularity(k) = k + 1.
    g = chain(5)
    plan = make_plan(g, "popularity", 3)
    assert [x.paths for x in plan.layers] == [[g.names[4]], [g.names[3]], g.names[2::-1]]
    assert [x.size for x in plan.layers] == [14, 13, 12 + 11 + 10]
    # limit keeps the graph's own order
    plan = make_plan(g, "limit", 3)
    assert [x.paths for x in plan.layers] == [[g.names[0]], [g.names[1]], g.names[2:]]


def test_plan_file_round_trip_and_errors(tmp_path):
    plan = make_plan(chain(4), "popularity", 2)
    f = tmp_path / "plan.json"
    f.write_text(plan.dumps())
    data = json.loads(f.read_text())
    assert data["version"] == 1 and data["strategy"] == "popularity"
    assert data["total_size"] == 10 + 11 + 12 + 13
    back = read_plan(f)
    assert [x.paths for x in back.layers] == [x.paths for x in plan.layers]
    with pytest.raises(FastlayerError, match="unsupported plan version 7"):
        plan_from_json({"version": 7, "layers": []})
    with pytest.raises(FastlayerError, match="malformed layer 0"):
        plan_from_json({"version": 1, "layers": [{"paths": "x"}]})


def test_plan_command(tmp_path, capsys):
    g = tmp_path / "g.json"
    g.write_text(
        json.dumps(
            [
                {
                    "path": f"{S}{i:03d}-p{i}",
                    "references": [f"{S}{i + 1:03d}-p{i + 1}"] if i < 9 else [],
                    "narSize": 1,
                }
                for i in range(10)
            ]
        )
    )
    out = tmp_path / "plan.json"
    assert main(["plan", str(g), "--max-layers", "5", "--base-layers", "1", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["budget"] == 3 and len(data["layers"]) == 3
    assert sum(len(x["paths"]) for x in data["layers"]) == 10
    assert not list(tmp_path.glob(".plan.json*"))  # no temporary left behind
    assert main(["plan", str(g), "--max-layers", "2", "--base-layers", "1"]) == 1
    assert "leaves no layer" in capsys.readouterr().err
    assert main(["plan", str(g), "--previous", str(out)]) == 1
    assert "--previous only applies to --strategy stable" in capsys.readouterr().err
    assert main(["plan", str(g), "--strategy", "pipeline"]) == 1
    assert "--strategy pipeline needs --pipeline JSON" in capsys.readouterr().err
    steps = tmp_path / "steps.json"
    steps.write_text("[]")
    assert main(["plan", str(g), "--pipeline", str(steps)]) == 1
    assert "--pipeline applies only to --strategy pipeline" in capsys.readouterr().err
    # a second graph taken for KEY: say so, and what was meant
    assert main(["plan", str(g), str(g)]) == 1
    err = capsys.readouterr().err
    assert "KEY" in err and "not an object" in err and "--strategy shared" in err
