"""Closure graph loaders: every input format, the CSR arrays, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastlayer.cli import main
from fastlayer.errors import FastlayerError
from fastlayer.graph import graph_from_json, load_graph

S = "/nix/store/"
A, B, C = S + "aaa-app-1.0", S + "bbb-lib-2", S + "ccc-glibc-2.40"


def refs_by_name(g):
    return {g.names[i]: sorted(g.names[j] for j in g.references(i)) for i in range(g.n)}


def export_graph():
    return [
        {
            "path": A,
            "references": [A, B, C, B],
            "narSize": 10,
            "narHash": "sha256:a",
            "closureSize": 60,
        },
        {"path": B, "references": [C], "narSize": 20, "narHash": "sha256:b", "closureSize": 50},
        {"path": C, "references": [C], "narSize": 30, "narHash": "sha256:c", "closureSize": 30},
    ]


EXPECTED = {A: sorted([B, C]), B: [C], C: []}


def test_export_references_graph_list(tmp_path):
    f = tmp_path / "g.json"
    f.write_text(json.dumps(export_graph()))
    g = load_graph(f)
    assert g.names == [A, B, C]
    # self references dropped, the duplicate B collapsed
    assert refs_by_name(g) == EXPECTED
    assert g.indptr.dtype == np.int32 and g.indices.dtype == np.int32
    assert g.nar_size.dtype == np.int64 and g.nar_size.tolist() == [10, 20, 30]
    assert g.nar_hash == ["sha256:a", "sha256:b", "sha256:c"]
    assert g.closure_size is not None and g.closure_size.tolist() == [60, 50, 30]
    assert g.indptr.tolist() == [0, 2, 3, 3]


def test_attrs_file_with_and_without_key(tmp_path):
    f = tmp_path / ".attrs.json"
    f.write_text(json.dumps({"closure": export_graph(), "outputs": {"out": "/x"}, "n": 3}))
    assert refs_by_name(load_graph(f, key="closure")) == EXPECTED
    assert refs_by_name(load_graph(f)) == EXPECTED  # the only list of paths
    f.write_text(json.dumps({"one": export_graph(), "two": export_graph()}))
    with pytest.raises(FastlayerError, match="several lists of paths.*give KEY"):
        load_graph(f)
    with pytest.raises(FastlayerError, match="no key 'three'"):
        load_graph(f, key="three")


def test_path_info_list_and_dict_forms(tmp_path):
    old = [
        {
            "path": A,
            "narHash": "sha256:a",
            "narSize": 10,
            "references": [B, C],
            "deriver": S + "x-app.drv",
            "valid": True,
        },
        {"path": B, "narHash": "sha256:b", "narSize": 20, "references": [C], "deriver": None},
        {"path": C, "narHash": "sha256:c", "narSize": 30, "references": [C]},
    ]
    g = graph_from_json(old)
    assert refs_by_name(g) == EXPECTED
    assert g.deriver == [S + "x-app.drv", None, None]
    # Nix >= 2.19: a dict keyed by path; newer ones give references as base names.
    new = {
        A: {"narHash": "sha256:a", "narSize": 10, "references": ["bbb-lib-2", "ccc-glibc-2.40"]},
        B: {"narHash": "sha256:b", "narSize": 20, "references": ["ccc-glibc-2.40"]},
        C: {"narHash": "sha256:c", "narSize": 30, "references": []},
    }
    f = tmp_path / "pi.json"
    f.write_text(json.dumps(new))
    g = load_graph(f)
    assert refs_by_name(g) == EXPECTED
    assert g.nar_size.tolist() == [10, 20, 30]
    with pytest.raises(FastlayerError, match=f"not valid: {B}"):
        graph_from_json({A: new[A], B: None, C: new[C]})


def test_closure_info_directory(tmp_path):
    d = tmp_path / "closure-info"
    d.mkdir()
    (d / "store-paths").write_text(f"{A}\n{B}\n{C}\n")
    # Modern registration: path, narHash, narSize, deriver, count, refs.
    (d / "registration").write_text(
        f"{A}\nsha256:a\n10\n\n3\n{A}\n{B}\n{C}\n"
        f"{B}\nsha256:b\n20\n\n1\n{C}\n"
        f"{C}\nsha256:c\n30\n{S}d-glibc.drv\n0\n"
    )
    g = load_graph(d)
    assert refs_by_name(g) == EXPECTED
    assert g.nar_size.tolist() == [10, 20, 30]
    assert g.nar_hash == ["sha256:a", "sha256:b", "sha256:c"]
    assert g.deriver == [None, None, S + "d-glibc.drv"]
    # Legacy (pathsFromGraph) registration: no hash/size lines.
    (d / "registration").write_text(f"{A}\n\n2\n{B}\n{C}\n{B}\n\n1\n{C}\n{C}\n\n0\n")
    g = load_graph(d)
    assert refs_by_name(g) == EXPECTED
    assert g.nar_size.tolist() == [0, 0, 0]
    (d / "store-paths").write_text(f"{A}\n{B}\n")
    with pytest.raises(FastlayerError, match="registered but not in store-paths"):
        load_graph(d)
    (d / "registration").write_text(f"{A}\nsha256:a\n10\n\n5\n{B}\n")
    with pytest.raises(FastlayerError, match="malformed registration"):
        load_graph(d)


@pytest.mark.parametrize(
    "nodes, message",
    [
        (
            [{"path": A, "references": [S + "zzz-gone"]}],
            f"dangling reference {S}zzz-gone \\(from {A}\\)",
        ),
        ([{"path": A, "references": []}, {"path": A, "references": []}], f"duplicate path {A}"),
        (
            [{"path": "/usr/lib/x", "references": []}],
            "outside the store dir /nix/store: /usr/lib/x",
        ),
        ([{"path": S + "a/b", "references": []}], "outside the store dir"),
        (
            [
                {"path": A, "references": [B]},
                {"path": B, "references": [C]},
                {"path": C, "references": [A]},
            ],
            "cycle between distinct paths: ",
        ),
        ([{"path": A, "narSize": -1, "references": []}], "bad narSize -1"),
    ],
)
def test_errors_name_the_culprit(nodes, message):
    with pytest.raises(FastlayerError, match=message) as e:
        graph_from_json(nodes)
    assert "\n" not in str(e.value)


def test_cycle_message_lists_the_cycle():
    nodes = [
        {"path": A, "references": [B]},
        {"path": B, "references": [C, A]},
        {"path": C, "references": []},
    ]
    with pytest.raises(FastlayerError) as e:
        graph_from_json(nodes)
    cycle = str(e.value).split(": ", 2)[-1].split(" -> ")
    assert cycle[0] == cycle[-1] and set(cycle) == {A, B}


def test_self_references_are_not_cycles():
    g = graph_from_json([{"path": A, "references": [A]}])
    assert g.n == 1 and len(g.indices) == 0


def test_store_dir_option():
    g = graph_from_json([{"path": "/gnu/store/x-a", "references": []}], store_dir="/gnu/store")
    assert g.store_dir == "/gnu/store"


def test_malformed_json_is_one_line_on_the_cli(tmp_path, capsys):
    f = tmp_path / "bad.json"
    f.write_text('[{"path": ')
    assert main(["rank", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastlayer: error: malformed JSON in ") and err.count("\n") == 1
    assert main(["rank", str(tmp_path / "missing.json")]) == 1
    assert "cannot read graph" in capsys.readouterr().err
