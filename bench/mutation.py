"""Mutation testing of fastlayer's security- and correctness-critical code.

Everything runs in a throw-away copy of the tree (src with its built kernels,
tests, csrc, setup.py): the working tree is never changed.

- default: cosmic-ray's operators over the critical modules
  (registry/, sources/, nix/db.py, plan ordering), visited in a seeded random
  order, each mutant run against that module's test subset (first failure
  stops it), until `--minutes` is spent. Prints every survivor as a diff.
- `--critical`: the hand-listed mutations below (lines an audit found
  unguarded, plus C mutations of csrc/tarhdr.c, which cosmic-ray cannot
  mutate): each must be killed by the tests named beside it; the kernel is
  rebuilt for a C mutation. Exit 1 when one survives.

    python bench/mutation.py --critical
    python bench/mutation.py --minutes 20 [--module registry/pull.py] [--seed 1]

Needs `pip install cosmic-ray` (not a test dependency; --critical does not use it).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]


@dataclass
class Mutation:
    name: str
    path: str  # relative to the tree
    old: str  # must occur exactly once
    new: str
    tests: list[str]  # pytest node ids or files that must kill it


def _c(name: str, old: str, new: str, tests: list[str]) -> Mutation:
    return Mutation(name, "csrc/tarhdr.c", old, new, tests)


T_INTEGRITY = "tests/test_registry_integrity.py"
T_AUTH = "tests/test_registry_auth.py"
T_EDGES = "tests/test_critical_edges.py"
T_HOSTILE = "tests/test_hostile_registry.py"
T_FLAGS = "tests/test_cli_flags.py"
T_BASE = "tests/test_base_image.py"
T_TAR = "tests/test_tarstream.py"
T_PULL = T_INTEGRITY  # the default subset of the registry modules

CRITICAL = [
    Mutation(
        "pull: manifest digest check dropped",
        "src/fastlayer/registry/pull.py",
        "if digest and got != digest:",
        "if False:",
        [T_INTEGRITY + "::test_a_manifest_other_than_the_pinned_digest_is_refused"],
    ),
    Mutation(
        "pull: config blob check dropped",
        "src/fastlayer/registry/pull.py",
        "    _check(reg, repo, desc, _sha(raw), len(raw))\n    return raw",
        "    return raw",
        [T_INTEGRITY + "::test_a_config_other_than_its_descriptor_is_refused"],
    ),
    Mutation(
        "pull: blob size check dropped",
        "src/fastlayer/registry/pull.py",
        'if size != desc["size"]:',
        "if False:",
        [T_INTEGRITY + "::test_a_blob_shorter_than_its_descriptor_is_refused"],
    ),
    Mutation(
        "pull: descriptor digest grammar dropped",
        "src/fastlayer/registry/pull.py",
        'digest = untrusted.digest(d.get("digest"), f"{where}.digest")',
        'digest = str(d.get("digest"))',
        [T_INTEGRITY + "::test_a_descriptor_digest_outside_the_grammar_is_refused_before_any_use"],
    ),
    Mutation(
        "base image: OCI layout JSON digest check dropped",
        "src/fastlayer/sources/base_image.py",
        'if hashlib.new(algo, data).hexdigest() != hexpart or len(data) != desc["size"]:',
        'if len(data) != desc["size"]:',
        [T_INTEGRITY + "::test_a_same_size_edit_of_an_oci_base_config_is_refused"],
    ),
    Mutation(
        "client: basic credentials before any challenge",
        "src/fastlayer/registry/client.py",
        "if self._basic and self.credentials:",
        "if self.credentials:",
        [T_AUTH + "::test_credentials_are_read_from_each_file_and_sent_only_after_the_challenge"],
    ),
    Mutation(
        "client: TLS not verified",
        "src/fastlayer/registry/client.py",
        "method, url, headers=h, data=data, params=params, stream=True,",
        "method, url, headers=h, data=data, params=params, stream=True, verify=False,",
        [T_AUTH + "::test_a_registry_with_an_unknown_ca_is_refused_unless_its_ca_is_given"],
    ),
    Mutation(
        "client: a 303 re-sends the request with its body",
        "src/fastlayer/registry/client.py",
        'if r.status_code == 303 and method != "HEAD":',
        'if r.status_code == 303 and method == "HEAD":',
        [T_INTEGRITY + "::test_an_upload_answered_with_303_is_followed_with_a_get_not_sent_again"],
    ),
    Mutation(
        "client: a token fetched for any scheme that names a realm",
        "src/fastlayer/registry/client.py",
        'elif challenge.scheme == "bearer" and "realm" in challenge.params:',
        'elif challenge.scheme >= "bearer" and "realm" in challenge.params:',
        [T_AUTH + "::test_a_challenge_of_another_scheme_is_refused_and_its_realm_never_asked"],
    ),
    Mutation(
        "customisation: a single-file store path's link",
        "src/fastlayer/sources/customisation.py",
        "leaf = dst / _name_without_hash(src.name)",
        "leaf = dst % _name_without_hash(src.name)",
        [T_EDGES + "::test_a_single_file_store_path_is_linked_by_its_name"],
    ),
    Mutation(
        "pipeline: map nesting not counted",
        "src/fastlayer/plan/pipeline.py",
        "fn = compile_step(args[0], depth + 1)",
        "fn = compile_step(args[0], depth & 1)",
        [T_EDGES + "::test_steps_nested_too_deep_are_one_error_whatever_the_step"],
    ),
    Mutation(
        "schema: a base config section of null refused",
        "src/fastlayer/sources/schema.py",
        'runtime_config(cfg.get("config"), f"{where}.config", allow_none=True)',
        'runtime_config(cfg.get("config"), f"{where}.config", allow_none=False)',
        [T_EDGES + "::test_a_base_whose_config_section_is_null_is_a_base"],
    ),
    Mutation(
        "auth: containers auth.json not read",
        "src/fastlayer/registry/auth.py",
        'files.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))',
        "pass",
        [T_AUTH + "::test_credentials_are_read_from_each_file_and_sent_only_after_the_challenge"],
    ),
    Mutation(
        "auth: ~/.docker/config.json not read",
        "src/fastlayer/registry/auth.py",
        'files.append(os.path.join(docker, "config.json"))',
        "pass",
        [T_AUTH + "::test_credentials_are_read_from_each_file_and_sent_only_after_the_challenge"],
    ),
    Mutation(
        "push: HEAD counts a blob present whatever its size",
        "src/fastlayer/registry/push.py",
        "return self.reg.blob_size(self.repo, blob.digest) == blob.size",
        "return self.reg.blob_size(self.repo, blob.digest) is not None",
        [T_HOSTILE + "::test_a_head_of_the_wrong_size_does_not_count_as_present"],
    ),
    Mutation(
        "push IMAGE: base layers not verified",
        "src/fastlayer/registry/push.py",
        "                sink.add_layer(ReaderSource(layer, verify=True), layer.comment)\n"
        "        tag = dest.tag",
        "                sink.add_layer(ReaderSource(layer, verify=False), layer.comment)\n"
        "        tag = dest.tag",
        [T_HOSTILE + "::test_push_image_refuses_a_tampered_layer"],
    ),
    Mutation(
        "builder: Volumes not merged",
        "src/fastlayer/builder.py",
        'MERGED_KEYS = ("Labels", "ExposedPorts", "Volumes")',
        'MERGED_KEYS = ("Labels", "ExposedPorts")',
        [T_EDGES + "::test_volumes_labels_and_ports_merge_with_the_base_child_winning"],
    ),
    Mutation(
        "nix db: narSize mismatch accepted",
        "src/fastlayer/nix/db.py",
        "if given_size and given_size != info.nar_size:",
        "if False:",
        [T_EDGES + "::test_a_graph_whose_nar_size_is_wrong_is_refused"],
    ),
    Mutation(
        "spool: always in memory",
        "src/fastlayer/sinks/spool.py",
        "small = size is not None and size < _memory_cap()",
        "small = True",
        [T_EDGES + "::test_a_spool_over_fastlayer_spool_memory_goes_to_tmpdir"],
    ),
    Mutation(
        "docker-archive: produced != size check dropped",
        "src/fastlayer/sinks/docker_archive.py",
        "if produced != size:  # a header must not lie about its entry's size",
        "if False:",
        [T_EDGES + "::test_a_layer_of_another_size_than_announced_leaves_no_archive"],
    ),
    Mutation(
        "build: variant not written",
        "src/fastlayer/builder.py",
        "    if spec.variant:\n",
        "    if False:\n",
        ["tests/test_build_validators.py::test_arm64_and_variant_in_inspect"],
    ),
    Mutation(
        "build: base layers trusted even with verify_base",
        "src/fastlayer/builder.py",
        "ReaderSource(layer, spec.verify_base)",
        "ReaderSource(layer, False)",
        [T_EDGES + "::test_build_verifies_base_layers_unless_verify_base_is_false"],
    ),
    Mutation(
        "build: derived tag of unsorted keys",
        "src/fastlayer/builder.py",
        "json.dumps(config, sort_keys=True)",
        "json.dumps(config)",
        [T_EDGES + "::test_the_derived_tag_is_the_config_hash_readme_states"],
    ),
    Mutation(
        "push: -j ignored",
        "src/fastlayer/commands/push.py",
        "workers=max(1, args.jobs),",
        "workers=3,",
        [T_FLAGS + "::test_push_jobs_bounds_the_uploads_in_flight"],
    ),
    Mutation(
        "pull: --variant ignored",
        "src/fastlayer/commands/pull.py",
        "variant=args.variant,",
        "variant=None,",
        [T_FLAGS + "::test_pull_picks_the_platform_asked_for"],
    ),
    Mutation(
        "push: --image-tag ignored",
        "src/fastlayer/commands/push.py",
        "image_tag=args.image_tag,",
        "image_tag=None,",
        [T_FLAGS + "::test_push_image_tag_picks_one_image_of_many"],
    ),
    _c(
        "tarhdr: PAX at a 100-byte name",
        "strs[i].n > strs[i].limit",
        "strs[i].n >= strs[i].limit",
        [T_EDGES],
    ),
    _c(
        "tarhdr: no PAX past the field",
        "strs[i].n > strs[i].limit",
        "strs[i].n > strs[i].limit + 1",
        [T_EDGES],
    ),
    _c(
        "tarhdr: non-ASCII names without PAX",
        "if (!is_ascii(strs[i].s, strs[i].n) || ",
        "if (",
        [T_TAR + "::test_pack_header_matches_tarinfo", T_TAR + "::test_layer_bytes_equal_tarfile"],
    ),
    _c(
        "tarhdr: mtime field one digit short",
        "const int ndig[4] = {8, 8, 12, 12};",
        "const int ndig[4] = {8, 8, 12, 11};",
        [T_TAR + "::test_layer_bytes_equal_tarfile"],
    ),
    _c(
        "tarhdr: linkpath field 99 bytes",
        '{"linkpath", link, link_len, 100}',
        '{"linkpath", link, link_len, 99}',
        [T_EDGES],
    ),
    _c(
        "tarhdr: uname field 31 bytes",
        '{"uname", own->uname, own->uname_len, 32}',
        '{"uname", own->uname, own->uname_len, 31}',
        [T_EDGES],
    ),
]


def copy_tree(dest: Path) -> Path:
    """src (with the built kernels), tests, csrc, setup.py, pyproject.toml into dest."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    for name in ("src", "tests", "csrc"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore, symlinks=True)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


def env_for(tree: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FASTLAYER_REQUIRE_VALIDATORS", None)  # a skip is no kill, but no failure either
    return env


def build_kernel(tree: Path) -> bool:
    r = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "--force", "-q"], cwd=tree,
        env={**env_for(tree), "FASTLAYER_ONLY": "tarstream"}, capture_output=True, text=True,
    )  # fmt: skip
    return r.returncode == 0


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[str, str]:
    """('killed', the failing test), ('survived', ''), ('timeout', '') or an error."""
    try:
        r = subprocess.run(
            [*PYTEST, "-rf", *tests], cwd=tree, env=env_for(tree), capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", ""  # a hang is a kill too: the user sees it
    if r.returncode == 0:
        return "survived", ""
    if r.returncode == 1:
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED ")]
        return "killed", failed[0][7:160] if failed else ""
    return f"error (pytest exit {r.returncode})", r.stdout[-300:]


def critical(tree: Path, names: list[str] | None, timeout: float, tests: list[str] | None) -> int:
    survivors = 0
    for m in CRITICAL:
        m = Mutation(m.name, m.path, m.old, m.new, tests or m.tests)
        if names and not any(n in m.name for n in names):
            continue
        path = tree / m.path
        original = path.read_text()
        if original.count(m.old) != 1:
            print(f"STALE    {m.name}: {m.old!r} occurs {original.count(m.old)} times in {m.path}")
            survivors += 1
            continue
        start = time.monotonic()
        path.write_text(original.replace(m.old, m.new))
        try:
            is_c = m.path.endswith(".c")
            if is_c and not build_kernel(tree):
                outcome, why = "error (the mutant does not compile)", ""
            else:
                outcome, why = run_tests(tree, m.tests, timeout)
        finally:
            path.write_text(original)
            if m.path.endswith(".c"):
                build_kernel(tree)
        took = time.monotonic() - start
        print(f"{outcome.upper():8} {m.name} ({took:.0f} s)\n         {why or ' '.join(m.tests)}",
              flush=True)  # fmt: skip
        survivors += outcome == "survived"
    return survivors


# -- cosmic-ray over the critical modules ----------------------------------------------

# module (under src/fastlayer) -> the tests that exercise it; -x stops at the first kill.
MODULES = {
    "registry/pull.py": [T_INTEGRITY, T_HOSTILE, "tests/test_registry.py", T_FLAGS],
    "registry/push.py": [T_HOSTILE, T_FLAGS, "tests/test_registry.py"],
    "registry/client.py": [T_AUTH, T_INTEGRITY, T_HOSTILE, "tests/test_registry_units.py"],
    "registry/auth.py": [T_AUTH, "tests/test_registry_units.py", T_HOSTILE],
    "registry/reference.py": ["tests/test_registry_units.py", T_INTEGRITY],
    "registry/cache.py": ["tests/test_registry_units.py", T_HOSTILE],
    "sources/base_image.py": [
        T_INTEGRITY,
        "tests/test_base_image.py",
        "tests/test_hostile_base.py",
    ],
    "sources/base_archive.py": ["tests/test_base_image.py", "tests/test_hostile_base.py"],
    "sources/schema.py": ["tests/test_hostile_base.py", "tests/test_base_image.py"],
    "sources/explicit.py": ["tests/test_explicit_layers.py"],
    "sources/customisation.py": ["tests/test_build.py", "tests/test_hostile_inputs.py"],
    "nix/db.py": [T_EDGES, "tests/test_nix_db.py"],
    "plan/popularity.py": ["tests/test_plan_popularity.py"],
    "plan/stable.py": ["tests/test_plan_stable.py"],
    "plan/limit.py": ["tests/test_plan_limit.py"],
    "plan/auto.py": ["tests/test_plan_auto.py"],
    "plan/pipeline.py": ["tests/test_plan_pipeline.py"],
}


def _in_annotation(m) -> bool:
    """A `|` of a type annotation (`str | None`): never evaluated here (annotations
    are strings under `from __future__ import annotations`), so its mutants are
    equivalent; the first sampled run spent a quarter of its survivors on them."""
    if not m.operator_name.startswith("core/ReplaceBinaryOperator_BitOr_"):
        return False
    line = Path(m.module_path).read_text().splitlines()[m.start_pos[0] - 1]
    return re.search(r"[\w\]]\s*\|\s*None\b|None\s*\|", line) is not None


def tool(tree: Path, modules: list[str], minutes: float, seed: int, timeout: float) -> int:
    """cosmic-ray's mutants of modules in a seeded random order until the time box is
    spent; results go to cosmic-ray's own session file (tree/session.sqlite)."""
    try:
        from cosmic_ray.commands.init import init
        from cosmic_ray.mutating import mutate_and_test
        from cosmic_ray.work_db import WorkDB, use_db
        from cosmic_ray.work_item import TestOutcome
    except ImportError:
        print("bench/mutation.py needs cosmic-ray: pip install cosmic-ray", file=sys.stderr)
        return -1
    os.chdir(tree)  # cosmic-ray runs the test command here
    os.environ.update(env_for(tree))
    base = tree / "src" / "fastlayer"
    survivors: list[tuple[str, str]] = []
    with use_db(str(tree / "session.sqlite"), WorkDB.Mode.create) as db:
        init([base / m for m in modules], db, {})
        items = [w for w in sorted(db.pending_work_items, key=lambda w: w.job_id)
                 if not _in_annotation(w.mutations[0])]  # fmt: skip
        random.Random(seed).shuffle(items)
        per = {m: [0, 0, 0] for m in modules}  # module -> [mutants, run, survived]
        module_of = {}
        for w in items:
            module = str(Path(w.mutations[0].module_path).relative_to(base))
            module_of[w.job_id] = module
            per[module][0] += 1
        print(f"{len(items)} mutants in {len(modules)} modules; {minutes:g} min, seed {seed}")
        deadline = time.monotonic() + minutes * 60
        for w in items:
            if time.monotonic() > deadline:
                break
            module = module_of[w.job_id]
            command = " ".join([*PYTEST, *MODULES[module]])
            result = mutate_and_test(w.mutations, command, timeout)
            db.set_result(w.job_id, result)
            per[module][1] += 1
            if result.test_outcome == TestOutcome.SURVIVED:
                per[module][2] += 1
                m = w.mutations[0]
                where = f"{module}:{m.start_pos[0]} {m.operator_name}"
                survivors.append((where, result.diff))
                print(f"SURVIVED {where}\n{result.diff}", flush=True)
    print(f"\n{'module':26} {'mutants':>8} {'run':>5} {'survived':>9}")
    for module, (total, run, survived) in per.items():
        print(f"{module:26} {total:8} {run:5} {survived:9}")
    return len(survivors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--critical", action="store_true", help="the hand-listed mutations")
    ap.add_argument("--list", action="store_true", help="list the hand-listed mutations")
    ap.add_argument("--only", action="append", help="critical mutations whose name has this")
    ap.add_argument("--minutes", type=float, default=20, help="time box of --tool")
    ap.add_argument("--module", action="append", help=f"of {', '.join(MODULES)}")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant's tests")
    ap.add_argument("--tests", action="append", help="run these tests instead (--critical)")
    ap.add_argument("--keep", action="store_true", help="keep the copied tree")
    args = ap.parse_args()
    if args.list:
        for m in CRITICAL:
            print(f"{m.name}: {m.path}\n    {' '.join(m.tests)}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="fastlayer-mutation-"))
    try:
        tree = copy_tree(tmp / "tree")
        if args.critical:
            survivors = critical(tree, args.only, args.timeout, args.tests)
        else:
            survivors = tool(tree, args.module or list(MODULES), args.minutes, args.seed,
                             args.timeout)  # fmt: skip
        if survivors < 0:
            return 2
        print(f"\n{survivors} survivor(s)")
        return 1 if args.critical and survivors else 0
    finally:
        if args.keep:
            print(f"tree kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
