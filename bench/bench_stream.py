"""Time `fastlayer stream-nix` against the floor and nixpkgs' script.

    python bench/bench_stream.py [--dir /tmp/fastlayer-bench] [--size 1G]
                                 [--reference stream_layered_image.py]

On the synthetic store of bench/synthstore.py (generated on first use), with
the page cache warm (each command runs once untimed, its output hashed, then
the best of --repeat timed runs counts):

- floor: read every store file once and sha256 it, one thread, Python,
  1 MiB reads: what any single-pass streamer must at least do;
- fastlayer: `python -m fastlayer stream-nix --root DIR conf.json > /dev/null`;
- startup: `python -m fastlayer stream-nix --help`, the fixed cost in the above;
- reference (with --reference): nixpkgs' stream_layered_image.py on the same
  conf, run by the same Python. As root it reads the store through a private
  mount namespace with DIR/nix/store on /nix/store (the same bytes as
  fastlayer's); otherwise it gets conf-abs.json (host paths).

Peak RSS and CPU come from wait4() on each child; "memfd" is the peak size of
the memfd files it holds (sampled; page cache that RSS leaves out). The table shows wall
seconds, throughput over the store's file bytes, and the ratios
fastlayer/floor and reference/fastlayer. --json FILE also writes the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthstore import ensure_store, floor_once, parse_size  # noqa: E402

NAMESPACE = (
    'mount -t tmpfs none /nix && mkdir /nix/store && mount --bind "$1/nix/store" /nix/store'
    ' && shift && exec "$@"'
)


class SpoolSampler(threading.Thread):
    """Peak bytes a process holds in memfd files (spools in page cache: memory
    that RSS does not show), sampled every 10 ms from /proc/PID/fd."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        fd_dir = f"/proc/{self.pid}/fd"
        while not self.done.wait(0.01):
            total = 0
            try:
                for fd in os.listdir(fd_dir):
                    link = os.path.join(fd_dir, fd)
                    if os.readlink(link).startswith("/memfd:"):
                        total += os.stat(link).st_blocks * 512
            except OSError:
                continue  # an fd closed under us, or the process is gone
            self.peak = max(self.peak, total)


def run_child(argv: list[str], stdout) -> dict:
    """Run argv with stdout to `stdout` (a file or PIPE); return wall, CPU, peak RSS."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err)
        sampler = SpoolSampler(proc.pid)
        sampler.start()
        digest, size = None, 0
        if stdout is subprocess.PIPE:
            h = hashlib.sha256()
            while chunk := proc.stdout.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
            digest = h.hexdigest()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{tail}")
    return {
        "wall": wall,
        "user": ru.ru_utime,
        "sys": ru.ru_stime,
        "rss_mib": ru.ru_maxrss / 1024,
        "memfd_mib": sampler.peak / (1 << 20),
        "sha256": digest,
        "out_bytes": size,
    }


def measure(argv: list[str], repeat: int, out_file: Path | None = None) -> dict:
    """Best of `repeat` after one untimed run, which also hashes the output
    (stdout, or `out_file` for commands that write one)."""
    with open(os.devnull, "wb") as devnull:
        warm = run_child(argv, devnull if out_file else subprocess.PIPE)
        if out_file:
            h = hashlib.sha256()
            with open(out_file, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            warm["sha256"] = h.hexdigest()
            warm["out_bytes"] = out_file.stat().st_size
        runs = [run_child(argv, devnull) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["wall"])
    best["rss_mib"] = max(r["rss_mib"] for r in runs)
    best["memfd_mib"] = max(r["memfd_mib"] for r in runs)
    best["sha256"], best["out_bytes"] = warm["sha256"], warm["out_bytes"]
    best["walls"] = [round(r["wall"], 3) for r in runs]
    return best


def reference_argv(script: str, directory: Path) -> tuple[list[str], str]:
    if os.geteuid() == 0 and shutil.which("unshare") and os.path.isdir("/nix"):
        conf = str(directory / "conf.json")
        return ["unshare", "-m", "sh", "-c", NAMESPACE, "sh", str(directory),
                sys.executable, script, conf], "same conf, /nix/store bind-mounted"  # fmt: skip
    return [sys.executable, script, str(directory / "conf-abs.json")], "conf-abs.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/fastlayer-bench")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reference", metavar="PATH", help="nixpkgs' stream_layered_image.py")
    ap.add_argument("--no-fastlayer", action="store_true", help="skip fastlayer (floor/reference)")
    ap.add_argument("--also-file", action="store_true", help="also time fastlayer -o FILE")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)

    directory = Path(args.dir).resolve()
    stamp = ensure_store(directory, parse_size(args.size), args.seed)
    store = directory / "nix" / "store"
    store_mib = stamp["bytes"] / (1 << 20)
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    results: dict[str, dict] = {}

    floor_once(store)  # warm
    walls = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        floor_once(store)
        walls.append(time.perf_counter() - t0)
    results["floor"] = {"wall": min(walls), "walls": [round(w, 3) for w in walls]}

    if not args.no_fastlayer:
        cmd = [sys.executable, "-m", "fastlayer", "stream-nix", "--root", str(directory),
               str(directory / "conf.json")]  # fmt: skip
        results["fastlayer"] = measure(cmd, args.repeat)
        if args.also_file:  # -o FILE: a seekable output, in the page cache
            out = directory / "bench-out.tar"
            try:
                results["fastlayer -o"] = measure([*cmd, "-o", str(out)], args.repeat, out)
            finally:
                out.unlink(missing_ok=True)
        # The fixed cost inside that figure: interpreter start and imports.
        results["startup"] = measure([sys.executable, "-m", "fastlayer", "stream-nix", "--help"],
                                     args.repeat)  # fmt: skip
    note = ""
    if args.reference:
        cmd, note = reference_argv(args.reference, directory)
        results["reference"] = measure(cmd, args.repeat)

    print(
        f"store: {stamp['paths']} paths, {stamp['files']} files, {store_mib:.0f} MiB; "
        f"{len(json.loads((directory / 'conf.json').read_text())['store_layers'])} store layers; "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; best of {args.repeat}, warm"
    )
    print(f"load average before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print(
        f"{'':<12} {'wall s':>8} {'MiB/s':>8} {'user s':>7} {'sys s':>7} {'RSS MiB':>8}"
        f" {'memfd MiB':>9}  runs"
    )
    for name, r in results.items():
        rss = (
            f"{r['rss_mib']:8.0f} {r['memfd_mib']:9.0f}" if "rss_mib" in r else f"{'-':>8} {'-':>9}"
        )
        rate = f"{'-':>8}" if name == "startup" else f"{store_mib / r['wall']:8.0f}"
        cpu = f"{r['user']:7.2f} {r['sys']:7.2f}" if "user" in r else f"{'-':>7} {'-':>7}"
        print(f"{name:<12} {r['wall']:8.2f} {rate} {cpu} {rss}  {r['walls']}")
    if "fastlayer" in results:
        ratio = results["fastlayer"]["wall"] / results["floor"]["wall"]
        print(f"fastlayer / floor     = {ratio:.2f}")
    if "reference" in results and "fastlayer" in results:
        ratio = results["reference"]["wall"] / results["fastlayer"]["wall"]
        print(f"reference / fastlayer = {ratio:.2f}")
        same = results["reference"]["sha256"] == results["fastlayer"]["sha256"]
        print(
            f"outputs: fastlayer {results['fastlayer']['out_bytes']} bytes, reference "
            f"{results['reference']['out_bytes']} bytes: {'identical' if same else 'DIFFERENT'}"
            f" (reference: {note})"
        )
    elif "reference" in results:
        print(f"reference output: {results['reference']['out_bytes']} bytes ({note})")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"store": stamp, "load": [load_before, os.getloadavg()[0]], "results": results},
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
