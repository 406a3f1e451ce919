"""pull and push against a registry that lies, stalls, redirects and echoes secrets.

A malicious registry (hostile_registry.py) on 127.0.0.1 gives wrong digests,
redirects blob GETs and upload Locations to another port, echoes the
Authorization header, sends endless, stalled and huge bodies, and
malformed or wrongly typed JSON. Each run must end with exit 1 and one
stderr line, no traceback, within its deadline, and leave nothing in the
output directory; credentials must reach only the registry's own origin
(and the token realm it names), and never before the registry asks.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from hostile_registry import OCI_MANIFEST, Handler, Hostile, Image, sha

import fastlayer

SRC = str(Path(fastlayer.__file__).resolve().parent.parent)
USER, PASSWORD = "alice", "pa55-w0rd-hostile"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
FAST = ["--timeout", "6", "--stall-timeout", "2"]  # a hostile run ends within seconds


@pytest.fixture
def env(tmp_path):
    """No host credentials or cache; REGISTRY_AUTH_FILE written by creds()."""
    e = {**os.environ, "PYTHONPATH": SRC, "XDG_CACHE_HOME": str(tmp_path / "cache"),
         "DOCKER_CONFIG": str(tmp_path / "docker"), "HOME": str(tmp_path)}  # fmt: skip
    for k in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "http_proxy", "HTTP_PROXY", "all_proxy"):
        e.pop(k, None)
    return e


def creds(tmp_path: Path, env: dict, host: str) -> None:
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {host: {"auth": BASIC}}}))
    env["REGISTRY_AUTH_FILE"] = str(auth)


def cli(env: dict, *args: str, limit: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastlayer", *args], capture_output=True, text=True,
        timeout=limit, env=env,
    )  # fmt: skip


def pull(env: dict, host: str, ref: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli(env, "pull", "--insecure", "-q", *FAST, *extra, f"{host}/team/app{ref}",
               "-o", str(out / "img.tar"))  # fmt: skip


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith("fastlayer: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    return r.stderr


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    yield d
    assert list(d.iterdir()) == []  # nothing half-written, no temporary left


def echo_authorization(registry: Hostile) -> None:
    """401 with a basic challenge until Basic creds come, then an error that echoes them."""

    def gate(h: Handler, m) -> None:
        if h.headers.get("Authorization") != f"Basic {BASIC}":
            h.send(401, b"{}", {"WWW-Authenticate": 'Basic realm="hostile"'})
        else:
            body = json.dumps({"errors": [{"code": "DENIED", "message":
                   f"you sent {h.headers['Authorization']} ({PASSWORD}) \x1b[31m\r\n"
                   '{"token": "tok-abcdef-123"} ' + "x" * 500}]}).encode()  # fmt: skip
            h.send(400, body, {"Content-Type": "application/json"})

    registry.on("GET", r"/v2/.*", gate)


# -- credentials --------------------------------------------------------------------


def test_credentials_wait_for_a_challenge_and_never_follow_a_redirect(hostile, tmp_path, env, out):
    image = Image.make()
    cdn, registry = hostile().serve_image(image), hostile()
    creds(tmp_path, env, registry.host)

    def manifest(h: Handler, m) -> None:
        if h.headers.get("Authorization") != f"Basic {BASIC}":
            h.send(401, b"{}", {"WWW-Authenticate": 'Basic realm="hostile"'})
        else:
            h.send(200, image.manifest, {"Content-Type": OCI_MANIFEST})

    def redirect(h: Handler, m) -> None:  # a blob store elsewhere, as registries use CDNs
        h.send(307, b"", {"Location": f"http://{cdn.host}/v2/team/app/blobs/{m[1]}"})

    registry.on("GET", r"/v2/team/app/manifests/.*", manifest)
    registry.on("GET", r"/v2/team/app/blobs/(.*)", redirect)
    r = pull(env, registry.host, f"@{image.digest}", out)
    assert r.returncode == 0, r.stderr
    (out / "img.tar").unlink()
    assert "authorization" not in registry.seen[0].headers  # nothing before the 401
    assert registry.authorizations()[0] == f"Basic {BASIC}"
    assert len(cdn.seen) == 2 and cdn.authorizations() == []  # config and layer, no secret


def test_upload_location_on_another_port_gets_no_credentials(hostile, tmp_path, env):
    store, registry = hostile(), hostile()
    creds(tmp_path, env, registry.host)

    def gate(h: Handler, m) -> None:
        if h.headers.get("Authorization") != f"Basic {BASIC}":
            h.send(401, b"{}", {"WWW-Authenticate": 'Basic realm="hostile"'})
        elif h.command == "HEAD":
            h.send(404)
        elif h.command == "POST":
            h.send(202, b"", {"Location": f"http://{store.host}/upload/{len(h.server.owner.seen)}"})
        else:
            h.send(201)

    for method in ("HEAD", "POST", "PUT"):
        registry.on(method, r"/v2/.*", gate)
    store.on("PUT", r"/upload/.*", lambda h, m: h.send(201))
    r = cli(env, "push", "--insecure", "-q", *FAST, str(spec(tmp_path)),
            f"docker://{registry.host}/team/app:1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert {s.method for s in store.seen} == {"PUT"} and len(store.seen) == 2  # layer, config
    assert store.authorizations() == []
    assert "authorization" not in registry.seen[0].headers
    assert f"Basic {BASIC}" in registry.authorizations()


def test_token_realm_gets_basic_credentials_a_redirect_from_it_does_not(
    hostile, tmp_path, env, out
):
    """Docker's token flow sends the basic credentials to the realm the registry
    names (usually another host); the realm's own redirects get nothing."""
    image = Image.make()
    elsewhere, realm, registry = hostile(), hostile(), hostile().serve_image(image)
    creds(tmp_path, env, registry.host)
    token = "tok-" + "a1" * 20
    realm.on("GET", r"/token", lambda h, m: h.send(
        307, b"", {"Location": f"http://{elsewhere.host}/token2"}))  # fmt: skip
    elsewhere.on("GET", r"/token2", lambda h, m: h.send(200, json.dumps({"token": token}).encode()))

    def gate(h: Handler, m) -> None:
        if h.headers.get("Authorization") != f"Bearer {token}":
            challenge = f'Bearer realm="http://{realm.host}/token",service="hostile"'
            h.send(401, b"{}", {"WWW-Authenticate": challenge})
        else:
            h.send(200, image.manifest, {"Content-Type": OCI_MANIFEST})

    registry.routes.insert(0, ("GET", re.compile(r"/v2/team/app/manifests/.*"), gate, True))
    r = pull(env, registry.host, f"@{image.digest}", out)
    assert r.returncode == 0, r.stderr
    (out / "img.tar").unlink()
    assert realm.authorizations() == [f"Basic {BASIC}"]
    assert elsewhere.authorizations() == []
    assert "authorization" not in registry.seen[0].headers


def test_error_bodies_are_shortened_escaped_and_masked(hostile, tmp_path, env, out):
    registry = hostile()
    creds(tmp_path, env, registry.host)
    echo_authorization(registry)
    r = pull(env, registry.host, ":1", out)
    err = one_line_error(r, "400", "DENIED")
    for secret in (PASSWORD, BASIC, "tok-abcdef-123", "\x1b", "\r"):
        assert secret not in err
    assert "\\x1b" in err and len(err) < 400


# -- deadlines ----------------------------------------------------------------------


def test_a_body_sent_one_byte_a_second_ends_at_the_deadline(hostile, env, out):
    image = Image.make()
    registry = hostile()

    def slow(h: Handler, m) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(image.manifest)))
        h.end_headers()
        h.trickle(image.manifest, 0.5)  # progress every 0.5 s: no stall, never done in time

    registry.on("GET", r"/v2/team/app/manifests/.*", slow)
    start = time.monotonic()
    r = cli(env, "pull", "--insecure", "-q", "--timeout", "3", "--stall-timeout", "2",
            f"{registry.host}/team/app:1", "-o", str(out / "x.tar"))  # fmt: skip
    one_line_error(r, "deadline", "--timeout")
    assert time.monotonic() - start < 10


def test_headers_trickled_end_at_the_deadline(hostile, env, out):
    registry = hostile()

    def slow(h: Handler, m) -> None:
        h.wfile.write(b"HTTP/1.0 200 OK\r\n")
        h.trickle(b"X-Slow: " + b"y" * 100, 0.5)

    registry.on("GET", r"/v2/.*", slow)
    start = time.monotonic()
    r = cli(env, "pull", "--insecure", "-q", "--timeout", "3", "--stall-timeout", "2",
            f"{registry.host}/team/app:1", "-o", str(out / "x.tar"))  # fmt: skip
    one_line_error(r, "deadline")
    assert time.monotonic() - start < 10


def test_a_stalled_blob_is_named(hostile, env, out):
    image = Image.make()
    registry = hostile()

    def stall(h: Handler, m) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(image.layer)))
        h.end_headers()
        h.wfile.write(image.layer[:100])
        h.wfile.flush()
        h.server.owner.stopping.wait(30)

    registry.on("GET", rf"/v2/team/app/blobs/{sha(image.layer)}", stall)
    registry.serve_image(image)
    start = time.monotonic()
    r = pull(env, registry.host, f"@{image.digest}", out)
    one_line_error(r, "stalled", "no data for 2 s", sha(image.layer))
    assert time.monotonic() - start < 10


def test_a_registry_that_never_answers(hostile, env, out):
    registry = hostile()
    registry.on("GET", r"/v2/.*", lambda h, m: h.server.owner.stopping.wait(30))
    start = time.monotonic()
    one_line_error(pull(env, registry.host, ":1", out), "stalled", "manifest")
    assert time.monotonic() - start < 10


# -- sizes, digests and types -------------------------------------------------------


def test_an_endless_blob_stops_at_its_declared_size(hostile, env, out):
    image = Image.make()
    registry = hostile()

    def endless(h: Handler, m) -> None:
        h.send_response(200)
        h.end_headers()  # no Content-Length: the body ends when the server closes
        while not h.server.owner.stopping.is_set():
            h.wfile.write(b"\0" * 65536)

    registry.on("GET", rf"/v2/team/app/blobs/{sha(image.layer)}", endless)
    registry.serve_image(image)
    one_line_error(pull(env, registry.host, f"@{image.digest}", out), sha(image.layer))


def test_a_wrong_digest_is_refused(hostile, env, out):
    image = Image.make()
    evil = Image(image.layer[:-1] + b"\1", image.config, image.manifest)
    evil.blobs = {sha(image.layer): evil.layer, sha(image.config): image.config}
    registry = hostile().serve_image(evil)
    one_line_error(pull(env, registry.host, f"@{image.digest}", out), sha(image.layer))
    # a manifest that does not hash to the digest asked for
    one_line_error(pull(env, registry.host, "@" + sha(b"other"), out), "hashes to")


def test_a_huge_content_length_is_refused_at_once(hostile, env, out):
    registry = hostile()
    registry.on("GET", r"/v2/team/app/manifests/.*", lambda h, m: (
        h.send_response(200), h.send_header("Content-Length", str(10**15)), h.end_headers(),
        h.wfile.write(b"{" * 1000), h.server.owner.stopping.wait(30)))  # fmt: skip
    start = time.monotonic()
    one_line_error(pull(env, registry.host, ":1", out), "larger than 4194304 bytes")
    assert time.monotonic() - start < 5


def test_a_manifest_over_4_mib_is_refused(hostile, env, out):
    registry = hostile()
    big = b'{"pad": "' + b"x" * (5 << 20) + b'"}'
    registry.on("GET", r"/v2/team/app/manifests/.*", lambda h, m: (
        h.send_response(200), h.end_headers(), h.wfile.write(big)))  # fmt: skip
    one_line_error(pull(env, registry.host, ":1", out), "larger than 4194304 bytes")


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: b"{not json", ("not valid JSON",)),
        (lambda m: {**m, "layers": "all of them"}, ("layers", "must be a list")),
        (
            lambda m: {**m, "layers": [{**m["layers"][0], "size": "12"}]},
            ("layers[0].size", "must be an integer"),
        ),  # fmt: skip
        (
            lambda m: {**m, "layers": [{**m["layers"][0], "size": 2**70}]},
            ("layers[0].size", "out of range"),
        ),  # fmt: skip
        (
            lambda m: {**m, "layers": [{**m["layers"][0], "mediaType": 7}]},
            ("layers[0].mediaType", "must be a string"),
        ),  # fmt: skip
        (
            lambda m: {**m, "config": {**m["config"], "digest": "sha256:../../x"}},
            ("config.digest", "not a digest"),
        ),  # fmt: skip
        (
            lambda m: {**m, "layers": [{**m["layers"][0], "digest": "sha256:../../../etc/x"}]},
            ("layers[0].digest", "not a digest"),
        ),  # fmt: skip
        (lambda m: [m], ("manifest", "must be an object")),
    ],
)
def test_malformed_manifests_are_one_line(hostile, env, out, change, words):
    image = Image.make()
    manifest = change(json.loads(image.manifest))
    bad = image.with_manifest(
        manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    )
    registry = hostile().serve_image(bad)
    one_line_error(pull(env, registry.host, ":1", out), *words)
    assert all(".." not in s.path for s in registry.seen)  # no request built from it


def test_a_config_of_wrong_types_is_one_line(hostile, env, out):
    image = Image.make()
    config = json.dumps({"rootfs": {"diff_ids": [1, 2]}}).encode()
    manifest = json.loads(image.manifest)
    manifest["config"] = {**manifest["config"], "digest": sha(config), "size": len(config)}
    bad = image.with_manifest(manifest)
    bad.blobs[sha(config)] = config
    registry = hostile().serve_image(bad)
    one_line_error(pull(env, registry.host, ":1", out), "rootfs.diff_ids[0]", "not a digest")


def test_a_bad_token_answer_is_one_line(hostile, tmp_path, env, out):
    realm, registry = hostile(), hostile()
    realm.on("GET", r"/token", lambda h, m: h.send(200, b'{"token": ["not", "a", "string"]}'))
    challenge = f'Bearer realm="http://{realm.host}/token",service="x"'
    registry.on("GET", r"/v2/.*", lambda h, m: h.send(401, b"", {"WWW-Authenticate": challenge}))
    one_line_error(pull(env, registry.host, ":1", out), "token service", "must be a string")


@pytest.mark.parametrize(
    "content, words",
    [
        ("{", ("auth.json", "not valid JSON")),
        ('{"auths": []}', ("auth.json", "auths", "must be an object")),
        ('{"auths": {"HOST": {"auth": 5}}}', ("auth.json", "auth", "must be a string")),
        ('{"auths": {"HOST": {"auth": "bm9jb2xvbg=="}}}', ("auth.json", "base64(user:password)")),
    ],
)
def test_bad_auth_files_name_the_file(hostile, tmp_path, env, out, content, words):
    registry = hostile()
    auth = tmp_path / "auth.json"
    auth.write_text(content.replace("HOST", registry.host))
    env["REGISTRY_AUTH_FILE"] = str(auth)
    one_line_error(pull(env, registry.host, ":1", out), *words)
    assert registry.seen == []


# -- push -----------------------------------------------------------------------------


def spec(tmp_path: Path, content: bytes = b"pushed\n") -> Path:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    (root / "file").write_bytes(content)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"name": "app", "tag": "1", "contents": {"roots": [str(root)]}}))
    return path


def test_a_head_of_the_wrong_size_does_not_count_as_present(hostile, tmp_path, env):
    registry = hostile()

    def head(h: Handler, m) -> None:  # "present", but not the blob asked for
        h.send(200, b"", {"Content-Length": "7"})

    registry.on("HEAD", r"/v2/.*", head)
    registry.on("POST", r"/v2/team/app/blobs/uploads/", lambda h, m: h.send(
        202, b"", {"Location": "/upload/1"}))  # fmt: skip
    registry.on("PUT", r"/.*", lambda h, m: h.send(201))
    r = cli(env, "push", "--insecure", "-q", *FAST, str(spec(tmp_path)),
            f"docker://{registry.host}/team/app:1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    uploaded = [s for s in registry.seen if s.method == "PUT" and s.path.startswith("/upload/")]
    assert len(uploaded) == 2  # the layer and the config were sent despite the HEADs


def test_push_image_refuses_a_tampered_layer(hostile, tmp_path, env):
    built = tmp_path / "app.tar"
    fastlayer.build(json.loads(spec(tmp_path, b"A" * 4096).read_text()), str(built))
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(built) as src, tarfile.open(tampered, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if data is not None and member.name.endswith("layer.tar"):
                data = data.replace(b"A" * 64, b"B" * 64)  # same size, other bytes
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    registry = hostile()
    registry.on("HEAD", r"/v2/.*", lambda h, m: h.send(404))
    registry.on("POST", r"/v2/.*", lambda h, m: h.send(202, b"", {"Location": "/upload/1"}))
    registry.on("PUT", r"/.*", lambda h, m: h.send(201))
    r = cli(env, "push", "--insecure", "-q", *FAST, str(tampered),
            f"docker://{registry.host}/team/app:1")  # fmt: skip
    one_line_error(r, "layer")
    assert [s for s in registry.seen if s.method == "PUT"] == []  # nothing went up


@pytest.mark.validators
def test_push_of_a_tampered_oci_blob_is_refused_by_a_real_registry_too(tmp_path, env):
    """A compressed blob of an OCI layout is sent as stored, checked as it goes:
    the registry never receives the whole of a blob that is not its digest."""
    from registry_fixture import Registry

    oci = tmp_path / "oci"
    fastlayer.build(json.loads(spec(tmp_path, os.urandom(8192)).read_text()), str(oci),
                    format="oci-dir", compress="gzip")  # fmt: skip
    index = json.loads((oci / "index.json").read_text())
    manifest_blob = oci / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    layer = json.loads(manifest_blob.read_text())["layers"][-1]["digest"]
    path = oci / "blobs" / "sha256" / layer.split(":")[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    registry = Registry(tmp_path / "registry").start()
    try:
        r = cli(env, "push", "--insecure", "-q", *FAST, str(oci),
                f"docker://{registry.host}/team/app:1")  # fmt: skip
        one_line_error(r, layer)
        assert layer not in registry.uploads_since(0)
        assert not registry.blob_path(layer).exists()
    finally:
        registry.stop()


def test_server_text_masks_escapes_and_shortens():
    from fastlayer.registry.client import _origin, server_text

    text = server_text(
        'Authorization: Bearer abc.def {"access_token": "zzz", "password": "p"} '
        "token=qq&x=1 mine-secret \x1b[2J\u202e" + "y" * 300,
        ["mine-secret"],
    )
    for leaked in ("abc.def", "zzz", '"p"', "qq", "mine-secret", "\x1b", "\u202e"):
        assert leaked not in text
    assert "Bearer ***" in text and "\\x1b" in text and "\\u202e" in text
    assert len(text) == 200 and text.endswith("...")
    # credentials are bound to scheme, host and port: each differs here
    assert _origin("http://r:5000/v2/") == _origin("HTTP://R:5000/x")
    assert _origin("http://r/") == _origin("http://r:80/")
    assert len({_origin(u) for u in ("http://r:5000", "http://r:5001", "https://r:5000")}) == 3


def test_an_upload_the_registry_never_reads_ends_at_the_stall_limit(hostile, tmp_path, env):
    """urllib3 2 sends a body under the connect timeout (30 s): the stall limit
    must bound it too, and the message say what stalled."""
    registry = hostile()
    registry.on("HEAD", r"/v2/.*", lambda h, m: h.send(404))
    registry.on("POST", r"/v2/team/app/blobs/uploads/", lambda h, m: h.send(
        202, b"", {"Location": "/upload/1"}))  # fmt: skip
    # takes the request line and headers, then not one byte of the body
    registry.on("PUT", r"/upload/.*", lambda h, m: h.server.owner.stopping.wait(60),
                read_body=False)  # fmt: skip
    # more than the loopback socket buffers take (a few MiB) before the sender blocks
    big = spec(tmp_path, os.urandom(48 << 20))
    start = time.monotonic()
    r = cli(env, "push", "--insecure", "-q", "--compress", "none", "--timeout", "60",
            "--stall-timeout", "3", str(big), f"docker://{registry.host}/team/app:1")  # fmt: skip
    took = time.monotonic() - start
    one_line_error(r, "PUT blob", "stalled", "no data sent or received for 3 s")
    assert took < 15, took  # was ~31 s: the 30 s connect timeout, whatever --stall-timeout said


# -- configs of the wrong types -------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("Env", "PATH=/x"), ("Labels", ["a"]), ("Cmd", "sh"), ("ExposedPorts", {"80/tcp": 1})],
)
@pytest.mark.parametrize("fmt", ["docker-archive", "oci-dir"])
def test_a_pulled_config_of_the_wrong_types_is_refused(hostile, env, out, field, value, fmt):
    """Such a config made an archive skopeo cannot read, with exit 0."""
    image = Image.make()
    config = json.loads(image.config)
    config["config"] = {"Env": ["A=1"], field: value}
    raw = json.dumps(config).encode()
    manifest = json.loads(image.manifest)
    manifest["config"] = {**manifest["config"], "digest": sha(raw), "size": len(raw)}
    bad = image.with_manifest(manifest)
    bad.blobs[sha(raw)] = raw
    registry = hostile().serve_image(bad)
    r = cli(env, "pull", "--insecure", "-q", *FAST, "--format", fmt,
            f"{registry.host}/team/app@{bad.digest}", "-o", str(out / "img"))  # fmt: skip
    one_line_error(r, registry.host, "team/app", f"config.config.{field}", "must be")


def test_push_of_an_image_whose_config_has_wrong_types_is_refused(hostile, tmp_path, env):
    built = tmp_path / "app.tar"
    fastlayer.build(json.loads(spec(tmp_path).read_text()), str(built))
    bad = tmp_path / "bad.tar"
    with tarfile.open(built) as src, tarfile.open(bad, "w") as dst:
        manifest = json.loads(src.extractfile("manifest.json").read())
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name == manifest[0]["Config"]:
                config = json.loads(data)
                config["config"]["Env"] = "PATH=/x"
                data = json.dumps(config).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    registry = hostile()
    r = cli(env, "push", "--insecure", "-q", *FAST, str(bad),
            f"docker://{registry.host}/team/app:1")  # fmt: skip
    one_line_error(r, "bad.tar", "config.Env", "must be a list")
    assert registry.seen == []  # refused before any request


# -- the blob cache: only a hint --------------------------------------------------------


def simple_registry(registry: Hostile) -> Hostile:
    """Takes any push: HEAD 404, uploads and manifests accepted."""
    registry.on("HEAD", r"/v2/.*", lambda h, m: h.send(404))
    registry.on("POST", r"/v2/team/app/blobs/uploads/", lambda h, m: h.send(
        202, b"", {"Location": "/upload/1"}))  # fmt: skip
    registry.on("PUT", r"/.*", lambda h, m: h.send(201))
    return registry


BAD_CACHES = {
    "registry-a-list": lambda host: json.dumps({host: []}),
    "deep": lambda host: "[" * 100_000 + "]" * 100_000,
    "layers-a-list": lambda host: json.dumps({host: {"layers": [], "repos": {}}}),
    "repos-entry-5": lambda host: json.dumps({host: {"repos": {sha(b"x"): 5}}}),
    "bad-entries": lambda host: json.dumps({host: {
        "layers": {"gzip:" + sha(b"a"): {"digest": "sha256:../../x", "size": 1,
                                          "mediaType": "t"},
                   "gzip:" + sha(b"b"): {"digest": sha(b"b"), "size": -1, "mediaType": "t"},
                   "gzip:" + sha(b"c"): {"digest": sha(b"c"), "size": True, "mediaType": "t"},
                   "gzip:" + sha(b"d"): "x"},
        "repos": {"sha256:short": ["team/app"], sha(b"e"): ["../../etc"], sha(b"f"): [7]}}}),
    "not-json": lambda host: "{",
    "a-number": lambda host: "5",
    "fifo": None,
    "directory": None,
    "over-64-mib": None,
}  # fmt: skip


def write_bad_cache(env: dict, kind: str, host: str) -> Path:
    path = Path(env["XDG_CACHE_HOME"]) / "fastlayer" / "registry-blobs.json"
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "over-64-mib":
        with open(path, "w") as f:
            f.write('{"x": "')
            f.truncate(65 << 20)  # sparse: cheap to make, too big to read
    else:
        path.write_text(BAD_CACHES[kind](host))
    return path


def one_warning(r: subprocess.CompletedProcess, path: Path) -> None:
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlayer: warning: "), r.stderr
    assert str(path) in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", list(BAD_CACHES))
def test_a_broken_blob_cache_never_fails_a_pull(hostile, env, tmp_path, kind):
    image = Image.make()
    registry = hostile().serve_image(image)
    path = write_bad_cache(env, kind, registry.host)
    out = tmp_path / "img.tar"
    r = cli(env, "pull", "--insecure", "-q", *FAST, f"{registry.host}/team/app@{image.digest}",
            "-o", str(out), limit=30)  # fmt: skip
    one_warning(r, path)
    assert r.stdout.strip() == image.digest and tarfile.is_tarfile(out)
    if kind != "directory":  # replaced by a good cache that knows the pulled layer
        cache = json.loads(path.read_text())
        layer = cache[registry.host]["layers"][f"none:{sha(image.layer)}"]
        assert layer == {"digest": sha(image.layer), "size": len(image.layer),
                         "mediaType": "application/vnd.oci.image.layer.v1.tar"}  # fmt: skip
        assert cache[registry.host]["repos"][sha(image.layer)] == ["team/app"]


@pytest.mark.parametrize("kind", ["registry-a-list", "deep", "repos-entry-5", "fifo"])
def test_a_broken_blob_cache_never_fails_a_push(hostile, env, tmp_path, kind):
    registry = simple_registry(hostile())
    path = write_bad_cache(env, kind, registry.host)
    r = cli(env, "push", "--insecure", "-q", *FAST, str(spec(tmp_path)),
            f"docker://{registry.host}/team/app:1", limit=30)  # fmt: skip
    one_warning(r, path)
    assert len([s for s in registry.seen if s.path.startswith("/upload/")]) == 2


def test_a_cache_entry_for_a_bad_blob_is_dropped_not_followed(hostile, env, tmp_path):
    """A well-typed entry whose digest is malformed never reaches a URL; the good
    entries next to it are kept."""
    registry = simple_registry(hostile())
    path = write_bad_cache(env, "bad-entries", registry.host)
    r = cli(env, "push", "--insecure", "-q", *FAST, str(spec(tmp_path)),
            f"docker://{registry.host}/team/app:1")  # fmt: skip
    one_warning(r, path)
    assert "7 malformed entries dropped" in r.stderr
    assert all(".." not in s.path and "short" not in s.path for s in registry.seen)
