"""What a newcomer sees (issue 11 items 3, 5, 6): `--version`, no silent
surprises (compression, graph scan, strategy, OCI names, progress, push
counts, inspect), and spec errors that name the key and suggest the one meant."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
import validators
from closures import busybox_closure
from tqdm import tqdm

import fastlayer

SRC = str(Path(fastlayer.__file__).resolve().parent.parent)
REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastlayer", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "PYTHONPATH": SRC, **(env or {})},
    )


def one_error(r: subprocess.CompletedProcess, *parts: str) -> str:
    """The run failed with exactly one error line holding every part."""
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlayer: error: "), r.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def declared_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)


@pytest.fixture(scope="module")
def closure(tmp_path_factory):
    root = tmp_path_factory.mktemp("closure") / "root"
    paths, graph = busybox_closure(root)
    return root, paths, graph


def closure_spec(closure, **extra) -> dict:
    root, paths, graph = closure
    return {
        "name": "reg.example:5000/team/app",
        "tag": "1.0",
        "store_root": str(root),
        "contents": {"store_paths": [paths["busybox"]], "graph": str(graph)},
        "config": {"Cmd": ["/bin/sh", "-c", "cat /share/greeting"]},
        **extra,
    }


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- item 3: --version ---------------------------------------------------------------


def test_version_option_and_attribute():
    r = cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"fastlayer {declared_version()}\n" and r.stderr == ""
    assert fastlayer.__version__ == declared_version()


def test_version_in_a_source_tree_that_is_not_installed(tmp_path, monkeypatch):
    """No distribution metadata: pyproject.toml's version; no pyproject either: 0+unknown."""
    tree = tmp_path / "checkout"
    (tree / "src" / "fastlayer").mkdir(parents=True)
    init = tree / "src" / "fastlayer" / "__init__.py"
    shutil.copy(Path(fastlayer.__file__), init)
    (tree / "pyproject.toml").write_text('[project]\nname = "fastlayer"\nversion = "9.8.7"\n')

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    spec = importlib.util.spec_from_file_location("fastlayer_checkout", init)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.__version__ == "9.8.7"
    (tree / "pyproject.toml").unlink()
    assert copy.__version__ == "0+unknown"


# --- item 5: compression from the spec, the extension, --compress ------------------


def is_gzip(path: Path) -> bool:
    return path.read_bytes()[:2] == b"\x1f\x8b"


def test_spec_compression_contradicted_by_the_extension_is_refused(tmp_path):
    spec = write_spec(tmp_path / "s.toml", 'name = "app"\ncompression = "gzip"\n')
    out = tmp_path / "app.tar"
    r = cli("build", str(spec), "-o", str(out), "-q")
    one_error(r, str(spec), 'compression = "gzip"', str(out), "uncompressed", "--compress")
    assert not out.exists()
    r = cli("build", str(spec), "-o", str(tmp_path / "app.tar.zst"), "-q")
    one_error(r, 'compression = "gzip"', "app.tar.zst", "zstd")


def test_compression_rule_compress_then_extension_then_spec(tmp_path):
    gz = write_spec(tmp_path / "gz.toml", 'name = "app"\ncompression = "gzip"\n')
    plain = write_spec(tmp_path / "plain.toml", 'name = "app"\n')
    cases = [
        (gz, "a.tar", ["--compress", "none"], False),  # --compress wins over both
        (gz, "b.tar.gz", [], True),  # spec and extension agree
        (gz, "c.img", [], True),  # no extension to go by: the spec
        (plain, "d.tar.gz", [], True),  # the default none: the extension decides
        (plain, "e.tar", ["--compress", "gzip"], True),
    ]
    for spec, name, extra, gzipped in cases:
        out = tmp_path / name
        r = cli("build", str(spec), "-o", str(out), "-q", *extra)
        assert r.returncode == 0, (name, r.stderr)
        assert is_gzip(out) == gzipped, name
        data = gzip.decompress(out.read_bytes()) if gzipped else out.read_bytes()
        assert b"manifest.json" in data  # a docker-archive either way


def test_oci_archive_tar_name_keeps_the_spec_layer_compression(tmp_path):
    """An OCI archive is always a plain tar; the spec's compression is its layers'."""
    spec = write_spec(tmp_path / "s.toml", 'name = "app"\ntag = "1"\ncompression = "zstd"\n')
    out = tmp_path / "oci.tar"
    r = cli("build", str(spec), "-o", str(out), "--format", "oci-archive", "-q")
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:  # plain tar: would fail on a compressed file with "r:"
        index = json.load(tar.extractfile("index.json"))
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{digest}"))
    assert [x["mediaType"] for x in manifest["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+zstd"
    ]


# --- item 5: graph scan, strategy, inspect -------------------------------------------


def test_graph_scan_of_a_directory_without_store_paths_says_what_one_looks_like(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "hello-2.12").mkdir()  # no hash part
    (store / "README").write_text("x")
    r = cli("graph", "scan", str(store))
    line = one_error(r, str(store), "no store paths", "32 nix-base32 characters", "'README'")
    assert "none of its 2 entries" in line
    assert r.stdout == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error(cli("graph", "scan", str(empty)), str(empty), "it is empty")
    # a real store path name is still scanned
    (store / ("0c7pqrk3bn2yz8z3nb8vvvk1i4ka0x1n-hello-2.12")).mkdir()
    r = cli("graph", "scan", str(store))
    assert r.returncode == 0, r.stderr
    assert [x["path"] for x in json.loads(r.stdout)] == [
        f"{store}/0c7pqrk3bn2yz8z3nb8vvvk1i4ka0x1n-hello-2.12"
    ]


def test_unknown_strategy_is_refused_without_store_paths(tmp_path):
    spec = write_spec(tmp_path / "s.toml", 'name = "app"\nstrategy = "popular"\n')
    r = cli("build", str(spec), "-o", str(tmp_path / "o.tar"))
    one_error(r, str(spec), "strategy must be one of popularity, limit", "'popular'")
    assert not (tmp_path / "o.tar").exists()


def test_inspect_counts_one_layer_and_refuses_a_non_image_in_one_line(tmp_path):
    spec = write_spec(tmp_path / "s.toml", 'name = "app"\ntag = "1"\n')
    out = tmp_path / "one.tar"
    assert cli("build", str(spec), "-o", str(out), "-q").returncode == 0
    r = cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert ", 1 layer, " in r.stdout and "1 layers" not in r.stdout
    text = tmp_path / "notes.txt"
    text.write_text("these are notes, not an image\n" * 50)
    one_error(cli("inspect", str(text)), str(text), "not a tar archive")


# --- item 6: spec errors name the file and the key, and suggest the one meant ----------

TOP_KEYS = "known keys: name, tag, contents"


@pytest.mark.parametrize(
    "toml,expected",
    [
        ("max_layer = 3", "unknown key 'max_layer' (did you mean max_layers?); " + TOP_KEYS),
        ("stratgy = 'auto'", "unknown key 'stratgy' (did you mean strategy?)"),
        ("zzz = 1", "unknown key 'zzz'; " + TOP_KEYS),
        (
            "[contents]\nroot = ['.']",
            "contents: unknown key 'root' (did you mean roots?); known keys: store_paths, graph,"
            " roots, files, link_store_paths",
        ),
        (
            "[config]\ncmd = ['x']",
            "config: unknown key 'cmd' (did you mean Cmd?); known keys: Cmd, Entrypoint, Env",
        ),
        (
            "[config.Healthcheck]\nTst = ['x']",
            "config.Healthcheck: unknown key 'Tst' (did you mean Test?); known keys: Test,",
        ),
        (
            "permissions = [{ path = '/x', mod = '0755' }]",
            "permissions[0]: unknown key 'mod' (did you mean mode?); "
            "known keys: path, uid, gid, mode",
        ),
        (
            "fake_nss = { pasword = [] }",
            "fake_nss: unknown key 'pasword' (did you mean passwd?); known keys: passwd, group",
        ),
        ("nix_db = true", "nix_db needs contents.graph"),
    ],
)
def test_spec_errors_name_the_file_and_suggest_the_key(tmp_path, toml, expected):
    spec = write_spec(tmp_path / "app.toml", f'name = "app"\n{toml}\n')
    r = cli("build", str(spec), "-o", str(tmp_path / "o.tar"))
    one_error(r, f"spec {spec}: ", expected)
    assert not (tmp_path / "o.tar").exists()


# --- item 5: OCI archives keep the image name ------------------------------------------


def test_oci_archive_loads_into_podman_under_its_name(tmp_path, closure, podman):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(closure_spec(closure)))
    out = tmp_path / "app-oci.tar"
    r = cli("build", str(spec), "-o", str(out), "--format", "oci-archive", "-q")
    assert r.returncode == 0, r.stderr
    loaded = podman.load(out)
    assert "reg.example:5000/team/app:1.0" in loaded, loaded
    assert podman.inspect("reg.example:5000/team/app:1.0")["RepoTags"] == [
        "reg.example:5000/team/app:1.0"
    ]
    r = cli("inspect", str(out))
    assert r.stdout.startswith(f"image {out}: reg.example:5000/team/app:1.0\n"), r.stdout


def test_oci_layout_tags_for_skopeo_and_fastlayer(tmp_path, closure):
    layout = tmp_path / "layout"
    for tag in ("1.0", "2.0"):
        spec = tmp_path / f"{tag}.json"
        spec.write_text(json.dumps(closure_spec(closure, tag=tag, config={"Cmd": [tag]})))
        r = cli("build", str(spec), "-o", str(layout), "--format", "oci-dir", "-q")
        assert r.returncode == 0, r.stderr
    index = json.loads((layout / "index.json").read_text())
    assert [m["annotations"] for m in index["manifests"]] == [
        {
            "org.opencontainers.image.ref.name": tag,
            "io.containerd.image.name": f"reg.example:5000/team/app:{tag}",
        }
        for tag in ("1.0", "2.0")
    ]
    # skopeo still finds an image of the layout by its tag
    policy = tmp_path / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    skopeo = validators.require("skopeo")
    info = json.loads(
        validators.run_tool([skopeo, "--policy", str(policy), "inspect", f"oci:{layout}:2.0"])
    )
    assert info["Digest"] == index["manifests"][1]["digest"]
    # fastlayer picks the same image by tag alone or by full reference
    for pick in ("2.0", "reg.example:5000/team/app:2.0"):
        base = fastlayer.open_image(str(layout), tag=pick)
        assert base.config["config"]["Cmd"] == ["2.0"], pick
        assert base.repo_tags == ["reg.example:5000/team/app:2.0"]
    child = tmp_path / "child.json"
    child.write_text(
        json.dumps(
            {"name": "child", "from_image": str(layout), "from_image_tag": "1.0", "tag": "c"}
        )
    )
    r = cli("build", str(child), "-o", str(tmp_path / "child.tar"), "-q")
    assert r.returncode == 0, r.stderr
    r = cli("inspect", "--json", str(tmp_path / "child.tar"))
    assert json.loads(r.stdout)["images"][0]["config"]["config"]["Cmd"] == ["1.0"]


# --- item 5: the progress bar's total ----------------------------------------------


def progress_screen(tmp_path: Path, spec: Path, out: Path) -> str:
    """What `fastlayer build` shows on a terminal (its stderr on a pty)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastlayer", "build", str(spec), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    return screen.decode(errors="replace")


def layer_bytes(archive: Path) -> int:
    """The sum of the layers' uncompressed sizes, read from the archive itself."""
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        return sum(tar.getmember(x).size for x in manifest[0]["Layers"])


@pytest.mark.parametrize("kind", ["no-store-paths", "store-paths", "compressed-base"])
def test_progress_total_is_the_image_size_by_the_last_layer(tmp_path, closure, kind):
    if kind == "no-store-paths":
        (tmp_path / "root").mkdir()
        (tmp_path / "root" / "data").write_bytes(os.urandom(300_000))
        spec = {"name": "app", "contents": {"roots": [str(tmp_path / "root")]}}
        n = 1
    elif kind == "store-paths":
        spec = closure_spec(closure)
        n = 3  # busybox, the greeting it refers to, the customisation layer
    else:  # a gzip base: its layers' sizes show only once decompressed
        base = tmp_path / "base.tar.gz"
        fastlayer.build(closure_spec(closure), str(base), compress="gzip")
        spec = {"name": "app", "from_image": str(base)}
        n = 4
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out.tar"
    text = progress_screen(tmp_path, path, out)
    total = tqdm.format_sizeof(layer_bytes(out), divisor=1024)
    frames = [f for f in re.split(r"[\r\n]", text) if f"layer {n}/{n}" in f]
    assert frames, text
    assert all(f"/{total} [" in f and "%|" in f for f in frames), (total, frames)
    assert "100%|" in frames[-1] and f" {total}/{total} [" in frames[-1], frames[-1]
    percents = [int(p) for p in re.findall(r"(\d+)%\|", text)]
    assert percents and max(percents) == 100, percents


# --- item 5: push counts layers, the config apart ------------------------------------


@pytest.mark.validators
def test_push_summary_counts_layers_and_the_config_apart(tmp_path, closure):
    from registry_fixture import Registry

    reg = Registry(tmp_path / "registry").start()
    try:
        spec = tmp_path / "s.json"
        spec.write_text(json.dumps(closure_spec(closure)))
        env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "DOCKER_CONFIG": str(tmp_path / "d")}
        dest = f"docker://{reg.host}/team/app:1.0"
        first = cli("push", "--insecure", str(spec), dest, env=env)
        assert first.returncode == 0, first.stderr
        assert (
            f"fastlayer: {reg.host}/team/app:1.0: 3 layers: 0 present, 0 mounted, 3 uploaded, "
            "3 compressed; config uploaded; " in first.stderr
        ), first.stderr
        again = cli("push", "--insecure", str(spec), dest, env=env)
        assert again.returncode == 0, again.stderr
        assert (
            "3 layers: 3 present, 0 mounted, 0 uploaded, 0 compressed; config present; "
            "0.0 MiB sent" in again.stderr
        ), again.stderr
    finally:
        reg.stop()
