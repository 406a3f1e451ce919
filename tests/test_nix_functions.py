"""nix/default.nix with real Nix: dockerTools' functions, built by fastlayer.

Every image here is built by nix-build from real Nix-built closures (busybox
copied into a store path, a greeting, a tree to copy to /). Test-only choice:
the suite's Nix runs with `sandbox = false` (tests/nixbuild.py), so the
`fastlayer` given to the functions can be a store path holding a wrapper that
runs this worktree's sources with the test's Python. A real user passes
nix/package.nix's derivation, which runs in the sandbox as it is.

The builds are shared: one nix-build of every image (module fixture), one
registry holding the base image that `pullImage` pulls.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import validators
from nixbuild import closure_in_store, nix_env, verify_store

import fastlayer

REPO = Path(__file__).resolve().parent.parent
# where the fastlayer under test lives: site-packages once installed (CI's
# `pip install .`), src/ in a development tree; its native modules are built there
SRC = Path(fastlayer.__file__).resolve().parent.parent
pytestmark = pytest.mark.validators

# Closures built with /bin/sh of this machine (sandbox off, as in test_nix_db.py).
PRELUDE = r"""
let
  toolsWith = pkgs: import @REPO@/nix { fastlayer = @FASTLAYER@; inherit pkgs; };
  tools = toolsWith null;
  mk = name: script: builtins.derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  bb = mk "fl13-busybox" ''
    /bin/mkdir -p $out/bin; /bin/cp /bin/busybox $out/bin/busybox
    for a in sh cat ls mkdir; do /bin/ln -s busybox $out/bin/$a; done
  '';
  greeting = mk "fl13-greeting"
    "/bin/mkdir -p $out/share; echo hello from nix > $out/share/greeting";
  root = mk "fl13-root" ''
    /bin/mkdir -p $out/bin $out/etc; echo welcome > $out/etc/motd
    printf '#!${bb}/bin/sh\necho copied root\n' > $out/bin/hello; /bin/chmod 755 $out/bin/hello
  '';
  registry = "@REGISTRY@";
  base = tools.buildLayeredImage {
    name = "${registry}/team/base";
    tag = "1";
    contents = [ bb tools.fakeNss ];
    config.Env = [ "PATH=/bin" "FROM=base" ];
  };
  app = extra: {
    name = "${registry}/team/app";
    contents = [ greeting ];
    config = { Cmd = [ "/bin/cat" "/share/greeting" ]; Env = [ "APP=1" ]; };
    maxLayers = 10;
    extraCommands = "/bin/mkdir -p tmp";
    fakeRootCommands = "/bin/mkdir -p data; echo x > data/file";
    permissions = [ { path = "/data*"; uid = 1000; gid = 1000; mode = "0750"; } ];
  } // extra;
in
"""

MAIN = r"""rec {
  inherit base bb greeting root;
  stream = tools.streamLayeredImage (app { fromImage = base; });
  built = tools.buildLayeredImage (app { fromImage = base; });
  oci = tools.buildLayeredImage (app { fromImage = base; format = "oci-archive"; });
  gz = tools.buildLayeredImage (app { fromImage = base; compressor = "gz"; });
  ocidir = tools.buildLayeredImage (app { fromImage = base; format = "oci-dir"; });
  # with pkgs, extraCommands find tools on PATH (busybox standing in for coreutils...)
  withPkgs = (toolsWith { coreutils = bb; findutils = bb; gnused = bb; gnugrep = bb; })
    .buildLayeredImage { name = "with-pkgs"; tag = "1"; extraCommands = "mkdir -p by-path"; };
  nixdb = tools.buildLayeredImage {
    name = "nixdb"; tag = "1"; contents = [ greeting ]; includeNixDB = true;
  };
  single = tools.buildImage {
    name = "${registry}/team/single"; tag = "1"; fromImage = base;
    copyToRoot = [ root ]; config.Cmd = [ "/bin/hello" ];
  };
  merged = tools.mergeImages [ base single ];
  fakeNss = tools.fakeNss;
}"""

INFO = r"""let s = (MAIN); in {
  inherit (s.stream) imageName imageTag conf spec;
  builtTag = s.built.imageTag;
  builtName = s.built.imageName;
  isExe = s.stream.isExe;
  streamDrv = s.stream.name;
  builtDrv = s.built.name;
  singleTag = s.single.imageTag;
}"""

PULL = r"""rec {
  pulled = tools.pullImage {
    imageName = "${registry}/team/base"; imageDigest = "@DIGEST@"; hash = "@HASH@";
    tlsVerify = false; finalImageName = "pulled/base"; finalImageTag = "1";
  };
  onPulled = tools.buildLayeredImage (app {
    tag = "on-pulled"; fromImage = pulled;
  });
}"""

WRONG_HASH = "sha256-" + "A" * 43 + "="


class Nix:
    def __init__(self, work: Path, registry: str):
        validators.require_root("nix-build into the real /nix/store")
        self.nix_build = validators.require("nix-build")
        self.nix_instantiate = validators.require("nix-instantiate")
        self.work = work
        wrapper = work / "fastlayer" / "bin" / "fastlayer"
        wrapper.parent.mkdir(parents=True)
        wrapper.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(SRC)!r})\n"
            "from fastlayer.cli import main\nraise SystemExit(main())\n"
        )
        wrapper.chmod(0o755)
        self.prelude = (
            PRELUDE.replace("@REPO@", str(REPO))
            .replace("@FASTLAYER@", str(wrapper.parent.parent))
            .replace("@REGISTRY@", registry)
        )

    def expr(self, body: str, name: str) -> Path:
        path = self.work / f"{name}.nix"
        path.write_text(self.prelude + body)
        return path

    def build(self, body: str, attrs: list[str], name: str) -> dict[str, Path]:
        argv = [self.nix_build, str(self.expr(body, name)), "--no-out-link"]
        for a in attrs:
            argv += ["-A", a]
        proc = self.run(argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(zip(attrs, map(Path, proc.stdout.split()), strict=True))

    def eval(self, body: str, name: str) -> subprocess.CompletedProcess:
        # --eval is read-only by default: a path literal (the fastlayer wrapper) that
        # no nix-build has copied in yet would be "not valid" (seen in random order)
        argv = [self.nix_instantiate, "--eval", "--strict", "--json", "--read-write-mode",
                str(self.expr(body, name))]  # fmt: skip
        return self.run(argv)

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=nix_env(), timeout=600)


@pytest.fixture(scope="module")
def nix(tmp_path_factory, registry) -> Nix:
    return Nix(tmp_path_factory.mktemp("nixfn"), registry.host)


@pytest.fixture(scope="module")
def images(nix) -> dict[str, Path]:
    attrs = ["base", "greeting", "root", "stream", "built", "oci", "gz", "ocidir", "withPkgs"]
    attrs += ["nixdb", "single"]
    return nix.build(MAIN, [*attrs, "merged", "fakeNss"], "main")


@pytest.fixture(scope="module")
def info(nix, images) -> dict:
    proc = nix.eval(INFO.replace("MAIN", MAIN), "info")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def archive(path: Path) -> validators.DockerArchive:
    return validators.read_docker_archive(path)


def layer_members(path: Path, layer: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as outer:
        inner = tarfile.open(fileobj=outer.extractfile(layer))
        return {m.name: m for m in inner.getmembers()}


def test_streamed_built_and_stream_nix_are_one_image(nix, images, info, tmp_path):
    streamed = tmp_path / "streamed.tar"
    with open(streamed, "wb") as out:
        subprocess.run([images["stream"]], stdout=out, check=True, timeout=300)
    by_cli = tmp_path / "cli.tar"
    subprocess.run(
        [sys.executable, "-m", "fastlayer", "stream-nix", info["conf"], "-o", by_cli, "-q"],
        check=True, timeout=300, env={**nix_env(), "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    built = images["built"].read_bytes()
    assert streamed.read_bytes() == built
    assert by_cli.read_bytes() == built
    conf = json.loads(Path(info["conf"]).read_text())
    assert set(conf) >= {"store_layers", "customisation_layer", "from_image", "repo_tag"}
    assert conf["from_image"] == str(images["base"])
    assert info["isExe"] is True


def test_name_with_registry_and_slashes(registry, images, info):
    name = f"{registry.host}/team/app"
    # the untagged image: the hash part of its conf's store path, known before any build
    tag = Path(info["conf"]).parent.name[:32]
    assert re.fullmatch(r"[0-9a-z]{32}", tag)
    assert (info["imageName"], info["imageTag"]) == (name, tag)
    assert (info["builtName"], info["builtTag"]) == (name, tag)
    assert archive(images["built"]).manifest[0]["RepoTags"] == [f"{name}:{tag}"]
    # derivation names: the name's last component only
    assert (info["streamDrv"], info["builtDrv"]) == ("stream-app", "app.tar")
    assert images["built"].name.endswith("-app.tar")
    assert images["oci"].name.endswith("-app-oci.tar")
    assert images["gz"].name.endswith("-app.tar.gz")


def test_from_image_built_by_the_functions(images):
    base, app = archive(images["base"]), archive(images["built"])
    n = len(base.layer_digests)
    assert app.layer_digests[:n] == base.layer_digests
    diff_ids = app.config["rootfs"]["diff_ids"]
    assert diff_ids == ["sha256:" + d for d in app.layer_digests]
    assert app.config["config"]["Env"] == ["PATH=/bin", "FROM=base", "APP=1"]
    # greeting's one store layer, then the customisation layer
    assert len(app.layer_digests) == n + 2
    custom = layer_members(images["built"], app.layer_names[-1])
    assert custom["/share"].isdir()  # contents joined as symlinkJoin does
    assert custom["/share/greeting"].type == tarfile.SYMTYPE
    assert custom["/share/greeting"].linkname == f"{images['greeting']}/share/greeting"
    assert custom["/tmp"].isdir()
    # fakeRootCommands ran; owners and modes come from `permissions`
    assert (custom["/data"].uid, custom["/data"].gid, custom["/data"].mode) == (1000, 1000, 0o750)
    assert (custom["/data/file"].uid, custom["/data/file"].mode) == (1000, 0o750)


def test_podman_runs_the_built_image(podman, images, info):
    names = podman.load(images["built"])
    assert any(n.endswith(f"/team/app:{info['imageTag']}") for n in names), names
    ref = f"{info['imageName']}:{info['imageTag']}"
    assert podman.run(ref) == "hello from nix\n"
    # the base's busybox and fakeNss, the app's customisation layer
    out = podman.run(ref, "/bin/sh", "-c", "echo $FROM $APP; ls /data; cat /etc/passwd")
    assert out.splitlines()[:2] == ["base 1", "file"]
    assert "nobody:x:65534:65534:nobody:/var/empty:/bin/sh" in out.splitlines()


def test_oci_archive_and_gzip_hold_the_same_layers(images, tmp_path):
    want = archive(images["built"]).config["rootfs"]["diff_ids"]
    skopeo = validators.require("skopeo")
    policy = tmp_path / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    validators.run_tool([
        skopeo, "--policy", policy, "copy", "--quiet",
        f"oci-archive:{images['oci']}", f"dir:{tmp_path / 'dir'}",
    ])  # fmt: skip
    validators.run_tool([
        skopeo, "--policy", policy, "copy", "--quiet",
        f"oci:{images['ocidir']}", f"dir:{tmp_path / 'dir2'}",
    ])  # fmt: skip
    for d in ("dir", "dir2"):
        manifest = json.loads((tmp_path / d / "manifest.json").read_text())
        config = json.loads((tmp_path / d / manifest["config"]["digest"][7:]).read_text())
        assert config["rootfs"]["diff_ids"] == want
    assert images["gz"].read_bytes()[:2] == b"\x1f\x8b"
    with gzip.open(images["gz"]) as f, tarfile.open(fileobj=f) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == archive(images["built"]).manifest[0]["RepoTags"]


def test_extra_commands_use_the_tools_of_pkgs(images):
    with_pkgs = archive(images["withPkgs"])
    custom = layer_members(images["withPkgs"], with_pkgs.layer_names[-1])
    assert custom["/by-path"].isdir()


def test_include_nix_db_verifies_with_nix_store(images, tmp_path):
    rootfs = validators.umoci_unpack(
        validators.skopeo_copy_to_oci(images["nixdb"], tmp_path / "oci", "t"),
        "t",
        tmp_path / "bundle",
    )
    check = tmp_path / "check"
    shutil.copytree(rootfs, check, symlinks=True)  # nix-store may repair what it checks
    r = verify_store(check)
    assert r.returncode == 0, r.stderr
    greeting = str(images["greeting"])
    host = subprocess.run(
        [validators.require("nix-store"), "-qR", greeting],
        check=True, capture_output=True, text=True, env=nix_env(),
    ).stdout.split()  # fmt: skip
    assert sorted(closure_in_store(check, greeting)) == sorted(host)
    assert (rootfs / "nix/var/nix/gcroots/docker" / images["greeting"].name).readlink() == Path(
        greeting
    )


def test_build_image_copies_to_root(podman, images, info):
    single = archive(images["single"])
    base = archive(images["base"])
    assert single.layer_digests[: len(base.layer_digests)] == base.layer_digests
    assert len(single.layer_digests) == len(base.layer_digests) + 2  # closure + customisation
    custom = layer_members(images["single"], single.layer_names[-1])
    assert custom["/bin/hello"].isfile() and custom["/etc/motd"].isfile()  # copied, not linked
    store = layer_members(images["single"], single.layer_names[-2])
    assert f"{images['root']}"[1:] in {n.lstrip("/").rstrip("/") for n in store}
    podman.load(images["single"])
    assert podman.run(single.manifest[0]["RepoTags"][0]) == "copied root\n"


def test_merge_images_and_fake_nss(podman, images):
    merged = images["merged"]
    with tarfile.open(merged) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    tags = [m["RepoTags"] for m in manifest]
    assert tags == [archive(images["base"]).manifest[0]["RepoTags"],
                    archive(images["single"]).manifest[0]["RepoTags"]]  # fmt: skip
    loaded = podman.load(merged)
    assert {t[0] for t in tags} <= {n.removeprefix("localhost/") for n in loaded}, loaded
    nss = images["fakeNss"]
    assert (nss / "etc/passwd").read_text().splitlines() == [
        "root:x:0:0:root user:/var/empty:/bin/sh",
        "nobody:x:65534:65534:nobody:/var/empty:/bin/sh",
    ]
    assert (nss / "etc/group").read_text() == "root:x:0:\nnobody:x:65534:\n"
    assert (nss / "etc/nsswitch.conf").read_text() == "hosts: files dns\n"
    assert (nss / "var/empty").is_dir() and not any((nss / "var/empty").iterdir())


def test_pull_image_by_digest_with_the_right_and_a_wrong_hash(
    nix, registry, images, podman, tmp_path
):
    skopeo = validators.require("skopeo")
    policy = tmp_path / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    ref = f"{registry.host}/team/base:1"
    validators.run_tool([
        skopeo, "--policy", policy, "copy", "--quiet", "--dest-tls-verify=false",
        f"docker-archive:{images['base']}", f"docker://{ref}",
    ])  # fmt: skip
    inspected = validators.run_tool([skopeo, "inspect", "--tls-verify=false", f"docker://{ref}"])
    digest = json.loads(inspected)["Digest"]
    body = PULL.replace("@DIGEST@", digest)

    wrong = nix.run(
        [nix.nix_build, str(nix.expr(body.replace("@HASH@", WRONG_HASH), "pull-wrong")),
         "--no-out-link", "-A", "pulled"]
    )  # fmt: skip
    assert wrong.returncode != 0
    assert "hash mismatch" in wrong.stderr, wrong.stderr[-2000:]
    got = re.search(r"got:\s+(sha256-[A-Za-z0-9+/]{43}=)", wrong.stderr)
    assert got, wrong.stderr[-2000:]

    out = nix.build(body.replace("@HASH@", got[1]), ["pulled", "onPulled"], "pull")
    pulled, base = archive(out["pulled"]), archive(images["base"])
    assert pulled.layer_digests == base.layer_digests  # every layer as pushed
    assert pulled.manifest[0]["RepoTags"] == ["pulled/base:1"]
    app = archive(out["onPulled"])
    assert app.layer_digests[: len(base.layer_digests)] == base.layer_digests
    podman.load(out["onPulled"])
    assert podman.run(f"{registry.host}/team/app:on-pulled") == "hello from nix\n"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            'tools.streamLayeredImage { name = "a"; maxLayer = 3; colour = "red"; }',
            "fastlayer streamLayeredImage: unknown argument(s) colour, maxLayer",
        ),
        (
            'tools.buildLayeredImage { name = "a"; enableFakechroot = true; }',
            "enableFakechroot is not supported",
        ),
        ('tools.buildImage { name = "a"; runAsRoot = "id"; }', "runAsRoot needs root"),
        ('tools.pullImage { imageName = "a"; }', "missing argument(s) imageDigest"),
    ],
)
def test_bad_arguments_are_evaluation_errors(nix, call, message):
    proc = nix.eval(f"({call}).drvPath", "bad")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("spec", "args", "message"),
    [
        ({"name": "a", "tag": "1", "os": "windows"}, [], "cannot express os"),
        ({"name": "a"}, [], "has no tag and"),
        ({"name": "a", "tag": "1"}, ["--script", "s"], "--script needs --fastlayer"),
        ({"other": {"name": "a"}}, ["--key", "spec"], "no object under key 'spec'"),
    ],
)
def test_nix_conf_refuses_in_one_line(tmp_path, capsys, spec, args, message):
    from fastlayer.cli import main

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert main(["nix-conf", str(path), "-o", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastlayer: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_fake_nss_and_nix_conf_never_write_into_an_existing_path(tmp_path, capsys):
    from fastlayer.cli import main

    (tmp_path / "spec.json").write_text('{"name": "a", "tag": "1"}')
    for argv in (
        ["fake-nss", str(tmp_path)],
        ["nix-conf", str(tmp_path / "spec.json"), "-o", str(tmp_path)],
    ):
        assert main(argv) == 1
        assert "exists; give a new directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]
