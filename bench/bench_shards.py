"""A batch of 40 images pushed by one machine, then in 2 shards by two.

    python bench/bench_shards.py [--dir /tmp/fastlayer-bench-cache] [--images 40]
                                 [--app-size 8M]

The base closure of bench_cache.py's batch (bench/synthstore.py, 256 MiB,
100 paths) plus one app path of --app-size per image (random bytes, store
paths "app-200", "app-201", ...: apart from bench_cache.py's). Every push
gives `--cache-repo docker://REG/ci/cache`; a "machine" is a fresh
XDG_CACHE_HOME; each scenario has a fresh docker-registry on 127.0.0.1:

1. one machine: `push SPEC x 40 docker://REG/one` (the baseline);
2. two machines, `--shard 1/2` then `--shard 2/2`, run one after the other
   (each has the whole machine; with two real machines the wall time is the
   larger of the two, the work their sum). Shard 2 starts after shard 1 has
   written its entries, so it finds the base layers there; two machines
   starting together would both build the base layers they need first;
3. the next commit: one base path (shared by all 40) changed, as a Nix
   rebuild gives (a copy under a new name with one file changed), and all
   40 pushed again in 2 shards by two fresh machines.

For each run: wall time, the registry's requests (its access log) per image
and per layer, its CPU time (/proc) per request, and the layer bytes
uploaded (the sizes of the blobs whose upload completed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_cache import FASTLAYER, app_path, fresh_name, run, spec  # noqa: E402
from registry_fixture import Registry  # noqa: E402
from synthstore import ensure_store, parse_size  # noqa: E402

FIRST_APP = 200  # app path numbers: bench_cache.py's batch uses 0 to --images


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def home(path: Path) -> dict:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(path)}
    env.pop("FASTLAYER_CACHE", None)
    return env


def changed_base_path(directory: Path, graph: list[dict]) -> tuple[str, str]:
    """(old, new) store path names: a base path in the middle of the closure copied
    under a new name with one file changed (idempotent)."""
    old = sorted(n["path"] for n in graph)[len(graph) // 2]
    new = fresh_name(old, random.Random(11))
    src, dst = directory / old.lstrip("/"), directory / new.lstrip("/")
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, symlinks=True)
        victim = next(p for p in sorted(tmp.rglob("*")) if p.is_file() and not p.is_symlink())
        victim.chmod(0o644)
        victim.write_bytes(victim.read_bytes() + b"changed\n")
        victim.chmod(0o444)
        tmp.rename(dst)
    return old, new


class Scenario:
    """One registry; runs of pushes against it, each measured."""

    def __init__(self, base: Path):
        self.reg = Registry(base).start()
        self.cache = f"docker://{self.reg.host}/ci/cache"

    def push(self, specs: list[Path], prefix: str, env: dict, shard: str | None) -> dict:
        argv = [*FASTLAYER, "push", *map(str, specs), f"docker://{self.reg.host}/{prefix}",
                "--insecure", "-q", "--cache-repo", self.cache]  # fmt: skip
        if shard:
            argv += ["--shard", shard]
        mark, cpu = self.reg.mark(), cpu_seconds(self.reg.proc.pid)  # type: ignore[union-attr]
        wall = run(argv, env)
        cpu = cpu_seconds(self.reg.proc.pid) - cpu  # type: ignore[union-attr]
        asked = self.reg.requests()[mark:]
        uploads = self.reg.uploads_since(mark)
        sent = sum(self.reg.blob_path(d).stat().st_size for d in uploads if d.startswith("sha"))
        pushed = [(m, u) for m, u, s in asked if m == "PUT" and "/manifests/" in u and s == 201]
        images = sum(1 for _, u in pushed if "/ci/cache/" not in u and not _by_digest(u))
        return {"wall": wall, "requests": len(asked), "registry_cpu": cpu, "uploads": len(uploads),
                "sent": sent, "images": images}  # fmt: skip

    def stop(self) -> None:
        self.reg.stop()


def _by_digest(uri: str) -> bool:
    return "/manifests/sha256:" in uri


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/fastlayer-bench-cache")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--app-size", default="8M")
    args = p.parse_args()
    directory = Path(args.dir) / "base"
    ensure_store(directory, parse_size("256M"))
    store = directory / "nix" / "store"
    base_graph = json.loads((directory / "graph.json").read_text())
    base_root = base_graph[0]["path"]
    size = parse_size(args.app_size)
    apps = [app_path(store, FIRST_APP + i, size, base_root) for i in range(args.images)]
    old, new = changed_base_path(directory, base_graph)
    # byte-compiled, as an installed package is (PYTHONDONTWRITEBYTECODE may be set here)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "src")],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-shards-", dir=args.dir) as tmp:
        work = Path(tmp)
        specs, specs2 = [], []
        for i, app in enumerate(apps):
            text = json.dumps([app, *base_graph])
            for suffix, out, body in (("", specs, text), ("-next", specs2, text.replace(old, new))):
                g = work / f"graph-{i}{suffix}.json"
                g.write_text(body)
                (work / f"c{suffix}").mkdir(exist_ok=True)
                out.append(spec(work / f"c{suffix}" / f"app{i}.toml", f"bench/app{i}", g,
                                directory))  # fmt: skip
        run([*FASTLAYER, "build", "-q", "--no-cache", str(specs[0]), "-o", "-"])  # page cache
        one = Scenario(work / "reg-one")
        try:
            res["one"] = one.push(specs, "one", home(work / "m0"), None)
        finally:
            one.stop()
        two = Scenario(work / "reg-two")
        try:
            for k in (1, 2):
                res[f"shard{k}"] = two.push(specs, "two", home(work / f"m{k}"), f"{k}/2")
            for k in (1, 2):
                res[f"next{k}"] = two.push(specs2, "two", home(work / f"n{k}"), f"{k}/2")
        finally:
            two.stop()
    res["layers_per_image"] = min(100, len(base_graph) + 1) + 1
    report(res, args)
    return 0


def report(res: dict, args: argparse.Namespace) -> None:
    mib = 1 << 20
    base = res["one"]["wall"]
    per = res["layers_per_image"]
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.images} images of {per} layers (256 MiB base closure + {args.app_size} app "
          f"each), one docker-registry on 127.0.0.1, --cache-repo on every push")  # fmt: skip

    def line(name: str, r: dict) -> None:
        n = max(1, r["images"])
        print(f"  {name}: {r['wall']:6.2f} s ({r['wall'] / base:.3f}x); {r['images']} images; "
              f"{r['requests']} requests ({r['requests'] / n:.1f}/image, "
              f"{r['requests'] / (n * per):.2f}/layer); registry CPU {r['registry_cpu']:.2f} s "
              f"({r['registry_cpu'] / max(1, r['requests']) * 1000:.2f} ms/request); "
              f"{r['uploads']} blobs, {r['sent'] / mib:.1f} MiB uploaded")  # fmt: skip

    line("1. one machine, all", res["one"])
    for k in (1, 2):
        line(f"2. shard {k}/2, fresh machine", res[f"shard{k}"])
    s1, s2 = res["shard1"]["wall"], res["shard2"]["wall"]
    print(f"  2 shards: max {max(s1, s2):.2f} s ({max(s1, s2) / base:.3f}x), "
          f"sum {s1 + s2:.2f} s ({(s1 + s2) / base:.3f}x)")  # fmt: skip
    for k in (1, 2):
        line(f"3. next commit, shard {k}/2, fresh machine", res[f"next{k}"])
    n1, n2 = res["next1"]["wall"], res["next2"]["wall"]
    print(f"  next commit in 2 shards: max {max(n1, n2):.2f} s ({max(n1, n2) / base:.3f}x), "
          f"sum {n1 + n2:.2f} s ({(n1 + n2) / base:.3f}x)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
