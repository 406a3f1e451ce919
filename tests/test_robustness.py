"""Property-based robustness (issue 9): mutated inputs never give a traceback,
a hang, a wrong image, a leftover file or a host file's bytes.

Every example starts from a VALID input built here (tests/mutate.py: docker-
archives in current and legacy spec, a docker-archive directory, OCI layout
and archive, a spec, a stream-nix conf, closure graphs in both forms),
applies one mutation (a JSON field dropped or retyped or given a hostile
name, a raw document, a member turned into a link to a host secret, a fifo,
a directory, a loop, a truncated or flipped archive) and runs the real CLI.
The property (mutate.check): exit 1 with one `fastlayer: error:` line and
nothing left behind, or exit 0 with an image that is correct by its own
digests; never the secret's marker in any output.

Fast by default (a fixed seed, tens of examples per property);
FASTLAYER_ROBUSTNESS_EXAMPLES=N runs N per property.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import mutate
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from mutate import BASE_KINDS, Case, Failure, Mutation, in_fresh_dir, run_case

T = TypeVar("T")


def robust(default: int) -> settings:
    """A reproducible profile: fixed seed, no example database, no deadline."""
    return settings(
        max_examples=mutate.examples(default),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class _Draw:
    """mutate.Pick over hypothesis' draw, so choices shrink to the first item."""

    def __init__(self, draw: st.DrawFn):
        self.draw = draw

    def one(self, items: Sequence[T]) -> T:
        return self.draw(st.sampled_from(items))

    def fraction(self) -> float:
        return self.draw(st.floats(0, 1, exclude_max=True))


@st.composite
def cases(draw: st.DrawFn, command: str, kind: str | None = None) -> Case:
    return mutate.draw_case(_Draw(draw), command, kind)


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    mutate.warm()


def holds(case: Case) -> str:
    """Run the case; a failure names the case and what was mutated where."""
    case.mutation.chosen.clear()
    try:
        result = in_fresh_dir(lambda host: run_case(case, host))
    except Failure as e:
        raise Failure(f"{case.describe()}\n  -> {e}") from None
    if currently_in_test_context():
        note(f"{case.describe()} -> {result}")
    return result


# ---------------------------------------------------------------- base images


@robust(30)
@given(cases("build"))
def test_build_from_mutated_base(case: Case) -> None:
    holds(case)


@robust(30)
@given(cases("stream-nix"))
def test_stream_nix_from_mutated_base(case: Case) -> None:
    holds(case)


@robust(30)
@given(cases("inspect"))
def test_inspect_mutated_image(case: Case) -> None:
    holds(case)


@robust(30)
@given(cases("merge"))
def test_merge_mutated_archive(case: Case) -> None:
    holds(case)


# ---------------------------------------------------------------- specs, confs, graphs


@robust(30)
@given(cases("build-spec"))
def test_build_mutated_spec(case: Case) -> None:
    holds(case)


@robust(30)
@given(cases("stream-nix-conf"))
def test_stream_nix_mutated_conf(case: Case) -> None:
    holds(case)


@robust(30)
@given(cases("rank"))
def test_rank_mutated_graph(case: Case) -> None:
    holds(case)


@robust(30)
@given(cases("plan"))
def test_plan_mutated_graph(case: Case) -> None:
    holds(case)


# ---------------------------------------------------------------- the generators themselves


@pytest.mark.parametrize("kind", BASE_KINDS)
@pytest.mark.parametrize("command", ["build", "stream-nix", "inspect"])
def test_unmutated_base_gives_a_correct_image(kind: str, command: str) -> None:
    """The valid inputs are valid: without a mutation every command succeeds
    (so a mutation's exit 1 is the mutation's doing)."""
    assert holds(Case(kind, command, Mutation("none"))) == "valid"


def test_unmutated_merge_spec_conf_and_graphs() -> None:
    assert holds(Case("docker-archive", "merge", Mutation("none"))) == "valid"
    for kind in ("spec-json", "spec-toml"):
        assert holds(Case(kind, "build-spec", Mutation("none"))) == "valid"
    assert holds(Case("nix-conf", "stream-nix-conf", Mutation("none"))) == "valid"
    for kind in ("graph-export", "graph-pathinfo"):
        assert holds(Case(kind, "rank", Mutation("none"))) == "valid"
        args = {"max_layers": 3, "base_layers": 1, "strategy": "popularity"}
        assert holds(Case(kind, "plan", Mutation("none"), args)) == "valid"


def test_checker_sees_a_leak_and_a_wrong_digest(tmp_path) -> None:
    """The property can fail: a copied secret and a bad layer digest are caught."""
    host = mutate.make_host(tmp_path / "h")
    out = host.out / "x.tar"
    entries = mutate.docker_entries(lambda role, doc: doc, {})
    for e in entries:
        if e.role == "layer0":
            e.data = host.secret_tar.read_bytes()
    mutate.write_tar(out, entries)
    ok = mutate.Outcome(0, b"", "")
    with pytest.raises(Failure, match="secret marker in output file"):
        mutate.check(ok, host, lambda: mutate.verify_docker_archive(out))
    for e in entries:
        if e.role == "layer0":
            e.data = mutate.LAYERS[1]
    mutate.write_tar(out, entries)
    with pytest.raises(Failure, match="bad image: layer .* has sha256"):
        mutate.check(ok, host, lambda: mutate.verify_docker_archive(out))
    two_lines = mutate.Outcome(1, b"", "fastlayer: error: a\nb\n")
    out.unlink()
    with pytest.raises(Failure, match="not one"):
        mutate.check(two_lines, host, None)
