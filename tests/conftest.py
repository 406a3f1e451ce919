"""Shared fixtures. Validator helpers live in tests/validators.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile

import pytest
import validators
from registry_fixture import Registry

# The suite never touches the user's caches: the layer cache and the registry
# blob cache live in $XDG_CACHE_HOME/fastlayer, here a directory of the session's
# (tests that need an empty one set XDG_CACHE_HOME themselves).
os.environ.pop("FASTLAYER_CACHE", None)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fastlayer-test-cache-")


def pytest_report_header(config):
    tools = ("podman", "skopeo", "umoci", "runc")
    required = "required" if validators.validators_required() else "optional (skip if missing)"
    return [f"validators {required}: " + "; ".join(validators.tool_version(t) for t in tools)]


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    """A `validators.Podman` on a private vfs store, reset at the end of the session."""
    pm = validators.Podman(validators.require("podman"), tmp_path_factory.mktemp("podman"))
    yield pm
    with contextlib.suppress(validators.ValidatorError, OSError):
        pm.reset()


@pytest.fixture
def fresh_podman(tmp_path_factory):
    """Like `podman`, on an empty store of its own: podman skips (so does not
    verify) a layer whose diff_id its store already holds."""
    pm = validators.Podman(validators.require("podman"), tmp_path_factory.mktemp("podman"))
    yield pm
    with contextlib.suppress(validators.ValidatorError, OSError):
        pm.reset()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real docker-registry on 127.0.0.1 (plain HTTP, no auth) for one module."""
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture
def hostile():
    """A factory of hostile_registry.Hostile servers on 127.0.0.1 (a registry that
    answers as a test tells it), all stopped at the end of the test."""
    from hostile_registry import Hostile

    servers: list[Hostile] = []

    def make() -> Hostile:
        servers.append(Hostile())
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs of the test's own (a disk to fill), unmounted at the end."""
    validators.require_root("mounts a tmpfs")
    where = tmp_path / "tiny"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        validators.unavailable(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)
