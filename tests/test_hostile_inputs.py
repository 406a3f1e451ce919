"""Hostile and broken specs, graphs, plans and Nix inputs (issue 9): each ends in
exit 1 with one `fastlayer: error:` line naming the file and the key, no
traceback, nothing on stdout and no output left; odd but valid input (mode
"0750", uid 2^32-2) gives the right image, read back with tarfile."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fastlayer.cli import main
from fastlayer.errors import FastlayerError
from fastlayer.graph import graph_from_json
from fastlayer.plan.pipeline import pipeline_layers
from fastlayer.spec import load_spec

A = "/nix/store/" + "a" * 32 + "-a"
B = "/nix/store/" + "b" * 32 + "-b"
HASH = "sha256:" + "0" * 52  # nix-base32 of 32 zero bytes


def one_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI in-process; it must fail with one error line holding every needle."""
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlayer: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A child process with a deadline: a blocking open of a fifo would hang it."""
    return subprocess.run(
        [sys.executable, "-m", "fastlayer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def assert_one_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("fastlayer: error: "), r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


# --- Specs -----------------------------------------------------------------


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "data").mkdir(parents=True)
    (root / "data" / "file").write_text("hello\n")
    return root


def write_spec(tmp_path: Path, rootfs: Path, extra: str, suffix: str = "toml") -> Path:
    spec = tmp_path / f"spec.{suffix}"
    if suffix == "toml":
        spec.write_text(f'name = "app"\ncontents = {{ roots = ["{rootfs}"] }}\n{extra}\n')
    else:
        body = {"name": "app", "contents": {"roots": [str(rootfs)]}, **json.loads(extra)}
        spec.write_text(json.dumps(body))
    return spec


def build_fails(capsys, tmp_path: Path, spec: Path, *needles: str) -> None:
    out = tmp_path / "out" / "image.tar"
    out.parent.mkdir(exist_ok=True)
    one_error(capsys, ["build", str(spec), "-o", str(out)], f"spec {spec}", *needles)
    assert os.listdir(out.parent) == []


def test_integer_mode_is_refused_with_what_it_would_mean(capsys, tmp_path, rootfs):
    spec = write_spec(tmp_path, rootfs, 'permissions = [{ path = "/data/*", mode = 700 }]')
    build_fails(
        capsys,
        tmp_path,
        spec,
        'permissions[0].mode: write the mode as an octal string such as "0700" '
        "(the integer 700 is 0o1274)",
    )


@pytest.mark.parametrize("mode", ['"10000"', '"0o17777"', '"rwx"', '"-1"', '"7 00"', '""'])
def test_bad_mode_strings_are_refused(capsys, tmp_path, rootfs, mode):
    spec = write_spec(tmp_path, rootfs, f'permissions = [{{ path = "/data/*", mode = {mode} }}]')
    build_fails(capsys, tmp_path, spec, "permissions[0].mode: ", "is not an octal mode")


def layer_members(image: Path) -> dict[str, tarfile.TarInfo]:
    """Members of the last (customisation) layer, by name, read with tarfile."""
    with tarfile.open(image) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))[0]
        data = outer.extractfile(manifest["Layers"][-1]).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as layer:
        return {m.name.strip("/"): m for m in layer.getmembers()}  # names are "/data/file"


@pytest.mark.parametrize("mode", ["0750", "750", "0o750"])
def test_octal_mode_string_is_the_mode_in_the_layer(capsys, tmp_path, rootfs, mode):
    spec = write_spec(
        tmp_path, rootfs, f'permissions = [{{ path = "/data/file", mode = "{mode}" }}]'
    )
    out = tmp_path / "image.tar"
    assert main(["build", str(spec), "-o", str(out)]) == 0
    members = layer_members(out)
    assert members["data/file"].mode == 0o750
    assert members["data"].mode != 0o750  # only the matching path changed


def test_largest_uid_is_written_and_read_back(capsys, tmp_path, rootfs):
    extra = "uid = 4294967294\ngid = 4294967294\n"
    extra += 'permissions = [{ path = "/data/file", uid = 4294967294, gid = 7 }]'
    out = tmp_path / "image.tar"
    assert main(["build", str(write_spec(tmp_path, rootfs, extra)), "-o", str(out)]) == 0
    members = layer_members(out)
    assert (members["data"].uid, members["data"].gid) == (4294967294, 4294967294)
    assert (members["data/file"].uid, members["data/file"].gid) == (4294967294, 7)


@pytest.mark.parametrize(
    "extra,key",
    [
        ("uid = -1", "uid: -1 is out of range"),
        ("gid = 4294967295", "gid: 4294967295 is out of range"),
        ("uid = 4294967296", "uid: 4294967296 is out of range"),
        ("nix_uid = -5", "nix_uid: -5 is out of range"),
        ('permissions = [{ path = "/x", uid = -1 }]', "permissions[0].uid: -1 is out of range"),
        ('permissions = [{ path = "/x", gid = 4294967296 }]', "permissions[0].gid: "),
        ('permissions = [{ path = "/x", uid = "0" }]', "permissions[0].uid: must be an integer"),
    ],
)
def test_ids_outside_uid_t_are_refused(capsys, tmp_path, rootfs, extra, key):
    build_fails(capsys, tmp_path, write_spec(tmp_path, rootfs, extra), key)


@pytest.mark.parametrize(
    "extra,key",
    [
        ('{"gid": 1e20}', "gid: must be an integer"),
        ('{"created": 1e20}', "created: 1e+20 is not a time in 1970..9999"),
        ('{"created": -5}', "created: -5 is not a time in 1970..9999"),
        ('{"mtime": "99999999999999999999999"}', "mtime: "),
        ('{"mtime": "-1"}', "mtime: '-1' is not a time in 1970..9999"),
        ('{"mtime": "1969-12-31T23:59:59Z"}', "mtime: '1969-12-31T23:59:59Z' is not a time"),
        ('{"mtime": "9999-12-31T23:00:00-05:00"}', "mtime: "),
        ('{"created": "10000-01-01T00:00:00Z"}', "created: "),
        ('{"max_layers": 0}', "max_layers: 0 is out of range [1, 10000]"),
        ('{"max_layers": 100000}', "max_layers: 100000 is out of range"),
        ('{"max_layers": true}', "max_layers: must be an integer"),
        ('{"contents": {"roots": "rootfs"}}', "contents.roots: must be a list, not a string"),
        ('{"contents": {"store_paths": "/nix/store/x"}}', "contents.store_paths: must be a list"),
        ('{"contents": "abc"}', "contents: must be an object"),
        ('{"config": {"Env": "A=1"}}', "config.Env: must be a list, not a string"),
        ('{"config": {"Env": ["=1"]}}', "config.Env[0]: not NAME=value"),
        ('{"config": {"Labels": ["a"]}}', "config.Labels: must be an object"),
        ('{"config": {"Labels": {"a": 1}}}', "config.Labels['a']: must be a string"),
        ('{"config": {"Cmd": [1]}}', "config.Cmd[0]: must be a string"),
        ('{"config": {"ExposedPorts": {"80/tcp": 1}}}', "config.ExposedPorts['80/tcp']"),
        ('{"config": {"Healthcheck": {"Test": "x"}}}', "config.Healthcheck.Test: must be a list"),
        ('{"fake_nss": {"passwd": "a:x:1:1::/:/bin/sh"}}', "fake_nss.passwd: must be a list"),
        ('{"fake_nss": {"passwd": ["a\\nroot2::0:0::/:/bin/sh"]}}', "fake_nss.passwd[0]: one line"),
        ('{"fake_nss": 5}', "fake_nss must be true, false or a table"),
        ('{"extra_commands": ["ls"]}', "extra_commands: must be a string"),
        ('{"extra_commands": "ls\\u0000x"}', "extra_commands holds a NUL"),
        ('{"strategy": "best"}', "strategy must be one of"),
        ('{"verify_base": "yes"}', "verify_base: must be true or false"),
        ('{"store_dir": "nix"}', "store_dir must be an absolute path"),
        ('{"from_image": 5}', "from_image: must be a string"),
        ('{"name": "app\\n"}', "is not a valid image name"),
        ('{"tag": "v1\\n"}', "is not a valid tag"),
        ('{"permissions": "x"}', "permissions: must be a list"),
        ('{"permissions": [{"path": 5}]}', "permissions[0].path: must be a string"),
    ],
)
def test_spec_values_are_type_and_range_checked(capsys, tmp_path, rootfs, extra, key):
    build_fails(capsys, tmp_path, write_spec(tmp_path, rootfs, extra, "json"), key)


def test_toml_nan_time_is_refused(capsys, tmp_path, rootfs):
    build_fails(capsys, tmp_path, write_spec(tmp_path, rootfs, "created = nan"), "created: nan")


def test_deep_specs_are_one_line(capsys, tmp_path):
    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text('name = "app"\nx = ' + "[" * 100_000 + "]" * 100_000 + "\n")
    build_fails(capsys, tmp_path, deep_toml, "nested too deeply")
    deep_json = tmp_path / "deep.json"
    deep_json.write_text('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}")
    build_fails(capsys, tmp_path, deep_json, "nested")


def test_oversized_spec_is_refused_without_reading_it_all(capsys, tmp_path):
    spec = tmp_path / "big.toml"
    with open(spec, "w") as f:
        f.write('name = "app"\n')
        f.truncate((16 << 20) + 100)  # NULs past the cap
    build_fails(capsys, tmp_path, spec, "larger than 16777216 bytes")


def test_fifo_and_device_specs_are_refused_by_type(tmp_path):
    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    assert_one_line(run_cli("build", str(fifo), "-o", str(tmp_path / "o.tar")), "is a fifo")
    assert_one_line(run_cli("build", "/dev/zero", "-o", str(tmp_path / "o.tar")), "device")
    assert sorted(os.listdir(tmp_path)) == ["spec.toml"]


def test_verify_base_is_on_by_default():
    assert load_spec({"name": "app"}).verify_base is True
    assert load_spec({"name": "app", "verify_base": False}).verify_base is False


# --- Graphs ----------------------------------------------------------------


def node(path: str = A, **kw) -> dict:
    return {"path": path, "references": [], **kw}


@pytest.mark.parametrize(
    "nodes,needle",
    [
        ([node(narSize=2**70)], f"bad narSize {2**70} for {A}"),
        ([node(narSize=-1)], f"bad narSize -1 for {A}"),
        ([node(narSize=1.5)], "bad narSize 1.5"),
        ([node(narSize=True)], "bad narSize True"),
        ([node(narSize=2**62), node(B, narSize=2**62)], "narSize values add up to more"),
        ([node(closureSize=2**64)], "bad closureSize"),
        ([node(narHash=5)], f"bad narHash 5 for {A}"),
        ([node(deriver=["x"])], "bad deriver"),
        ([node(references=A)], f"bad references for {A}"),
        ([node(references=[5])], "bad reference 5"),
        ([node(references=[{"a": 1}])], "bad reference {'a': 1}"),
        ([node(path=5)], "bad path 5"),
        ([node("/nix/store/..")], "path outside the store dir /nix/store: /nix/store/.."),
        ([node("/nix/store/.")], "path outside the store dir"),
        ([node(A + "\nx")], "bad path"),
        ([5], "expected objects with a 'path'"),
        ({A: {"narSize": 2**70}}, f"bad narSize {2**70} for {A}"),
        ({A: {"references": [5]}}, "bad reference 5"),
        ({A: {"references": "x"}}, f"bad references for {A}"),
        ({A: {"narHash": []}}, "bad narHash"),
    ],
)
def test_bad_graph_values_are_one_line(capsys, tmp_path, nodes, needle):
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(nodes))
    one_error(capsys, ["rank", str(graph), "-o", str(tmp_path / "out")], str(graph), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["top", "references", "path"])
def test_deeply_nested_graph_json_is_one_line(capsys, tmp_path, where):
    deep = "[" * 100_000 + "]" * 100_000
    text = {
        "top": deep,
        "references": f'[{{"path": "{A}", "references": {deep}}}]',
        "path": f'[{{"path": {deep}}}]',
    }[where]
    graph = tmp_path / "graph.json"
    graph.write_text(text)
    one_error(capsys, ["rank", str(graph)], f"malformed JSON in {graph}", "nested too deeply")


def test_nesting_just_under_the_parser_limit_is_one_line(capsys, tmp_path):
    graph = tmp_path / "graph.json"
    graph.write_text(f'[{{"path": "{A}", "references": ' + "[" * 900 + "]" * 900 + "}]")
    one_error(capsys, ["rank", str(graph)], "bad reference [[[")


def test_fifo_and_device_graphs_are_refused_by_type(tmp_path):
    fifo = tmp_path / "graph.json"
    os.mkfifo(fifo)
    assert_one_line(run_cli("rank", str(fifo)), f"graph {fifo}: is a fifo")
    assert_one_line(run_cli("plan", "/dev/zero"), "graph /dev/zero: is a character device")
    info = tmp_path / "closure-info"
    info.mkdir()
    (info / "store-paths").write_text(A + "\n")
    os.mkfifo(info / "registration")
    assert_one_line(run_cli("rank", str(info)), "registration: is a fifo")


def test_graph_too_large_to_hold_is_one_line(tmp_path):
    """A sparse 8 GiB graph in a process allowed 2 GiB of address space: the
    file cannot be read into memory, said in one line naming it."""
    import resource

    graph = tmp_path / "graph.json"
    with open(graph, "wb") as f:
        f.write(b"[")
        f.truncate(8 << 30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    r = subprocess.run([sys.executable, "-m", "fastlayer", "rank", str(graph)], preexec_fn=limit,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert_one_line(r, f"cannot read {graph}: out of memory")


def test_undecodable_graph_key_is_one_line(tmp_path):
    # A KEY argument of bytes that are not UTF-8 (Python holds them as surrogates).
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps({"graph": [{"path": A, "references": []}]}))
    assert_one_line(run_cli("rank", str(graph), "k\udcff"), "no key 'k\\udcff'")


@pytest.mark.parametrize(
    "registration,needle",
    [
        (f"{A}\n{HASH}\n-5\n\n0\n".encode(), f"bad narSize -5 for {A}"),
        (f"{A}\n{HASH}\n{2**70}\n\n0\n".encode(), "bad narSize"),
        (b"\xff\xfe\n", "registration is not UTF-8 text"),
        (f"{A}\n\n99\n".encode(), "malformed registration record"),
    ],
)
def test_bad_closure_info_is_one_line(capsys, tmp_path, registration, needle):
    info = tmp_path / "closure-info"
    info.mkdir()
    (info / "store-paths").write_text(A + "\n")
    (info / "registration").write_bytes(registration)
    one_error(capsys, ["rank", str(info)], str(info), needle)


# --- Plans -----------------------------------------------------------------


@pytest.fixture
def graph_file(tmp_path: Path) -> Path:
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps([node(A, narSize=10, references=[B]), node(B, narSize=5)]))
    return graph


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--base-layers", "-10"], "--base-layers: -10 is out of range [0, 10000]"),
        (["--base-layers", "99999999999999999999"], "--base-layers: "),
        (["--max-layers", "0"], "--max-layers: 0 is out of range [1, 10000]"),
        (["--max-layers", "-3"], "--max-layers: -3 is out of range"),
        (["--max-layers", "100000"], "--max-layers: 100000 is out of range"),
        (["--max-layers", "5", "--base-layers", "4"], "leaves no layer for store paths"),
    ],
)
def test_plan_budget_arguments_are_range_checked(capsys, tmp_path, graph_file, args, needle):
    out = tmp_path / "plan.json"
    one_error(capsys, ["plan", str(graph_file), "-o", str(out), *args], needle)
    assert not out.exists()


def test_negative_base_layers_never_widen_the_budget():
    from fastlayer.plan import store_layer_budget

    with pytest.raises(FastlayerError, match="base layers: -10 is out of range"):
        store_layer_budget(5, -10)
    assert store_layer_budget(5, 1) == 3


@pytest.mark.parametrize(
    "plan,needle",
    [
        ({"version": "1", "layers": []}, "unsupported plan version '1'"),
        ({"version": True, "layers": []}, "unsupported plan version True"),
        ({"version": 1, "layers": "abc"}, "layers: must be a list, not a string"),
        ({"version": 1, "layers": [{"paths": A}]}, "malformed layer 0"),
        ({"version": 1, "layers": [{"paths": [A], "size": "1"}]}, "malformed layer 0"),
        ({"version": 1, "layers": [{"paths": [A], "size": -1}]}, "layers[0].size: -1 is out"),
        ({"version": 1, "layers": [{"paths": [A], "size": 2**70}]}, "layers[0].size: "),
        ({"version": 1, "layers": [], "budget": -1}, "budget: -1 is out of range"),
        ({"version": 1, "layers": [], "strategy": 5}, "strategy: must be a string"),
        ([1], "not a fastlayer plan"),
    ],
)
def test_previous_plan_is_schema_checked(capsys, tmp_path, graph_file, plan, needle):
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps(plan))
    argv = ["plan", str(graph_file), "--strategy", "stable", "--previous", str(previous)]
    one_error(capsys, argv, str(previous), needle)


def test_deep_previous_plan_is_one_line(capsys, tmp_path, graph_file):
    previous = tmp_path / "previous.json"
    previous.write_text('{"version": 1, "layers": ' + "[" * 5000 + "]" * 5000 + "}")
    argv = ["plan", str(graph_file), "--strategy", "stable", "--previous", str(previous)]
    one_error(capsys, argv, "nested")


def test_fifo_plan_pipeline_and_exclude_are_refused_by_type(tmp_path, graph_file):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    g = str(graph_file)
    assert_one_line(run_cli("plan", g, "--strategy", "stable", "--previous", str(fifo)), "fifo")
    assert_one_line(run_cli("plan", g, "--strategy", "pipeline", "--pipeline", str(fifo)), "fifo")
    assert_one_line(run_cli("plan", g, "--exclude", str(fifo)), "exclude list")
    assert_one_line(run_cli("plan", g, "--exclude", "/dev/zero"), "character device")


@pytest.mark.parametrize(
    "steps,needle",
    [
        ([["subcomponent_out", 5]], "subcomponent_out: needs a list of paths"),
        ([["remove_paths", [5]]], "remove_paths: needs a list of paths"),
        ([["limit_layers", True]], "limit_layers: needs a count > 0"),
        ([["split_every", 2.5]], "split_every: needs a count > 0"),
        ([["split_paths", 5]], "split_paths: needs a list"),
        ([["over", ["main"], ["reverse"]]], "over: the key must be a string"),
    ],
)
def test_pipeline_arguments_are_checked(steps, needle):
    graph = graph_from_json([node(A, references=[B]), node(B)])
    with pytest.raises(FastlayerError, match=needle):
        pipeline_layers(graph, steps)


def test_deeply_nested_pipeline_is_one_error():
    steps: list = ["flatten"]
    for _ in range(5000):
        steps = ["map", steps]
    graph = graph_from_json([node(A)])
    with pytest.raises(FastlayerError, match="nested deeper than 64"):
        pipeline_layers(graph, [steps])


# --- Nix inputs ------------------------------------------------------------


def test_nar_hash_refuses_fifos_and_devices_by_type(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok").write_text("x")
    os.mkfifo(tree / "pipe")
    assert_one_line(run_cli("nar-hash", str(tree / "pipe")), "a fifo cannot go into a NAR")
    assert_one_line(run_cli("nar-hash", "/dev/zero"), "a device node cannot go into a NAR")
    assert_one_line(run_cli("nar-hash", str(tree)), f"{tree}/pipe: a fifo cannot go into a NAR")


def test_nar_hash_and_scan_jobs_are_range_checked(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    one_error(capsys, ["nar-hash", "-j", "-3", str(tmp_path / "f")], "--jobs: -3 is out of range")
    one_error(capsys, ["graph", "scan", str(tmp_path), "-j", "0"], "--jobs: 0 is out of range")


@pytest.mark.parametrize(
    "nar_hash",
    ["sha256-!!!", "sha256:" + "z" * 64, "sha256:" + "e" * 52, "md5:abc", "sha256-AAAA"],
)
def test_bad_nar_hash_in_graph_never_reaches_a_database(capsys, tmp_path, nar_hash):
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps([node(A, narHash=nar_hash, narSize=8)]))
    root = tmp_path / "root"
    one_error(capsys, ["nix-db", str(graph), str(root)], A, "unrecognised narHash")
    assert not root.exists()


def test_graph_nar_hash_and_size_go_into_the_database(capsys, tmp_path):
    import sqlite3

    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps([node(A, narHash=HASH, narSize=8)]))
    assert main(["nix-db", str(graph), str(tmp_path / "root")]) == 0
    db = sqlite3.connect(tmp_path / "root/nix/var/nix/db/db.sqlite")
    assert db.execute("select path, hash, narSize from ValidPaths").fetchall() == [
        (A, "sha256:" + "0" * 64, 8)
    ]


@pytest.mark.parametrize(
    "args,env,needle",
    [
        (["--registration-time", "-5"], {}, "--registration-time: -5 is out of range"),
        ([], {"SOURCE_DATE_EPOCH": "abc"}, "SOURCE_DATE_EPOCH: not epoch seconds: 'abc'"),
        ([], {"SOURCE_DATE_EPOCH": "1" * 40}, "SOURCE_DATE_EPOCH: "),
    ],
)
def test_registration_time_is_checked(tmp_path, args, env, needle):
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps([node(A, narHash=HASH, narSize=8)]))
    root = tmp_path / "root"
    assert_one_line(run_cli("nix-db", str(graph), str(root), *args, env=env), needle)
    assert not root.exists()


def test_edge_times_are_accepted():
    spec = load_spec({"name": "app", "created": "9999-12-31T23:59:59Z", "mtime": 0})
    assert (spec.created, spec.mtime) == ("9999-12-31T23:59:59Z", "1970-01-01T00:00:00+00:00")


def test_control_characters_in_a_name_cannot_split_the_error_line(tmp_path, capsys):
    # A path from the spec is echoed in the error: its newline and escape
    # sequence must come out escaped, on the one line.
    spec = tmp_path / "spec.json"
    body = {"name": "app", "store_root": "a\nb\x1b[31m", "contents": {"store_paths": [A]}}
    body["contents"]["graph"] = str(tmp_path / "g.json")
    (tmp_path / "g.json").write_text("[]")
    spec.write_text(json.dumps(body))
    line = one_error(capsys, ["build", str(spec), "-o", str(tmp_path / "o.tar")], "a\\nb\\x1b[31m")
    assert "\x1b" not in line


# --- plan and rank -o follow every command's -o rules --------------------------------

RANKED = f"{B}\n{A}\n"  # A references B: B is reached from A too, so more popular


@pytest.mark.parametrize("command", ["rank", "plan"])
def test_plan_and_rank_output_keeps_a_symlink_and_its_file(tmp_path, graph_file, command):
    graph = graph_file
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main([command, str(graph), "-o", str(link)]) == 0
    assert link.is_symlink() and A in real.read_text()


@pytest.mark.parametrize("command", ["rank", "plan"])
def test_plan_and_rank_stream_into_a_fifo_and_a_device(tmp_path, graph_file, command):
    graph = graph_file
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    r = run_cli(command, str(graph), "-o", str(fifo))
    got = reader.communicate(timeout=30)[0].decode()
    assert r.returncode == 0, r.stderr
    assert fifo.is_fifo() and A in got
    if command == "rank":
        assert got == RANKED
    if os.geteuid() == 0:  # a character device of our own, never the machine's /dev
        dev = tmp_path / "null"
        os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
        assert main([command, str(graph), "-o", str(dev)]) == 0
        assert dev.is_char_device()


def test_rank_output_dash_is_stdout(tmp_path, graph_file, capsys):
    graph = graph_file
    assert main(["rank", str(graph), "-o", "-"]) == 0
    assert capsys.readouterr().out == RANKED
    assert not (tmp_path / "-").exists() and not os.path.exists("-")


def test_plan_output_directory_names_the_users_path(tmp_path, graph_file, capsys):
    graph = graph_file
    target = tmp_path / "d"
    target.mkdir()
    line = one_error(capsys, ["plan", str(graph), "-o", str(target)], f"cannot write {target}")
    assert ".part" not in line and os.listdir(target) == []
