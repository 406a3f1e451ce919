"""The README's first command: the bundled example builds with no Nix and its
image runs, printing the greeting that its dependency holds."""

import subprocess
import sys
from pathlib import Path

import validators

ROOT = Path(__file__).resolve().parent.parent
GREETING = "Hello from a layered image built by fastlayer!\n"


def test_readme_names_the_example_command():
    readme = (ROOT / "README.md").read_text()
    assert "pip install . && sh examples/hello/build.sh hello.tar" in readme


def test_bundled_example_runs_in_podman(tmp_path, fresh_podman):
    out = tmp_path / "hello.tar"
    bindir = Path(sys.executable).parent  # the fastlayer console script under test
    env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin"}
    proc = subprocess.run(
        ["sh", str(ROOT / "examples/hello/build.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert fresh_podman.load(out) == ["localhost/hello:latest"]
    assert fresh_podman.run("hello:latest") == GREETING
    # Nothing but the two store paths and the /bin symlink: the program needs no shell.
    listing = validators.read_docker_archive(out)
    assert len(listing.manifest[0]["Layers"]) == 3
