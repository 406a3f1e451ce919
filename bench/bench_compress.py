"""Whole-archive compression speed: fastlayer's gzip/zstd against pigz and zstd -T0.

    python bench/bench_compress.py [--data FILE] [--dir DIR] [--size 1G] [--repeat 3]

Input: FILE, or (default) one layer tar of every path of the synthetic store
in DIR (bench/synthstore.py; made if missing), written once to
DIR-compress/data-SIZE.tar. Every method reads that file on stdin and
writes its output to a file, as a separate process; the page cache is warm.
Methods run round robin, --repeat times. Reported: the best wall time as
input MB/s (10^6 bytes), its CPU seconds, compressed size / input size, and
the output's sha256 (one value for every run: else the table says so).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]


def child(kind: str, threads: int) -> None:
    """Compress stdin to stdout with fastlayer's compressor (the measured process)."""
    from fastlayer.sinks.compress import FdWriter, compressor

    comp = compressor(kind, FdWriter(1, hashing=False), threads)
    while chunk := os.read(0, 1 << 20):
        comp.write(chunk)
    comp.close()


def make_data(directory: Path, size: str) -> Path:
    import synthstore

    from fastlayer.emit import Owner, StreamSource, store_layer

    synthstore.ensure_store(directory, synthstore.parse_size(size))
    out = directory.parent / f"{directory.name}-compress" / f"data-{size}.tar"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = sorted("/nix/store/" + p.name for p in (directory / "nix" / "store").iterdir())
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as f:
        StreamSource(store_layer(paths, Owner(), str(directory))).pump(f.write)
    tmp.rename(out)
    return out


def run(argv: list[str], data: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one run of argv < data > out."""
    with open(data, "rb") as fin, open(out, "wb") as fout:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=fin, stdout=fout)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed with {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def methods(cores: int) -> list[tuple[str, list[str]]]:
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    return [
        (f"fastlayer gzip (isal level 2, {cores} threads)", [*me, "gzip", str(cores)]),
        ("fastlayer gzip (isal level 2, 1 thread)", [*me, "gzip", "1"]),
        (f"pigz -6 -p {cores} (default level)", ["pigz", "-6", "-p", str(cores), "-c"]),
        (f"pigz -1 -p {cores}", ["pigz", "-1", "-p", str(cores), "-c"]),
        (f"fastlayer zstd (level 3, {cores} threads)", [*me, "zstd", str(cores)]),
        ("fastlayer zstd (level 3, 1 worker)", [*me, "zstd", "1"]),
        ("zstd -3 -T0", ["zstd", "-3", "-T0", "-q", "-c"]),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="file to compress (default: synthstore layer tar)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fastlayer-bench"))
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    data = args.data or make_data(args.dir.resolve(), args.size)
    size = data.stat().st_size
    with open(data, "rb") as f:  # warm the page cache
        while f.read(1 << 24):
            pass
    cores = len(os.sched_getaffinity(0))
    out = data.parent / "bench-out"
    print(f"input {data}: {size / 1e6:.0f} MB; {cores} cores; load {os.getloadavg()[0]:.2f}")
    table = [(label, cmd) for label, cmd in methods(cores) if shutil.which(cmd[0])]
    best = {label: (float("inf"), 0.0) for label, _ in table}
    digests: dict[str, set[str]] = {label: set() for label, _ in table}
    ratio: dict[str, float] = {}
    for _ in range(args.repeat):  # round robin: a busy moment hits every method alike
        for label, cmd in table:
            wall, used = run(cmd, data, out)
            best[label] = min(best[label], (wall, used))
            digests[label].add(sha256(out))
            ratio[label] = out.stat().st_size / size
    print("| method | MB/s | CPU s | ratio | sha256 (first 12) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for label, _ in table:
        wall, used = best[label]
        d = digests[label]
        shown = next(iter(d))[:12] if len(d) == 1 else "DIFFERS between runs"
        print(f"| {label} | {size / 1e6 / wall:.0f} | {used:.1f} | {ratio[label]:.3f} | {shown} |")
    out.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
