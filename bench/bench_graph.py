"""Graph loading (issue #14): `fastlayer rank` end to end against `json.load` alone.

    PYTHONPATH=src python bench/bench_graph.py [--big] [--repeat 3] [--baseline-src OTHER/src]

Graphs from bench/graphgen.py, written once under --dir as exportReferencesGraph
JSON: 200,000 paths / ~890,000 references (~81 MiB), and with --big 1,000,000
paths / ~10.4M references (~733 MiB). Every figure is a fresh child process,
best wall time of --repeat, peak RSS from wait4(), all in the same run:

- json.load: `python -c 'json.load(open(F))'`, start-up included (the baseline);
- orjson / msgspec / simdjson: the same with those decoders, when installed
  (generic decoding to Python objects; msgspec also into typed Structs);
- fastlayer rank: `python -m fastlayer rank F > /dev/null`, end to end;
- baseline rank (--baseline-src): the same with another tree's src (today's code).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphgen  # noqa: E402

SRC = str(Path(__file__).resolve().parent.parent / "src")

DECODERS = {
    "json.load": (None, "import json,sys; json.load(open(sys.argv[1], 'rb'))"),
    "orjson.loads": ("orjson", "import orjson,sys; orjson.loads(open(sys.argv[1], 'rb').read())"),
    "msgspec.json.decode": (
        "msgspec",
        "import msgspec,sys; msgspec.json.decode(open(sys.argv[1], 'rb').read())",
    ),
    "msgspec typed Structs": (
        "msgspec",
        "import msgspec,sys\n"
        "class Node(msgspec.Struct):\n"
        "    path: str\n"
        "    references: list[str] = []\n"
        "    narSize: int | None = None\n"
        "    narHash: str | None = None\n"
        "    closureSize: int | None = None\n"
        "    deriver: str | None = None\n"
        "msgspec.json.decode(open(sys.argv[1], 'rb').read(), type=list[Node])",
    ),
    "simdjson (to Python)": (
        "simdjson",
        "import simdjson,sys; simdjson.Parser().parse(open(sys.argv[1], 'rb').read(), True)",
    ),
}


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MiB) and CPU seconds (user + sys) of one child."""
    t = time.perf_counter()
    with open(os.devnull, "wb") as null:
        p = subprocess.Popen(cmd, stdout=null, env=env)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return wall, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime


def best(
    cmd: list[str], repeat: int, env: dict[str, str] | None = None
) -> tuple[float, float, float]:
    runs = [run(cmd, env) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)


def ensure_graph(path: Path, n: int) -> None:
    if path.exists():
        return
    # The 200k shape of the issue (mean_refs 4.5: ~890k references); the 1M one
    # is bench_plan's --big graph.
    g = (
        graphgen.generate(n, 21, None, 2000, 10.7)
        if n >= 1_000_000
        else graphgen.generate(n, seed=11, mean_refs=4.5)
    )
    tmp = path.with_suffix(".tmp")
    g.write_json(str(tmp))
    tmp.rename(path)


def bench(path: Path, repeat: int, baseline: str | None, decoders: bool = True) -> None:
    size = path.stat().st_size / 2**20
    print(f"## {path.name}: {size:.0f} MiB")
    print("| run | wall s | CPU s | peak RSS MiB | time / json.load |")
    print("|---|---|---|---|---|")
    rows = []
    for name, (module, code) in DECODERS.items():
        if module and (not decoders or importlib.util.find_spec(module) is None):
            continue
        rows.append((name, *best([sys.executable, "-c", code, str(path)], repeat)))
    base = rows[0][1]
    rank = [sys.executable, "-m", "fastlayer", "rank", str(path)]
    rows.append(("fastlayer rank", *best(rank, repeat, dict(os.environ, PYTHONPATH=SRC))))
    if baseline:
        env = dict(os.environ, PYTHONPATH=baseline)
        rows.append(("baseline fastlayer rank", *best(rank, repeat, env)))
    for name, wall, rss, cpu in rows:
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {rss:.0f} | {wall / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/fastlayer-graphs")
    ap.add_argument("--big", action="store_true", help="also 1M paths / 10.4M references")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline-src", help="another tree's src dir (today's code)")
    ap.add_argument("--no-decoders", action="store_true", help="json.load only (no other decoders)")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    sizes = [200_000] + ([1_000_000] if args.big else [])
    for n in sizes:
        f = d / f"graph-{n}.json"
        ensure_graph(f, n)
        bench(f, args.repeat if n < 1_000_000 else 1, args.baseline_src, not args.no_decoders)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
