"""NAR hashing speed: fastlayer vs `nix-hash --type sha256` vs the read+sha256 floor.

Usage: PYTHONPATH=src python bench/bench_nar.py [--size 1G] [--dir /tmp/fastlayer-bench]

Uses bench/synthstore.py's deterministic store (generated once, shared with
the other benchmarks: ~40,000 files and 400 store paths per GiB, symlinks,
hard links, executables). Then, in one run and on the same warm page cache:

  floor       read every file (1 MiB readinto) + hashlib.sha256, one thread
  sha256 only hashlib.sha256 over as many bytes from a hot buffer (no I/O)
  nix-hash    nix-hash --type sha256 --base32 TREE   (whole tree as one path)
  walk only   fastlayer's NAR walk with a sink that discards (I/O + framing cost)
  fastlayer   nar_hash(TREE)                          (one path, one thread)
  pipelined   nar_hash(TREE, pipelined=True)          (one path; sha256 on a 2nd thread)
  many        nar_hash_many(store paths, jobs=CPUs)   (paths in parallel)
  nix-hash N  nix-hash --type sha256 PATH...          (same paths, Nix is serial)
  scan        scan_store(STORE): references + narHash of every path, jobs=CPUs
  scan kernel the reference scanner alone on binary, text and worst-case input

Each figure is the best of --repeat rounds; each round runs every contender
in turn, so load from other jobs on a shared machine hits them alike. CPU
time (user+sys, all threads, children included) is steadier than wall time
there. Ratios are time / floor time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import synthstore
from fastlayer._native.scan import RefTable

from fastlayer.nix.base32 import ALPHABET
from fastlayer.nix.nar import default_jobs, nar_hash, nar_hash_many, walk
from fastlayer.nix.scan import scan_store

NIX_ENV = {**os.environ, "NIX_CONFIG": "build-users-group =\nexperimental-features = nix-command"}


def floor(root: Path) -> int:
    """Read + sha256 every file, single thread, large buffers: the work any NAR hash does."""
    return synthstore.floor_once(root)[1]


def cpu_seconds() -> float:
    """User+system CPU of this process (all threads) and of waited-for children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def hash_only(nbytes: int) -> None:
    """sha256 of nbytes from one hot 1 MiB buffer: the hashing cost with no I/O at all."""
    buf = memoryview(random.Random(1).randbytes(1 << 20))
    h = hashlib.sha256()
    for _ in range(nbytes >> 20):
        h.update(buf)
    h.update(buf[: nbytes & ((1 << 20) - 1)])


def scan_kernel_rates(repeat: int) -> list[tuple[str, float]]:
    """GiB/s of the reference-scan kernel alone, 10,000 candidates, 64 MiB inputs."""
    rng = random.Random(1)
    table = RefTable("".join(rng.choice(ALPHABET) for _ in range(32 * 10_000)).encode())
    inputs = {
        "binary (random bytes)": rng.randbytes(64 << 20),
        "lowercase text (base32 words, spaces)": "".join(
            rng.choice(ALPHABET + "  \n") for _ in range(1 << 20)
        ).encode()
        * 64,
        "worst case: nothing but nix-base32": bytes(
            rng.choice(ALPHABET.encode()) for _ in range(1 << 20)
        )
        * 64,
    }
    rates = []
    for name, data in inputs.items():
        found = bytearray(len(table))
        fn = lambda d=data, f=found: table.scan_chunks([d], f)  # noqa: E731
        secs = rounds({name: fn}, repeat)[name][0]
        rates.append((name, len(data) / secs / 2**30))
    return rates


def run_nix_hash(exe: str, paths: list[Path]) -> str:
    argv = [exe, "--type", "sha256", "--base32", *map(str, paths)]
    return subprocess.run(argv, check=True, capture_output=True, env=NIX_ENV).stdout.decode()


def rounds(contenders: dict[str, Callable[[], object]], repeat: int) -> dict[str, tuple]:
    """Best wall and CPU per contender, running them in turn each round so that
    load from other jobs on the shared machine hits all of them alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    results: dict[str, object] = {}
    for _ in range(repeat):
        for name, fn in contenders.items():
            c, t = cpu_seconds(), time.perf_counter()
            results[name] = fn()
            times[name].append((time.perf_counter() - t, cpu_seconds() - c))
    return {
        name: (min(w for w, _ in ts), min(c for _, c in ts), results[name])
        for name, ts in times.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="synthstore size, e.g. 64M, 1G")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/fastlayer-bench", help="synthstore directory")
    args = ap.parse_args()
    nix_hash = shutil.which("nix-hash")

    stamp = synthstore.ensure_store(args.dir, synthstore.parse_size(args.size))
    tree = Path(args.dir).resolve() / "nix" / "store"
    paths = sorted(tree.iterdir())
    jobs = default_jobs()
    print(f"tree: {tree} ({stamp['paths']} store paths, {stamp['files']} files)")
    nbytes = floor(tree)  # also warms the page cache
    load = os.getloadavg()[0]

    n = len(paths)
    contenders: dict[str, Callable[[], object]] = {
        "floor: read+sha256, 1 thread": lambda: floor(tree),
        "sha256 only, same byte count, no I/O": lambda: hash_only(nbytes),
        "fastlayer NAR walk+read only (no hash)": lambda: walk(tree, lambda mv: None),
        "fastlayer nar_hash(TREE), 1 thread": lambda: nar_hash(tree, pipelined=False),
        "fastlayer nar_hash(TREE), pipelined": lambda: nar_hash(tree, pipelined=True),
        f"fastlayer nar_hash_many({n} paths, jobs={jobs})": lambda: nar_hash_many(paths, jobs),
        f"fastlayer scan_store({n} paths, jobs={jobs})": lambda: scan_store(tree, jobs=jobs),
    }
    if nix_hash:
        contenders["nix-hash --type sha256 TREE"] = lambda: run_nix_hash(nix_hash, [tree])
        contenders[f"nix-hash --type sha256 ({n} paths)"] = lambda: run_nix_hash(nix_hash, paths)
    res = rounds(contenders, args.repeat)

    info = res["fastlayer nar_hash(TREE), 1 thread"][2]
    print(f"file bytes: {nbytes} ({nbytes / 2**30:.3f} GiB); narSize {info.nar_size}")
    print(f"1-min load average before timing: {load:.2f} (shared machine)")
    print(f"best of {args.repeat} rounds, contenders run in turn each round")
    print(f"{'what':48} {'wall s':>7} {'MiB/s':>7} {'x floor':>7} {'cpu s':>7} {'x floor':>7}")
    t_floor, c_floor, _ = res["floor: read+sha256, 1 thread"]
    for name, (wall, cpu, _) in res.items():
        print(
            f"{name:48} {wall:7.3f} {nbytes / 2**20 / wall:7.0f} {wall / t_floor:7.2f}"
            f" {cpu:7.3f} {cpu / c_floor:7.2f}"
        )
    for name, rate in scan_kernel_rates(3):
        print(f"scan kernel alone, {name}: {rate:.2f} GiB/s")
    c_hash = res["sha256 only, same byte count, no I/O"][1]
    c_walk = res["fastlayer NAR walk+read only (no hash)"][1]
    t_one, c_one, _ = res["fastlayer nar_hash(TREE), 1 thread"]
    t_pipe = res["fastlayer nar_hash(TREE), pipelined"][0]
    t_many = res[f"fastlayer nar_hash_many({n} paths, jobs={jobs})"][0]
    print(f"nar_hash cpu / (sha256 only + walk only) cpu: {c_one / (c_hash + c_walk):.2f}")
    if nix_hash:
        t_nix, c_nix, out = res["nix-hash --type sha256 TREE"]
        assert out.strip() == info.nar_hash.removeprefix("sha256:"), "hash differs from nix-hash"
        t_nix_many = res[f"nix-hash --type sha256 ({n} paths)"][0]
        print(
            f"nix-hash time / fastlayer time, one tree: wall {t_nix / t_one:.2f}, "
            f"cpu {c_nix / c_one:.2f}; pipelined: wall {t_nix / t_pipe:.2f}"
        )
        print(f"nix-hash time / fastlayer time, {n} paths: wall {t_nix_many / t_many:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
