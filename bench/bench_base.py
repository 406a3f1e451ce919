"""Prepending a large base image: `fastlayer build` with from_image against `cat`.

    python bench/bench_base.py [--dir /tmp/fastlayer-bench] [--size 1G] [--repeat 3]

Builds (once) a docker-archive base image from the synthetic store of
bench/synthstore.py, then times each, with the page cache warm, --repeat times:

- cat: `cat base.tar > out` (one sequential copy of the base file: the floor);
- fastlayer: `fastlayer build spec.json -o out.tar` where the spec has the base
  as from_image and a one-file customisation layer: base layers are copied
  once, trusted by their diff_ids (no re-hash);
- fastlayer verified: the same with verify_base = true (the default): each
  layer's region is hashed (preadv into a small buffer) on two threads,
  ahead of and beside its kernel copy.

The three runs alternate each round, so load changes hit them alike; the
last lines give verified/cat and trusted/cat from this one run, of the best
and of the median times (the machine may be shared: quote both, and the
load average printed with them).

Outputs of both go to --out-dir (default /dev/shm when it exists): on a
disk, the kernel's writeback of the previous run's gigabyte throttles the
next one by seconds, which measures the disk, not the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthstore import ensure_store, parse_size  # noqa: E402


def timed(argv: list[str], stdout=None) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=stdout)
    return time.perf_counter() - t


def interleaved(
    runs: dict[str, tuple[list[str], Path | None]], repeat: int, outputs: list[Path]
) -> dict[str, list[float]]:
    """The wall times of each run, the runs taken in turn each round so that a
    change of machine load hits them alike; the first round warms the cache."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat + 1):
        for name, (argv, out) in runs.items():
            # a previous run's gigabyte is freed here, untimed, for every run alike
            # (fastlayer renames over its output, cat truncates it)
            for f in outputs:
                f.unlink(missing_ok=True)
            if out is not None:
                with open(out, "wb") as f:
                    times[name].append(timed(argv, stdout=f))
            else:
                times[name].append(timed(argv))
    return {name: t[1:] for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/fastlayer-bench")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    args = ap.parse_args()
    root = Path(args.dir).resolve()
    ensure_store(root, parse_size(args.size))
    work = root / "base-bench"
    work.mkdir(exist_ok=True)
    base = work / "base.tar"
    fl = [sys.executable, "-m", "fastlayer"]
    if not base.exists():
        conf = root / "conf.json"
        subprocess.run(
            [*fl, "stream-nix", "--root", str(root), str(conf), "-o", str(base)], check=True
        )
    (work / "motd").write_text("hello\n")
    for verify in (False, True):
        spec = {
            "name": "bench/child",
            "tag": "t",
            "from_image": str(base),
            "max_layers": 128,
            "verify_base": verify,
            "contents": {"files": [str(work / "motd")]},
        }
        (work / f"spec-{verify}.json").write_text(json.dumps(spec))
    size = base.stat().st_size
    out = Path(args.out_dir) if args.out_dir else work
    build = [*fl, "build", "-q"]
    runs = {
        "cat base.tar > out": (["cat", str(base)], out / "fastlayer-cat.out"),
        "fastlayer build (trusted)": (
            [*build, str(work / "spec-False.json"), "-o", str(out / "fastlayer-o.tar")],
            None,
        ),
        "fastlayer build (verified)": (
            [*build, str(work / "spec-True.json"), "-o", str(out / "fastlayer-v.tar")],
            None,
        ),
    }
    outputs = [out / f for f in ("fastlayer-cat.out", "fastlayer-o.tar", "fastlayer-v.tar")]
    load = os.getloadavg()[0]
    times = interleaved(runs, args.repeat, outputs)
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    for f in ("fastlayer-cat.out", "fastlayer-o.tar", "fastlayer-v.tar"):
        (out / f).unlink(missing_ok=True)
    mib = size / 2**20
    print(
        f"base image: {mib:.0f} MiB, {args.size} synthetic store, {args.repeat} rounds, "
        f"outputs in {out}, load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(f"{'run':28s} {'best s':>8s} {'MiB/s':>8s} {'x cat':>7s} {'median s':>9s} {'x cat':>7s}")
    cat, cat_median = best["cat base.tar > out"], median["cat base.tar > out"]
    for name, t in best.items():
        m = median[name]
        print(f"{name:28s} {t:8.2f} {mib / t:8.0f} {t / cat:7.2f} {m:9.2f} {m / cat_median:7.2f}")
    for what, b in (("best", best), ("median", median)):
        verified = b["fastlayer build (verified)"] / b["cat base.tar > out"]
        trusted = b["fastlayer build (trusted)"] / b["cat base.tar > out"]
        print(f"{what}: verified/cat = {verified:.2f}x, trusted/cat = {trusted:.2f}x (same run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
