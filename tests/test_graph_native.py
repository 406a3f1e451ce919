"""The native graph reader: it takes the common forms itself, and for every other
input the result (graph or one-line error) is what the general loader gives."""

from __future__ import annotations

import json
import random

import pytest

from fastlayer import untrusted
from fastlayer._native import graphload
from fastlayer.errors import FastlayerError
from fastlayer.graph import graph_from_json, load_graph

S = "/nix/store/"
A, B, C = S + "aaa-app-1.0", S + "bbb-lib-2", S + "ccc-glibc-2.40"


def export_nodes():
    return [
        {"path": A, "references": [B, C, A, B], "narSize": 10, "narHash": "sha256:a"},
        {"path": B, "references": [C], "narSize": 20, "narHash": "sha256:b", "deriver": ""},
        {"path": C, "references": [], "narSize": 30, "narHash": "sha256:c"},
    ]


def path_info_dict(base_names: bool):
    def n(p):
        return p[len(S) :] if base_names else p

    return {
        n(A): {"narHash": "sha256:a", "narSize": 10, "references": [n(B), n(C)], "deriver": n(A)},
        n(B): {"narHash": "sha256:b", "narSize": 20, "references": [n(C)], "closureSize": 50},
        n(C): {"narHash": "sha256:c", "narSize": 30, "references": [], "ultimate": True},
    }


COMMON = {
    "export list": (export_nodes(), None),
    "attrs file": ({"name": "x", "closure": export_nodes(), "env": {"a": [1, 2.5e3]}}, None),
    "attrs with key": ({"closure": export_nodes(), "other": []}, "closure"),
    "path-info dict": (path_info_dict(False), None),
    "path-info dict, base names": (path_info_dict(True), None),
    "old path-info list": ([dict(x, valid=True) for x in export_nodes()], None),
}


def native(doc, key=None):
    raw = json.dumps(doc).encode()
    return graphload.parse(raw, None if key is None else key.encode(), b"/nix/store", S.encode())


@pytest.mark.parametrize("name", sorted(COMMON))
def test_common_forms_are_read_natively(name):
    doc, key = COMMON[name]
    cols = native(doc, key)
    assert cols is not None, name
    names, counts, refs, sizes, hashes, _, _ = cols
    assert names == [A, B, C]
    assert sizes.tolist() == [10, 20, 30]
    assert hashes == ["sha256:a", "sha256:b", "sha256:c"]
    assert [names[i] for i in refs[: counts[0]]][:2] == [B, C]


def test_native_graph_fields(tmp_path):
    f = tmp_path / "g.json"
    f.write_text(json.dumps(path_info_dict(True)))
    g = load_graph(f)
    assert g.names == [A, B, C]
    assert g.indptr.tolist() == [0, 2, 3, 3] and g.indices.tolist() == [1, 2, 2]
    assert g.deriver == [A, None, None]
    assert g.closure_size is None  # only one node has one
    f.write_text(json.dumps(export_nodes()))
    g = load_graph(f)
    assert g.indices.tolist() == [1, 2, 2]  # A's self and repeated references dropped
    assert g.deriver is None  # "" is no deriver


def outcome(path, key=None, via_file=True):
    """A loader's result as plain data, or its error message."""
    try:
        if via_file:
            g = load_graph(path, key=key)
        else:
            raw = path.read_bytes()
            data = untrusted.parse_json(raw, f"malformed JSON in {path}", max_depth=None)
            g = graph_from_json(data, key=key, source=str(path))
    except FastlayerError as e:
        return str(e)
    return as_data(g)


def as_data(g, closure_size: bool = True) -> tuple:
    """A graph's fields as plain data, to compare two loaders' results."""
    closure = None if g.closure_size is None else g.closure_size.tolist()
    return (
        g.names,
        g.indptr.tolist(),
        g.indices.tolist(),
        g.nar_size.tolist(),
        g.nar_hash,
        *([closure] if closure_size else []),
        g.deriver,
    )


ODD = [
    '[{"path": "/nix/store/aaa-x", "references": ["/nix/store/b\\u0061d"]}]',
    '[{"path": "/nix/store/aaa-x", "pa\\u0074h": "/nix/store/bbb-y"}]',
    '[{"path": "/nix/store/aaa-x", "path": "/nix/store/bbb-y"}]',
    '[{"path": "/nix/store/aaa-x", "narSize": 1.0}]',
    '[{"path": "/nix/store/aaa-x", "narSize": -0}]',
    '[{"path": "/nix/store/aaa-x", "narSize": 9223372036854775808}]',
    '[{"path": "/nix/store/aaa-x", "narSize": 9223372036854775807},'
    ' {"path": "/nix/store/bbb-y", "narSize": 1}]',
    '[{"path": "/nix/store/aaa-x", "deriver": 0}]',
    '[{"path": "/nix/store/aaa-x", "deriver": true}]',
    '[{"path": "/nix/store/aaa-x", "valid": false}]',
    '[{"path": "/nix/store/aaa-x", "references": null}]',
    '[{"path": "/nix/store/aaa-x", "references": ["/nix/store/aaa-x", 3]}]',
    '[{"path": "/nix/store/aaa-x", "references": ["/nix/store/zzz"]}]',
    '[{"path": "/nix/store/aaa-x"}, {"path": "/nix/store/aaa-x"}]',
    '[{"path": "/nix/store/aaa-x", "references": ["/nix/store/bbb-y"]},'
    ' {"path": "/nix/store/bbb-y", "references": ["/nix/store/aaa-x"]}]',
    '[{"path": "/nix/store/.."}]',
    '[{"path": "/nix/store/a/b"}]',
    '[{"path": "/elsewhere/aaa-x"}]',
    '[{"path": "/nix/store/aaa-\\u00e9"}]',
    '[{"path": "/nix/store/aaa-\\t"}]',
    '[{"path": "/nix/store/aaa-x", "narHash": "\\u00e9", "other": "\\u00e9 \\ud800 \xc3\xa9"}]',
    '[{"path": "/nix/store/aaa-x", "narSize": NaN}]',
    '[{"path": "/nix/store/aaa-x"}] x',
    '[{"path": "/nix/store/aaa-x"},]',
    "[]",
    "{}",
    "[1]",
    '{"a": [], "b": [{"path": "/nix/store/aaa-x"}]}',
    '{"a": [{"path": "/nix/store/aaa-x"}], "a": 1}',
    '{"a": [{"x": 1}], "b": [{"path": "/nix/store/aaa-x"}]}',
    '{"a": ["s"], "b": [{"path": "/nix/store/aaa-x"}]}',
    '{"/nix/store/aaa-x": null}',
    '{"aaa-x": {"narHash": "h"}, "aaa-x": {"narSize": 1}}',
    '{"aaa-x": {"narHash": "h"}, "/nix/store/aaa-x": {"narSize": 1}}',
    '{"aaa-x": {"narSize": 1}}',
    '{"aaa-x": {"references": []}, "bbb-y": {"references": ["aaa-x", ""]}}',
    '{"aaa-x": {"references": []}, "bbb-y": {"deriver": "d.drv", "narSize": 0}}',
    '{"g": {"aaa-x": {"narSize": 1}}}',
    '{"g": 5}',
    '{"g": []}',
    "\ufeff[]",
    "[" * 3000 + "]" * 3000,
]


@pytest.mark.parametrize("i", range(len(ODD)))
@pytest.mark.parametrize("key", [None, "g", "a"])
def test_odd_inputs_match_the_general_loader(tmp_path, i, key):
    f = tmp_path / "g.json"
    f.write_bytes(ODD[i].encode("utf-8", "surrogatepass"))
    assert outcome(f, key) == outcome(f, key, via_file=False)


def test_mutated_inputs_match_the_general_loader(tmp_path):
    """Random byte edits of a valid graph: same graph or same error either way."""
    base = json.dumps(COMMON["attrs file"][0]).encode()
    rng = random.Random(14)
    f = tmp_path / "g.json"
    native_taken = 0
    for _ in range(400):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(raw))
            raw[pos] = rng.choice(b'"\\[]{},:0-/ aex\x00\xc3\xe9')
        f.write_bytes(bytes(raw))
        native_taken += graphload.parse(bytes(raw), None, b"/nix/store", S.encode()) is not None
        assert outcome(f) == outcome(f, via_file=False), bytes(raw)
    assert native_taken > 10  # the edits also leave valid graphs the native reader takes


def test_store_dir_with_trailing_slash(tmp_path):
    """Base names join the store dir as given; /nix/store/ makes them //-paths,
    which the store dir check refuses, whichever reader runs."""
    f = tmp_path / "g.json"
    f.write_text(json.dumps(path_info_dict(True)))
    msg = f"{f}: path outside the store dir /nix/store/: /nix/store//aaa-app-1.0"
    with pytest.raises(FastlayerError) as e:
        graph_from_json(path_info_dict(True), store_dir="/nix/store/", source=str(f))
    assert str(e.value) == msg
    with pytest.raises(FastlayerError) as e:
        load_graph(f, store_dir="/nix/store/")
    assert str(e.value) == msg
    assert load_graph(f, store_dir="/nix/store").indices.tolist() == [1, 2, 2]


REG_MODERN = (
    f"{A}\nsha256:a\n10\n{A}.drv\n2\n{B}\n{C}\n"
    f"{B}\nsha256:b\n20\n\n1\n{C}\n{C}\nsha256:c\n30\n\n0\n"
)
REG_LEGACY = f"{A}\n\n2\n{B}\n{C}\n{B}\n\n1\n{C}\n{C}\n\n0\n"
ALL = f"{A}\n{B}\n{C}\n"

CLOSURE_INFOS = [
    (REG_MODERN, ALL),
    (REG_LEGACY, ALL),
    ("\n\n" + REG_LEGACY + "\n\n", f" {C}\t{B}\x0b{A}\x1c"),
    (REG_LEGACY, f"{A}\n{A}\n{B}\n{C}\n"),  # a repeat in store-paths
    (REG_LEGACY, f"{A}\n{A}\n{B}\n"),  # as many, but C unlisted: accepted as today
    (REG_LEGACY, f"{A}\n{B}\n"),
    (REG_LEGACY, f"{A}\n{B}\n{C}\n/nix/store/ddd-x\n"),
    (REG_LEGACY.rstrip("\n"), ALL),
    (REG_LEGACY[:-3], ALL),
    (f"{A}\nsha256:a\n+10\n\n0\n", A),
    (f"{A}\nsha256:a\n010\n\n0\n", A),
    (f"{A}\nsha256:a\n99999999999999999999\n\n0\n", A),
    (f"{A}\nsha256:a\n9223372036854775807\n\n0\n{B}\n\n0\n", f"{A} {B}"),
    (f"{A}\n\n-1\n", A),
    (f"{A}\n\n1\n/nix/store/zzz\n", A),
    (f"{A}\n\n0\n{A}\n\n0\n", A),
    (f"{A}\n\n1\n{B}\n{B}\n\n1\n{A}\n", f"{A} {B}"),
    ("/nix/store/a\u00e9\n\n0\n", "/nix/store/a\u00e9"),
    (f"{A}\r\n\n0\n", A),
    ("/tmp/x\n\n0\n", "/tmp/x"),
    ("", ""),
]


def closure_info_outcome(d, native: bool, monkeypatch):
    from fastlayer import graph

    with monkeypatch.context() as m:
        if not native:
            m.setattr(graph, "_closure_info_native", lambda *a: None)
        try:
            g = load_graph(d)
        except FastlayerError as e:
            return str(e)
    return as_data(g, closure_size=False)


@pytest.mark.parametrize("i", range(len(CLOSURE_INFOS)))
def test_closure_info_matches_the_general_loader(tmp_path, monkeypatch, i):
    reg, paths = CLOSURE_INFOS[i]
    (tmp_path / "registration").write_text(reg)
    (tmp_path / "store-paths").write_text(paths)
    got = closure_info_outcome(tmp_path, True, monkeypatch)
    assert got == closure_info_outcome(tmp_path, False, monkeypatch)
    if i < 5:  # the well-formed ones are read natively
        cols = graphload.parse_closure_info(reg.encode(), paths.encode(), S.encode())
        assert cols is not None and cols[0] == [A, B, C]
        assert got[1:3] == ([0, 2, 3, 3], [1, 2, 2])


# The file is mapped, not read: a file that shrinks under the mapping raises
# SIGBUS on the next page read, which must end the parse cleanly, not the process.


def test_mapped_file_shorter_than_its_size_is_no_crash(tmp_path):
    page = 4096
    f = tmp_path / "g.json"
    f.write_bytes(b"[" + b" " * (page - 1))  # still inside the list at the end of the file
    with open(f, "rb") as fh:
        # As if the file had been 3 pages when its size was taken: pages 2-3 fault.
        assert graphload.parse_fd(fh.fileno(), 3 * page, None, b"/nix/store", S.encode()) is None
        # The same fd, the true size: parsed (an unterminated list: not the fast path).
        assert graphload.parse_fd(fh.fileno(), page, None, b"/nix/store", S.encode()) is None
    whole = json.dumps(export_nodes()).encode()
    f.write_bytes(whole)
    with open(f, "rb") as fh:
        cols = graphload.parse_fd(fh.fileno(), len(whole), None, b"/nix/store", S.encode())
    assert cols is not None and cols[0] == [A, B, C]


def test_graph_truncated_while_loaded_gives_a_graph_or_one_line(tmp_path):
    """A writer truncates the file while `fastlayer rank` reads it: the command
    ends with the ranking of what it read or with one line naming the file, and
    never with a signal (SIGBUS) or a traceback."""
    import subprocess
    import sys

    nodes = [
        {"path": f"{S}{i:032d}-p{i}", "narSize": i, "narHash": "sha256:x",
         "references": [f"{S}{j:032d}-p{j}" for j in range(max(0, i - 3), i)]}
        for i in range(60000)
    ]  # fmt: skip
    raw = json.dumps(nodes).encode()
    script = (
        "import os, sys, threading, time\n"
        "from fastlayer.errors import FastlayerError\n"
        "from fastlayer.graph import load_graph\n"
        "p = sys.argv[1]\n"
        "def cut():\n"
        "    time.sleep(float(sys.argv[2]))\n"
        "    os.truncate(p, 4096)\n"
        "threading.Thread(target=cut).start()\n"
        "try:\n"
        "    g = load_graph(p)\n"
        "    print('graph', g.n)\n"
        "except FastlayerError as e:\n"
        "    print('error', str(e).splitlines()[0][:80])\n"
    )
    for delay in (0.0, 0.002, 0.01, 0.03, 0.08):
        f = tmp_path / "g.json"
        f.write_bytes(raw)
        r = subprocess.run([sys.executable, "-c", script, str(f), str(delay)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, (delay, r.returncode, r.stderr[-500:])
        assert r.stdout.startswith(("graph 60000", "error ")), r.stdout


def test_a_sigbus_sent_while_a_graph_is_parsed_still_kills(tmp_path):
    """The parser's SIGBUS handler takes only faults in its own mapping: a SIGBUS
    that `kill` sends meanwhile ends the process as it would without a parse."""
    import signal
    import subprocess
    import sys

    # Nearly all of the parse is skipping one long string: the handler is in
    # place for all but microseconds of each loop, whichever thread gets the signal.
    f = tmp_path / "g.json"
    f.write_bytes(b'{"junk": "' + b"x" * (48 << 20) + b'", "g": [{"path": "' + A.encode()
                  + b'", "references": []}]}')  # fmt: skip
    script = (
        "import os, signal, sys, threading, time\n"
        "from fastlayer._native import graphload\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "size = os.fstat(fd).st_size\n"
        "def loop():\n"
        "    while True:\n"
        "        graphload.parse_fd(fd, size, None, b'/nix/store', b'/nix/store/')\n"
        "threading.Thread(target=loop, daemon=True).start()\n"
        "time.sleep(0.3)\n"
        "os.kill(os.getpid(), signal.SIGBUS)\n"
        "time.sleep(2)\n"
        "print('survived')\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(f)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr[-300:])
