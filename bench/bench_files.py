"""Files per second and stat calls per file when streaming many small files (issue #14).

    PYTHONPATH=src python bench/bench_files.py [--dir /tmp/fastlayer-files] [--files 200000]
        [--size 400M] [--baseline-src OTHER/src] [--repeat 3] [--strace]

On a synthetic store (bench/synthstore.py, page cache warm), in the same run:
- fastlayer: every store path walked and streamed as one layer tar into a
  null sink (walk + read + tar framing; `LayerStream` via emit.pump), in a
  child process with this tree's PYTHONPATH;
- baseline (`--baseline-src`): the same child with another tree's src (e.g.
  main built in a scratch copy), to compare against today's code;
- tar: `tar -cf - nix/store | cat > /dev/null` on the same tree (GNU tar skips
  reading files when -f is /dev/null itself, so it writes into a pipe).
--strace counts syscalls of each fastlayer child (`strace -c -f`) and prints
stat calls (newfstatat, fstat, statx, lstat, stat) and opens per file.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthstore import ensure_store, parse_size  # noqa: E402

CHILD = """
import os, sys, time
from fastlayer.emit import Owner, pump, store_layer
store = sys.argv[1]
paths = sorted(os.path.join(store, p) for p in os.listdir(store))
t = time.perf_counter()
pump(store_layer(paths, Owner()), lambda b: None)
print(time.perf_counter() - t)
"""

STATS = ("newfstatat", "fstat", "statx", "lstat", "stat", "fstatat64")


def child(src: str, store: str, strace: bool) -> tuple[float, dict[str, int]]:
    env = dict(os.environ, PYTHONPATH=src)
    cmd = [sys.executable, "-c", CHILD, store]
    counts: dict[str, int] = {}
    if not strace:
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        return float(out), counts
    with tempfile.NamedTemporaryFile("r") as log:
        cmd = ["strace", "-c", "-f", "-o", log.name, *cmd]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        for line in log.read().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m:
                counts[m.group(2)] = int(m.group(1))
    return float(out), counts


def best(fn, repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/fastlayer-files")
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--size", default="400M")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline-src", help="another tree's src dir (today's code)")
    ap.add_argument("--strace", action="store_true", help="also count syscalls (strace -c)")
    args = ap.parse_args()

    stamp = ensure_store(args.dir, parse_size(args.size), args.seed, n_files=args.files)
    store = str(Path(args.dir).resolve() / "nix/store")
    files = stamp["files"]
    print(
        f"## {files} files, {stamp['dirs']} dirs, {stamp['symlinks']} symlinks, "
        f"{stamp['bytes'] / 2**20:.0f} MiB in {stamp['paths']} store paths"
    )
    here = str(Path(__file__).resolve().parent.parent / "src")
    runs = [("fastlayer", here)] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
    subprocess.run(
        ["tar", "-cf", "/dev/null", "-C", args.dir, "nix/store"], check=True
    )  # warm the cache
    times = {}
    for name, src in runs:
        child(src, store, False)  # warm
        times[name] = best(lambda src=src: child(src, store, False)[0], args.repeat)
    tar_cmd = f"tar -cf - -C {args.dir} nix/store | cat > /dev/null"

    def tar_once() -> float:
        t = time.perf_counter()
        subprocess.run(tar_cmd, shell=True, check=True)
        return time.perf_counter() - t

    times["tar"] = best(tar_once, args.repeat)
    base = times["tar"]
    print("| run | seconds | files/s | time / tar |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.2f} | {files / t:,.0f} | {t / base:.2f}x |")
    if "baseline" in times:
        print(f"fastlayer / baseline: {times['fastlayer'] / times['baseline']:.2f}x")
    if args.strace:
        if not shutil.which("strace"):
            sys.exit("--strace: strace is not installed")
        for name, src in runs:
            _, c = child(src, store, True)
            stats = sum(c.get(s, 0) for s in STATS)
            print(
                f"{name}: {stats} stat calls ({stats / files:.2f} per file), "
                f"{c.get('openat', 0) + c.get('open', 0)} opens, {c.get('read', 0)} reads"
            )


if __name__ == "__main__":
    main()
