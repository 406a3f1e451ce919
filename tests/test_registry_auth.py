"""Where credentials come from, when they are sent, and TLS verification.

Credentials live in `$REGISTRY_AUTH_FILE`, containers' `auth.json` under
`$XDG_RUNTIME_DIR` or Docker's `config.json` (`$DOCKER_CONFIG`, default
`~/.docker`); the first file naming the registry wins, and they are sent only
after the registry's 401 asks for them. A registry with a certificate no
trusted CA signed is refused unless its CA is given (`REQUESTS_CA_BUNDLE`);
`--insecure` (plain HTTP) does not reach a TLS-only registry.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_registry import OCI_MANIFEST, Handler, Hostile, Image

import fastlayer
from fastlayer.errors import FastlayerError
from fastlayer.registry.pull import pull

SRC = str(Path(fastlayer.__file__).resolve().parent.parent)
USER, PASSWORD = "carol", "s3cret-pa55"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """No credentials of the machine's user: every source points into tmp_path."""
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG", "REQUESTS_CA_BUNDLE",
                 "CURL_CA_BUNDLE", "SSL_CERT_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def gated():
    """A registry serving one image only to carol, after a basic challenge."""
    image = Image.make()
    reg = Hostile()

    def gate(h: Handler, m) -> None:
        if h.headers.get("Authorization") != basic(USER, PASSWORD):
            h.send(401, b"{}", {"WWW-Authenticate": 'Basic realm="gated"'})
        elif "/manifests/" in h.path:
            h.send(200, image.manifest, {"Content-Type": OCI_MANIFEST})
        else:
            data = image.blobs.get(m[1])
            h.send(200, data) if data is not None else h.send(404)

    reg.on("GET", r"/v2/team/app/(?:manifests|blobs)/(.*)", gate)
    yield reg, image
    reg.stop()


def auth_file(path: Path, key: str, user: str, password: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    path.write_text(json.dumps({"auths": {key: entry}}))


def put_credentials(where: str, home: Path, monkeypatch, host: str, password: str) -> None:
    if where == "REGISTRY_AUTH_FILE":
        path = home / "custom-auth.json"
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    elif where == "containers":
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(home / "run"))
        path = home / "run" / "containers" / "auth.json"
    elif where == "DOCKER_CONFIG":
        monkeypatch.setenv("DOCKER_CONFIG", str(home / "dockercfg"))
        path = home / "dockercfg" / "config.json"
    else:  # ~/.docker/config.json; Docker writes keys with a scheme for some registries
        path = home / "home" / ".docker" / "config.json"
        host = f"https://{host}/v1/"
    auth_file(path, host, USER, password)


@pytest.mark.parametrize("where", ["REGISTRY_AUTH_FILE", "containers", "DOCKER_CONFIG", "home"])
def test_credentials_are_read_from_each_file_and_sent_only_after_the_challenge(
    env, gated, monkeypatch, where
):
    reg, image = gated
    put_credentials(where, env, monkeypatch, reg.host, PASSWORD)
    out = env / "img.tar"
    result = pull(f"{reg.host}/team/app@{image.digest}", str(out), insecure=True, timeout=10)
    assert result.manifest_digest == image.digest and out.is_file()
    first = reg.seen[0]
    assert "authorization" not in first.headers  # nothing before the registry asks
    assert [s.headers.get("authorization") for s in reg.seen[1:]] == [basic(USER, PASSWORD)] * 3


def test_without_credentials_the_pull_names_where_to_put_them(env, gated):
    reg, image = gated
    out = env / "img.tar"
    with pytest.raises(FastlayerError, match="needs credentials .* REGISTRY_AUTH_FILE"):
        pull(f"{reg.host}/team/app@{image.digest}", str(out), insecure=True, timeout=10)
    assert not out.exists() and reg.authorizations() == []


@pytest.mark.parametrize(
    "first, second",
    [("REGISTRY_AUTH_FILE", "containers"), ("containers", "DOCKER_CONFIG"),
     ("REGISTRY_AUTH_FILE", "home"), ("containers", "home")],
)  # fmt: skip
def test_the_first_file_naming_the_registry_wins(env, gated, monkeypatch, first, second):
    reg, image = gated
    put_credentials(first, env, monkeypatch, reg.host, "wrong-password")
    put_credentials(second, env, monkeypatch, reg.host, PASSWORD)
    with pytest.raises(FastlayerError, match="401"):
        pull(f"{reg.host}/team/app@{image.digest}", str(env / "a.tar"), insecure=True, timeout=10)
    assert reg.authorizations() == [basic(USER, "wrong-password")]
    # a first file that names only other registries is passed over
    put_credentials(first, env, monkeypatch, "other.example:5000", "wrong-password")
    pull(f"{reg.host}/team/app@{image.digest}", str(env / "b.tar"), insecure=True, timeout=10)
    assert reg.authorizations()[-1] == basic(USER, PASSWORD)


# -- TLS ------------------------------------------------------------------------------


def make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signs for IP 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("fastlayer test CA"))
        .issuer_name(name("fastlayer test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - day).not_valid_after(now + day)
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    paths = d / "ca.pem", d / "cert.pem", d / "key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return paths


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastlayer", *args], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip


@pytest.mark.validators
def test_a_registry_with_an_unknown_ca_is_refused_unless_its_ca_is_given(tmp_path, env):
    pytest.importorskip("cryptography")
    from registry_fixture import Registry

    ca, cert, key = make_ca_and_cert(tmp_path)
    reg = Registry(tmp_path / "registry", tls=(cert, key)).start()
    try:
        base = {**os.environ, "PYTHONPATH": SRC}
        trusted = {**base, "REQUESTS_CA_BUNDLE": str(ca)}
        root = tmp_path / "root"
        root.mkdir()
        (root / "file").write_text("over TLS\n")
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"name": "app", "tag": "1", "contents": {"roots": [str(root)]}}))
        dest = f"docker://{reg.host}/team/app:1"
        out = tmp_path / "out"
        out.mkdir()
        pull = ["pull", "-q", f"{reg.host}/team/app:1", "-o", str(out / "a.tar")]
        for args in (["push", "-q", str(spec), dest], pull):
            r = cli(base, *args)
            assert r.returncode == 1, r.stderr
            assert r.stderr.startswith("fastlayer: error: ") and r.stderr.count("\n") == 1
            assert "TLS verification failed" in r.stderr and reg.host in r.stderr, r.stderr
        r = cli(base, *pull, "--insecure")
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr  # plain HTTP: no answer
        assert list(out.iterdir()) == []
        assert reg.requests() == [] or all(m == "GET" for m, _, _ in reg.requests())
        r = cli(trusted, "push", "-q", str(spec), dest)
        assert r.returncode == 0, r.stderr
        r = cli(trusted, *pull)
        assert r.returncode == 0, r.stderr
        assert (out / "a.tar").is_file()
    finally:
        reg.stop()


@pytest.mark.parametrize("scheme", ["Digest", "Negotiate", "Zeta"])
def test_a_challenge_of_another_scheme_is_refused_and_its_realm_never_asked(
    env, monkeypatch, scheme
):
    realm, reg = Hostile(), Hostile()
    try:
        put_credentials("containers", env, monkeypatch, reg.host, PASSWORD)
        challenge = f'{scheme} realm="http://{realm.host}/token",service="x"'
        reg.on("GET", r"/v2/.*", lambda h, m: h.send(401, b"", {"WWW-Authenticate": challenge}))
        with pytest.raises(FastlayerError, match="401 for .* no usable challenge"):
            pull(f"{reg.host}/team/app:1", str(env / "a.tar"), insecure=True, timeout=10)
        assert realm.seen == [] and reg.authorizations() == []
    finally:
        realm.stop()
        reg.stop()
