"""The layer cache shared through a registry: machine B pushes what machine A built.

    python bench/bench_registry_cache.py [--part push|build|all] [--dir /tmp/fastlayer-bench-cache]
                                         [--size 1G] [--repeat 3] [--lookups 1000]

On the store of bench/synthstore.py (1 GiB by default) and a fresh
docker-registry on 127.0.0.1, all in this run ("machines" are separate
cache homes, XDG_CACHE_HOME; they share the store directory, which the
portable keys do not look at beyond one lstat per store path):

- A: cold `push SPEC docker://REG/team/plain:1` (no shared cache): the baseline;
- A: cold `push` to team/a with `--cache-repo docker://REG/ci/cache`: what
  writing the entries costs;
- A again, unchanged, with its local cache warm (a HEAD per layer): the floor;
- B (empty local cache, --repeat times, each with a fresh home and a new
  target repository): `push` to team/bN with the same --cache-repo; the
  requests it makes and blobs it uploads (the registry's access log) and,
  in a separate run under strace, the store files it opens and their bytes;
- lookups: --lookups keys asked of the cache repository at once (all misses,
  404) and the ~100 keys of this image (all hits), in process;
- what a download would cost against reading the store: the image's layer
  blobs fetched from the registry, gunzipped and hashed, against a cold
  `build -o - --no-cache` (to /dev/null) (store read + tar + sha256).

fastlayer's modules are byte-compiled first (`compileall`, as an installed
package is), since this environment may set PYTHONDONTWRITEBYTECODE, which
would make every run compile them again. The load average is printed.

--part build: what `build` should take from the cache, per layer compression
none, gzip, zstd: A pushes with `--compress X --cache-repo .../ci/cache-X`;
then, each --repeat times with a fresh cache home and output, a build of the
image to an OCI layout with X-compressed layers (docker-archive for `docker`)
from the store (FASTLAYER_CACHE_FETCH=never, --no-cache: walk, read, tar,
sha256, compress) against from the cache repository (=always: download,
sha256 of the blob, decompress, sha256 of the layer, write the blob as it
came; for an uncompressed output the decompressed bytes). MiB/s are of layer
tar bytes; same store, registry and run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "src")]

from bench_cache import FASTLAYER, run, spec, store_bytes_read  # noqa: E402
from registry_fixture import Registry  # noqa: E402
from synthstore import ensure_store, parse_size  # noqa: E402

OCI = "application/vnd.oci.image.manifest.v1+json"


def env_of(home: Path) -> dict:
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(home)}
    env.pop("FASTLAYER_CACHE", None)
    return env


def push(spec_path: Path, dest: str, cache: str | None) -> list[str]:
    argv = [*FASTLAYER, "push", str(spec_path), dest, "--insecure", "-q"]
    return argv + (["--cache-repo", cache] if cache else [])


def layers(host: str, repo: str) -> list[dict]:
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/1", headers={"Accept": OCI})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["layers"]


def download(host: str, repo: str, blobs: list[dict]) -> tuple[float, int]:
    """Seconds to GET, gunzip and sha256 every blob (one after another); bytes."""
    from isal import isal_zlib

    t = time.perf_counter()
    total = 0
    for b in blobs:
        d = isal_zlib.decompressobj(31)
        h = hashlib.sha256()
        with urllib.request.urlopen(f"http://{host}/v2/{repo}/blobs/{b['digest']}") as r:
            while chunk := r.read(1 << 20):
                out = d.decompress(chunk)
                h.update(out)
                total += len(out)
    return time.perf_counter() - t, total


def lookups(host: str, keys: list[str]) -> float:
    from fastlayer.cache.remote import RegistryCache
    from fastlayer.registry.reference import parse_reference

    cache = RegistryCache(parse_reference(f"{host}/ci/cache"), None, insecure=True)
    t = time.perf_counter()
    cache.lookup(keys)
    took = time.perf_counter() - t
    cache.close()
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/fastlayer-bench-cache")
    p.add_argument("--size", default="1G")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--lookups", type=int, default=1000)
    p.add_argument("--part", choices=("push", "build", "all"), default="all")
    args = p.parse_args()
    if not shutil.which("strace"):
        raise SystemExit("bench_registry_cache needs strace (apt-get install strace)")
    directory = Path(args.dir) / "store"
    ensure_store(directory, parse_size(args.size))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "src")],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    store = directory / "nix" / "store"
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-rcache-", dir=args.dir) as tmp:
        work = Path(tmp)
        the_spec = spec(work / "app.toml", "bench/app", directory / "graph.json", directory)
        reg = Registry(work / "registry").start()
        host, cache = reg.host, f"docker://{reg.host}/ci/cache"
        try:
            if args.part in ("build", "all"):
                res["builds"] = build_part(the_spec, host, work, args.repeat, reg.proc.pid)
            if args.part == "build":
                return report_build(res["builds"])
            build = [*FASTLAYER, "build", str(the_spec), "-o", "-", "--no-cache"]
            run([*build, "--compress", "none"], env_of(work / "c"))  # untimed: the page cache
            res["a_plain"] = run(push(the_spec, f"docker://{host}/team/plain:1", None),
                                 env_of(work / "a0"))  # fmt: skip
            res["a_cold"] = run(push(the_spec, f"docker://{host}/team/a:1", cache),
                                env_of(work / "a"))  # fmt: skip
            warm = run(push(the_spec, f"docker://{host}/team/a:1", cache), {**os.environ,
                       "XDG_CACHE_HOME": str(work / "a")})  # fmt: skip
            res["a_warm"] = warm  # A again, its own cache warm: one HEAD per layer
            times, uploads, asked = [], [], []
            for i in range(args.repeat):
                mark = reg.mark()
                times.append(run(push(the_spec, f"docker://{host}/team/b{i}:1", cache),
                                 env_of(work / f"b{i}")))  # fmt: skip
                uploads.append(len(reg.uploads_since(mark)))
                asked.append(len(reg.requests()[mark:]))
            res["b"], res["b_uploads"], res["b_requests"] = min(times), max(uploads), max(asked)
            res["startup"] = min(
                run([sys.executable, "-c", "import fastlayer.registry.push, numpy"])
                for _ in range(3)
            )
            files, read = store_bytes_read(
                push(the_spec, f"docker://{host}/team/bs:1", cache),
                store, env_of(work / "bs"),
            )  # fmt: skip
            res["b_files_read"], res["b_bytes_read"] = files, read
            blobs = layers(host, "team/a")
            res["layers"] = len(blobs)
            assert layers(host, "team/b0") == blobs, "B pushed another image"
            keys = [secrets.token_hex(32) for _ in range(args.lookups)]
            res["lookup_misses"] = lookups(host, keys)
            with urllib.request.urlopen(f"http://{host}/v2/ci/cache/tags/list") as r:
                tags = json.load(r)["tags"]
            res["entries"] = len(tags)
            res["lookup_hits"] = lookups(host, tags)
            res["download"], res["layer_bytes"] = download(host, "team/a", blobs)
            res["store_build"] = run([*build, "--compress", "none"], env_of(work / "c"))
        finally:
            reg.stop()
    report(res, args)
    if "builds" in res:
        report_build(res["builds"])
    return 0


# (what is built, --compress of A's push whose entries it reads, build flags)
BUILDS = [
    ("oci-dir, none", "none", ["--format", "oci-dir", "--compress", "none"]),
    ("oci-dir, gzip", "gzip", ["--format", "oci-dir", "--compress", "gzip"]),
    ("oci-dir, zstd", "zstd", ["--format", "oci-dir", "--compress", "zstd"]),
    ("docker-archive (from gzip entries)", "gzip", ["--compress", "none"]),
]


def cpu_of(pid: int) -> float:
    """user + sys seconds of a running process (the registry's own work)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(argv: list[str], env: dict, registry_pid: int) -> tuple[float, float]:
    """(wall, CPU of the build and of the registry meanwhile) of one run."""
    before = os.times()
    reg_before = cpu_of(registry_pid)
    wall = run(argv, env)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, cpu + cpu_of(registry_pid) - reg_before


def build_part(the_spec: Path, host: str, work: Path, repeat: int, registry_pid: int) -> list:
    """Per BUILDS row: (label, (wall, CPU) from the store, (wall, CPU) from the cache,
    tar bytes), the best of repeat runs each."""
    for kind in ("none", "gzip", "zstd"):
        run([*push(the_spec, f"docker://{host}/team/{kind}:1", f"docker://{host}/ci/cache-{kind}"),
             "--compress", kind], env_of(work / f"a-{kind}"))  # fmt: skip
    size = sum(x["size"] for x in layers(host, "team/none")[:-1])  # uncompressed: tar bytes
    rows = []
    for label, kind, flags in BUILDS:
        times: dict[str, list[tuple[float, float]]] = {"never": [], "always": []}
        outs = {}
        for i in range(repeat):
            for how in ("never", "always"):  # alternated: load changes hit both alike
                out = work / f"out-{kind}-{how}-{len(rows)}-{i}"
                shutil.rmtree(out, ignore_errors=True)
                argv = [*FASTLAYER, "build", str(the_spec), "-o", str(out), "-q", *flags]
                if how == "never":
                    argv.append("--no-cache")
                else:
                    argv += ["--cache-repo", f"docker://{host}/ci/cache-{kind}", "--insecure"]
                env = {**env_of(work / "b"), "FASTLAYER_CACHE_FETCH": how}
                times[how].append(timed(argv, env, registry_pid))
                outs[how] = out
            same = _digest_of(outs["never"]) == _digest_of(outs["always"])
            assert same, f"{label}: the build from the cache differs from the store's"
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
        best = {how: (min(t[0] for t in ts), min(t[1] for t in ts)) for how, ts in times.items()}
        rows.append((label, best["never"], best["always"], size))
    return rows


def _digest_of(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.rglob("*")) if out.is_dir() else [out]:
        if f.is_file():
            h.update(str(f.relative_to(out) if out.is_dir() else "").encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def report_build(rows: list[tuple]) -> int:
    mib = 1 << 20
    print("build, best of the runs per output (MiB/s of layer tar; CPU: the build's and "
          "the registry's user + sys):")  # fmt: skip
    for label, (store, store_cpu), (fetched, fetched_cpu), size in rows:
        print(f"  {label}: from the store {store:.2f} s ({size / mib / store:.0f} MiB/s, "
              f"CPU {store_cpu:.2f} s); from the cache {fetched:.2f} s "
              f"({size / mib / fetched:.0f} MiB/s, CPU {fetched_cpu:.2f} s); cache/store "
              f"{fetched / store:.2f}x wall, {fetched_cpu / store_cpu:.2f}x CPU")  # fmt: skip
    return 0


def report(res: dict, args: argparse.Namespace) -> None:
    mib = 1 << 20
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"A cold push, no shared cache: {res['a_plain']:.2f} s")
    print(f"A cold push with --cache-repo: {res['a_cold']:.2f} s "
          f"({res['a_cold'] / res['a_plain']:.3f}x; {res['entries']} entries written)")  # fmt: skip
    print(f"B push of the same image, empty local cache: {res['b']:.2f} s "
          f"({res['b'] / res['a_cold']:.3f}x A's cold push); blobs uploaded: {res['b_uploads']}; "
          f"registry requests: {res['b_requests']} ({res['b_requests'] / res['layers']:.2f} "
          "per layer); "
          f"store files opened: {res['b_files_read']} ({res['b_bytes_read']} bytes); "
          f"of which Python start and imports: {res['startup']:.2f} s")  # fmt: skip
    print(f"A's unchanged re-push, its local cache warm: {res['a_warm']:.2f} s "
          f"({res['a_warm'] / res['a_cold']:.3f}x)")  # fmt: skip
    n = args.lookups
    print(f"lookups: {n} misses in {res['lookup_misses'] * 1000:.0f} ms "
          f"({res['lookup_misses'] / n * 1e6:.0f} us each); {res['entries']} hits in "
          f"{res['lookup_hits'] * 1000:.0f} ms")  # fmt: skip
    dl, sb, size = res["download"], res["store_build"], res["layer_bytes"]
    print(f"{res['layers']} layers, {size / mib:.0f} MiB: download + gunzip + sha256 {dl:.2f} s "
          f"({size / mib / dl:.0f} MiB/s); cold build from the store to /dev/null {sb:.2f} s "
          f"({size / mib / sb:.0f} MiB/s)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
