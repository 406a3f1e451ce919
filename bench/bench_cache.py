"""The layer cache: warm rebuilds after one path changed, and batches of images.

    python bench/bench_cache.py [--part incremental|batch|all] [--dir /tmp/fastlayer-bench-cache]
                                [--size 1G] [--images 20] [--repeat 3]

incremental (the store of bench/synthstore.py, 1 GiB by default):
  The "app" store path is copied to a new name with one file changed, as a
  rebuild in Nix would give, and the graph is rewritten to use it. Against a
  fresh docker-registry on 127.0.0.1 and a fresh cache, all in this run:
  - cold `push` of the first image, then warm `push` of the changed one;
    then the changed one again, unchanged;
  - cold `build --format oci-dir` of the first image into a new layout, then
    the changed one into the same layout (in place);
  - cold `build` to a file with no cache (`--no-cache`) against with an
    empty cache (which it fills): what writing the cache costs;
  - warm `build -o -` through a pipe against the same with --no-cache.
  Bytes read from the store are counted by strace (files opened under the
  store, their sizes), in separate runs from the timed ones.
batch (a 256 MiB base closure, plus --images apps of 30 MiB each):
  - `fastlayer build SPEC x N -o DIR` (one batch, fresh cache), against a
    loop of N cold builds (`--no-cache`), against the goal's yardstick: one
    cold image plus one image of the N app paths alone;
  - distinct layer bytes written (each distinct diff_id once) against the
    unique input bytes, for the batch (shared plan) and for the loop
    (each image planned alone by popularity).
Each timed command is run --repeat times after one untimed run; the best
wall time is kept (cold runs start from a fresh cache/registry/layout every
time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from registry_fixture import Registry  # noqa: E402
from synthstore import ensure_store, parse_size  # noqa: E402

FASTLAYER = [sys.executable, "-m", "fastlayer"]
B32 = "0123456789abcdfghijklmnpqrsvwxyz"


def run(argv: list[str], env: dict | None = None, stdout=subprocess.DEVNULL) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def best(times: list[float]) -> float:
    return min(times)


def store_bytes_read(argv: list[str], store: Path, env: dict | None = None) -> tuple[int, int]:
    """(files, bytes) argv read from files under store, counted by strace: every
    read, pread and kernel copy from a descriptor whose path (-y) is in the store
    (files are opened relative to their directory, so open calls do not name them)."""
    with tempfile.NamedTemporaryFile(suffix=".strace") as log:
        calls = "read,pread64,readv,preadv,preadv2,copy_file_range,sendfile"
        cmd = ["strace", "-f", "-qq", "-y", "-e", f"trace={calls}", "-o", log.name, *argv]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed under strace")
        files: set[str] = set()
        total = 0
        pattern = re.compile(r"(\w+)\((\d+)<([^>]*)>.*\) = (\d+)")
        for line in Path(log.name).read_text(errors="replace").splitlines():
            m = pattern.search(line)
            if m and m.group(3).startswith(str(store)):
                files.add(m.group(3))
                total += int(m.group(4))
    return len(files), total


def tree_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def fresh_name(old: str, rng: random.Random) -> str:
    """old (a /nix/store/<hash>-name path) with another hash: a rebuilt path."""
    name = old.rsplit("/", 1)[1].split("-", 1)[1]
    return "/nix/store/" + "".join(rng.choice(B32) for _ in range(32)) + "-" + name


def changed_variant(directory: Path, work: Path) -> tuple[Path, int]:
    """graph-changed.json where the app path (the graph's root, first) is a copy
    under a new name with one file changed; returns (graph, bytes of that path)."""
    graph = json.loads((directory / "graph.json").read_text())
    old = graph[0]["path"]
    new = fresh_name(old, random.Random(7))
    src = directory / old.lstrip("/")
    dst = directory / new.lstrip("/")
    if not dst.exists():
        shutil.copytree(src, dst, symlinks=True)
        victim = next(p for p in sorted(dst.rglob("*")) if p.is_file() and not p.is_symlink())
        victim.chmod(0o644)
        victim.write_bytes(victim.read_bytes() + b"changed\n")
        victim.chmod(0o444)
    text = json.dumps(graph).replace(old, new)
    out = work / "graph-changed.json"
    out.write_text(text)
    return out, tree_bytes(dst)


def spec(path: Path, name: str, graph: Path, root: Path, max_layers: int = 100) -> Path:
    path.write_text(
        f'name = "{name}"\ntag = "1"\nstore_root = "{root}"\nmax_layers = {max_layers}\n'
        f'[contents]\ngraph = "{graph}"\n'
    )
    return path


def incremental(args: argparse.Namespace, work: Path) -> dict:
    directory = Path(args.dir) / "store"
    ensure_store(directory, parse_size(args.size))
    graph_b, changed_bytes = changed_variant(directory, work)
    spec_a = spec(work / "a.toml", "bench/app", directory / "graph.json", directory)
    spec_b = spec(work / "b.toml", "bench/app", graph_b, directory)
    store = directory / "nix" / "store"
    res: dict = {"changed_path_bytes": changed_bytes}

    def fresh(name: str) -> Path:
        p = work / name
        shutil.rmtree(p, ignore_errors=True)
        return p

    # push: cold, warm after the change, unchanged
    cold_push, warm_push, repush = [], [], []
    for _ in range(args.repeat):
        reg = Registry(fresh("reg")).start()
        try:
            cache = str(fresh("cache-push"))
            env = {**os.environ, "XDG_CACHE_HOME": str(fresh("xdg"))}
            dest = f"docker://{reg.host}/bench/app:1"
            push = [*FASTLAYER, "push", "--insecure", "-q", "--cache", cache]
            cold_push.append(run([*push, str(spec_a), dest], env))
            warm_push.append(run([*push, str(spec_b), dest], env))
            mark = reg.mark()
            repush.append(run([*push, str(spec_b), dest], env))
            res["repush_uploads"] = len(reg.uploads_since(mark))
            res["repush_store_read"] = store_bytes_read([*push, str(spec_b), dest], store, env)
        finally:
            reg.stop()
    # the warm push after the change, counted (own registry and cache, primed)
    reg = Registry(fresh("reg")).start()
    try:
        cache = str(fresh("cache-push"))
        env = {**os.environ, "XDG_CACHE_HOME": str(fresh("xdg"))}
        dest = f"docker://{reg.host}/bench/app:1"
        push = [*FASTLAYER, "push", "--insecure", "-q", "--cache", cache]
        run([*push, str(spec_a), dest], env)
        res["warm_push_store_read"] = store_bytes_read([*push, str(spec_b), dest], store, env)
    finally:
        reg.stop()
    res["push"] = {"cold": best(cold_push), "warm": best(warm_push), "unchanged": best(repush)}

    # OCI layout in place
    cold_oci, warm_oci = [], []
    for i in range(args.repeat + 1):
        layout, cache = fresh("layout"), str(fresh("cache-oci"))
        build = [*FASTLAYER, "build", "-q", "--format", "oci-dir", "--compress", "gzip"]
        t_cold = run([*build, "--cache", cache, str(spec_a), "-o", str(layout)])
        if i == args.repeat:  # the last round counts reads instead of timing
            res["warm_oci_store_read"] = store_bytes_read(
                [*build, "--cache", cache, str(spec_b), "-o", str(layout)], store
            )
            break
        cold_oci.append(t_cold)
        warm_oci.append(run([*build, "--cache", cache, str(spec_b), "-o", str(layout)]))
    res["oci"] = {"cold": best(cold_oci), "warm": best(warm_oci)}

    # what filling the cache costs a cold build (docker-archive to a file)
    nocache, filling = [], []
    out = work / "image.tar"
    for _ in range(args.repeat + 1):
        nocache.append(run([*FASTLAYER, "build", "-q", "--no-cache", str(spec_a), "-o", str(out)]))
        cache = str(fresh("cache-fill"))
        filling.append(
            run([*FASTLAYER, "build", "-q", "--cache", cache, str(spec_a), "-o", str(out)])
        )
    res["cold_file"] = {"no_cache": best(nocache[1:]), "filling": best(filling[1:])}

    # a pipe: warm (known layers stream unspooled) against --no-cache (spooled)
    pipe_warm, pipe_cold = [], []
    cache = str(fresh("cache-pipe"))
    run([*FASTLAYER, "build", "-q", "--cache", cache, str(spec_a), "-o", str(out)])
    for _ in range(args.repeat):
        sh = f"{' '.join(FASTLAYER)} build -q --cache {cache} {spec_a} -o - | cat > /dev/null"
        pipe_warm.append(run(["sh", "-c", sh]))
        sh = f"{' '.join(FASTLAYER)} build -q --no-cache {spec_a} -o - | cat > /dev/null"
        pipe_cold.append(run(["sh", "-c", sh]))
    res["pipe"] = {"warm": best(pipe_warm), "no_cache": best(pipe_cold)}
    return res


def app_path(store: Path, i: int, size: int, base_root: str) -> dict:
    """A 30 MiB-ish app store path of a few files, referencing the base's root."""
    rng = random.Random(1000 + i)
    name = "/nix/store/" + "".join(rng.choice(B32) for _ in range(32)) + f"-app-{i}-1.0"
    top = store / name.rsplit("/", 1)[1]
    if not top.exists():
        tmp = top.with_name(top.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "bin").mkdir(parents=True)
        (tmp / "share").mkdir()
        left, k = size, 0
        while left > 0:
            n = min(left, rng.randint(1 << 20, 6 << 20))
            where = tmp / ("bin" if k == 0 else "share") / f"part{k}"
            where.write_bytes(rng.randbytes(n))
            where.chmod(0o555 if k == 0 else 0o444)
            left -= n
            k += 1
        tmp.rename(top)
    return {"path": name, "references": [name, base_root], "narSize": tree_bytes(top),
            "narHash": "", "closureSize": 0}  # fmt: skip


# nixpkgs' script reads /nix/store: a private mount namespace shows it the bench store there
NAMESPACE = (
    'mount -t tmpfs none /nix && mkdir /nix/store && mount --bind "$1/nix/store" /nix/store'
    ' && shift && exec "$@"'
)


def reference_loop(script: str, directory: Path, specs: list[Path], work: Path) -> float:
    """nixpkgs' stream_layered_image.py once per image (popularity plan, 100 layers, the
    base's tiny customisation layer), each into a file: the loop a user runs today."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        raise SystemExit("--reference needs root and unshare (to mount the store at /nix/store)")
    base_conf = json.loads((directory / "conf.json").read_text())
    total = 0.0
    for s in specs:
        graph = re.search(r'graph = "([^"]+)"', s.read_text()).group(1)  # type: ignore[union-attr]
        plan = subprocess.run([*FASTLAYER, "plan", graph, "--max-layers", "100"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        layers = [x["paths"] for x in json.loads(plan)["layers"]]
        conf = work / f"{s.stem}.conf.json"
        conf.write_text(json.dumps({**base_conf, "store_layers": layers,
                                    "repo_tag": f"bench/{s.stem}:1"}))  # fmt: skip
        argv = ["unshare", "-m", "sh", "-c", NAMESPACE, "sh", str(directory), sys.executable,
                script, str(conf)]  # fmt: skip
        with open(work / "ref.tar", "wb") as out:
            total += run(argv, stdout=out)
    return total


def batch(args: argparse.Namespace, work: Path) -> dict:
    directory = Path(args.dir) / "base"
    ensure_store(directory, parse_size("256M"))
    store = directory / "nix" / "store"
    base_graph = json.loads((directory / "graph.json").read_text())
    base_root = base_graph[0]["path"]
    apps = [app_path(store, i, 30 << 20, base_root) for i in range(args.images)]
    specs = []
    for i, app in enumerate(apps):
        g = work / f"graph-{i}.json"
        g.write_text(json.dumps([app, *base_graph]))
        specs.append(spec(work / f"app{i}.toml", f"bench/app{i}", g, directory))
    g = work / "graph-apps.json"
    g.write_text(json.dumps([{**a, "references": [a["path"]]} for a in apps]))
    apps_only = spec(work / "apps.toml", "bench/apps", g, directory)
    unique = sum(n["narSize"] for n in base_graph) + sum(a["narSize"] for a in apps)

    t_batch, t_loop, t_one, t_apps, t_oci, t_oci_one = [], [], [], [], [], []
    for _ in range(args.repeat + 1):
        out = work / "batch-out"
        shutil.rmtree(out, ignore_errors=True)
        cache = work / "batch-cache"
        shutil.rmtree(cache, ignore_errors=True)
        t_batch.append(run([*FASTLAYER, "build", "-q", "--cache", str(cache), *map(str, specs),
                            "-o", str(out)]))  # fmt: skip
        loop_out = work / "loop-out"
        shutil.rmtree(loop_out, ignore_errors=True)
        loop_out.mkdir()
        t = 0.0
        for s in specs:
            t += run([*FASTLAYER, "build", "-q", "--no-cache", str(s), "-o",
                      str(loop_out / (s.stem + ".tar"))])  # fmt: skip
        t_loop.append(t)
        t_one.append(run([*FASTLAYER, "build", "-q", "--no-cache", str(specs[0]), "-o",
                          str(work / "one.tar")]))  # fmt: skip
        t_apps.append(run([*FASTLAYER, "build", "-q", "--no-cache", str(apps_only), "-o",
                           str(work / "apps.tar")]))  # fmt: skip
        # the same into one OCI layout (uncompressed blobs): no archive repeats the base
        layout = work / "batch-oci"
        shutil.rmtree(layout, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        oci = [*FASTLAYER, "build", "-q", "--format", "oci-dir"]
        t_oci.append(run([*oci, "--cache", str(cache), *map(str, specs), "-o", str(layout)]))
        t = 0.0
        for name, s in (("one-oci", specs[0]), ("apps-oci", apps_only)):
            shutil.rmtree(work / name, ignore_errors=True)
            t += run([*oci, "--no-cache", str(s), "-o", str(work / name)])
        t_oci_one.append(t)
    keep = slice(1, None) if args.repeat else slice(None)
    if args.reference:
        res_ref = reference_loop(args.reference, directory, specs, work)
    res: dict = {
        "images": args.images,
        "batch": best(t_batch[keep]),
        "loop": best(t_loop[keep]),
        "one_plus_apps": best(t_one[keep]) + best(t_apps[keep]),
        "batch_oci": best(t_oci[keep]),
        "one_plus_apps_oci": best(t_oci_one[keep]),
        "unique_input": unique,
        "archive_bytes": tree_bytes(work / "batch-out"),
    }
    if args.reference:
        res["reference_loop"] = res_ref
    for what, where in (("batch", work / "batch-out"), ("loop", work / "loop-out")):
        distinct: dict[str, int] = {}
        for tar_path in sorted(where.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                cfg_name = json.load(tar.extractfile("manifest.json"))[0]["Config"]  # type: ignore[arg-type]
                cfg = json.load(tar.extractfile(cfg_name))  # type: ignore[arg-type]
                names = json.load(tar.extractfile("manifest.json"))[0]["Layers"]  # type: ignore[arg-type]
                for diff_id, name in zip(cfg["rootfs"]["diff_ids"], names, strict=True):
                    distinct[diff_id] = tar.getmember(name).size
        res[f"{what}_distinct_layer_bytes"] = sum(distinct.values())
        res[f"{what}_distinct_layers"] = len(distinct)
    return res


def report(res: dict) -> None:
    if "push" in res:
        p, o, c, q = res["push"], res["oci"], res["cold_file"], res["pipe"]
        mib = 1 << 20
        print(f"changed path: {res['changed_path_bytes'] / mib:.1f} MiB")
        print(f"push: cold {p['cold']:.2f} s, warm after one change {p['warm']:.2f} s "
              f"({p['warm'] / p['cold']:.3f}x), unchanged {p['unchanged']:.2f} s "
              f"({p['unchanged'] / p['cold']:.3f}x)")  # fmt: skip
        f, b = res["warm_push_store_read"]
        print(f"  warm push read from the store: {f} files, {b / mib:.1f} MiB")
        f, b = res["repush_store_read"]
        print(f"  unchanged re-push read: {f} files, {b} bytes; uploads {res['repush_uploads']}")
        print(f"oci-dir in place: cold {o['cold']:.2f} s, warm {o['warm']:.2f} s "
              f"({o['warm'] / o['cold']:.3f}x)")  # fmt: skip
        f, b = res["warm_oci_store_read"]
        print(f"  warm layout read from the store: {f} files, {b / mib:.1f} MiB "
              f"({b / res['changed_path_bytes']:.3f}x the changed path)")  # fmt: skip
        print(f"cold build to a file: --no-cache {c['no_cache']:.2f} s, filling the cache "
              f"{c['filling']:.2f} s ({c['filling'] / c['no_cache']:.3f}x)")  # fmt: skip
        print(f"pipe: warm {q['warm']:.2f} s, --no-cache {q['no_cache']:.2f} s "
              f"({q['warm'] / q['no_cache']:.3f}x)")  # fmt: skip
    if "batch" in res:
        mib = 1 << 20
        n = res["images"]
        t, loop, yard = res["batch"], res["loop"], res["one_plus_apps"]
        print(f"batch of {n}: {t:.2f} s; loop of {n} cold builds {loop:.2f} s "
              f"({t / loop:.3f}x); one cold image + the {n} app layers "
              f"{yard:.2f} s (batch {t / yard:.3f}x)")  # fmt: skip
        if "reference_loop" in res:
            ref = res["reference_loop"]
            print(f"  loop of {n} runs of nixpkgs' script: {ref:.2f} s (batch {t / ref:.3f}x)")
        held = res["archive_bytes"] / mib
        print(f"  (the {n} archives hold {held:.0f} MiB: each repeats the base)")
        t, yard = res["batch_oci"], res["one_plus_apps_oci"]
        print(f"batch of {n} into one OCI layout: {t:.2f} s; one cold image + the {n} app "
              f"layers, as OCI layouts: {yard:.2f} s (batch {t / yard:.3f}x)")  # fmt: skip
        u = res["unique_input"]
        for what in ("batch", "loop"):
            d = res[f"{what}_distinct_layer_bytes"]
            k = res[f"{what}_distinct_layers"]
            print(f"{what}: {k} distinct layers, {d / mib:.1f} MiB against "
                  f"{u / mib:.1f} MiB unique input ({d / u:.3f}x)")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("incremental", "batch", "all"), default="all")
    p.add_argument("--dir", default="/tmp/fastlayer-bench-cache")
    p.add_argument("--size", default="1G")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--reference", help="nixpkgs' stream_layered_image.py: time its loop too")
    args = p.parse_args()
    if not shutil.which("strace"):
        raise SystemExit("bench_cache needs strace (apt-get install strace)")
    res: dict = {}
    with tempfile.TemporaryDirectory(
        prefix="bench-cache-", dir=args.dir if os.path.isdir(args.dir) else None
    ) as tmp:
        work = Path(tmp)
        if args.part in ("incremental", "all"):
            res.update(incremental(args, work))
        if args.part in ("batch", "all"):
            res.update(batch(args, work))
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
