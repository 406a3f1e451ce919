"""A deterministic synthetic Nix store for benchmarks.

    python bench/synthstore.py [--dir /tmp/fastlayer-bench] [--size 1G] [--seed 1]

writes, under DIR:

- `nix/store/<32 base32 chars>-<name>-<version>/...`: N store paths (400 per
  GiB), ~40,000 files per GiB with a heavy-tailed size law: lognormal small
  files (text, headers, scripts, some empty) spread over nested directories,
  and a few large paths holding big `.so`-like files; executables in `bin/`,
  library symlink chains, directory symlinks, absolute links into other store
  paths, a few dangling links and hard links, names long enough for PAX
  headers and a few non-ASCII ones. Files are 0444/0555, directories 0555,
  mtimes 1, as in a real store.
- `graph.json`: the closure as `exportReferencesGraph` gives it
  (`[{path, references, narSize, narHash, closureSize}]`; narSize is the sum
  of file sizes, narHash empty): a DAG where low-level libraries are
  referenced by many paths, every path reachable from the first (the "app").
- `conf.json`: a `stream-nix` / nixpkgs `stream_layered_image.py` conf with
  store_dir `/nix/store` (use `--root DIR`), 99 store layers (the 98 most
  referenced paths alone, the rest in the last) and a tiny customisation layer
  (a store path, as in nixpkgs, not in graph.json). `conf-abs.json` is the
  same with store_dir `DIR/nix/store` and host paths, for tools without --root.

The same size and seed give the same store, byte for byte; an existing store
with a matching `stamp.json` is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

VERSION = 2  # bump when the generated store changes
GIB = 1 << 30
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
STORE_LAYERS = 99
BIG_SHARE = 0.45  # fraction of all bytes in the big paths' .so files

STEMS = (
    "glibc openssl zlib gcc-lib libgcc bash coreutils ncurses readline libffi sqlite curl "
    "icu4c llvm libxml2 expat xz bzip2 zstd python3 perl gettext libidn2 libunistring "
    "nghttp2 krb5 keyutils libssh2 brotli pcre2 gmp mpfr attr acl libcap systemd-minimal "
    "util-linux dbus glib harfbuzz freetype fontconfig libpng libjpeg-turbo libtiff "
    "gdbm tzdata mailcap iana-etc cacert nodejs openjdk ruby go rustc protobuf grpc abseil "
    "boost libuv libevent lz4 snappy jemalloc numpy scipy pandas requests urllib3 certifi"
).split()
WORDS = (
    "core util base common data extra tools lib api client server proto http json xml "
    "crypto auth cache config plugin module render parse codec stream buffer event "
    "thread async sync io net fs path text image audio video font locale i18n test "
    "doc man info examples include share site packages vendor contrib internal"
).split()
EXTS = (".py", ".h", ".txt", ".html", ".json", ".pm", ".mo", ".js", ".c", ".rb", ".xml", "")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def store_hash(seed: int, i: int, name: str) -> str:
    digest = hashlib.sha256(f"{seed}:{i}:{name}".encode()).digest()
    return "".join(NIX_BASE32[b % 32] for b in digest)


class Pools:
    """Content to slice files from: incompressible bytes and text-like bytes."""

    def __init__(self, rng: random.Random):
        self.binary = rng.randbytes(16 << 20)
        words = [rng.choice(WORDS) for _ in range(400_000)]
        self.text = " ".join(words).encode()
        while len(self.text) < (4 << 20):
            self.text += self.text
        self.text = self.text[: 4 << 20]

    def write(self, fd: int, size: int, offset: int, binary: bool) -> None:
        pool = self.binary if binary else self.text
        offset %= len(pool)
        while size > 0:
            chunk = pool[offset : offset + min(size, 4 << 20)]
            os.write(fd, chunk)
            size -= len(chunk)
            offset = 0


def _plan(rng: random.Random, seed: int, size: int, n_paths: int, n_files: int) -> list[dict]:
    """Decide names, files (relative path, size, kind) and references of every path."""
    paths = []
    for i in range(n_paths):
        if i < len(STEMS):
            stem = STEMS[i]
        else:
            stem = f"{rng.choice(STEMS)}-{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        version = f"{rng.randint(0, 30)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
        name = f"{stem}-{version}"
        if rng.random() < 0.15:
            name += rng.choice(("-lib", "-bin", "-dev", "-man", "-doc"))
        paths.append({"name": f"{store_hash(seed, i, name)}-{name}", "weight": 0.0, "files": []})

    # Heavy-tailed path sizes; the heaviest ~2% are the "big" ones (llvm, gcc, ...).
    for p in paths:
        p["weight"] = rng.lognormvariate(0, 1.5)
    by_weight = sorted(range(n_paths), key=lambda i: -paths[i]["weight"])
    big = set(by_weight[: max(1, round(n_paths * 0.02))])

    total_w = sum(p["weight"] ** 0.7 for p in paths)
    small_sizes, big_sizes = [], []
    for i, p in enumerate(paths):
        count = max(1, round(n_files * p["weight"] ** 0.7 / total_w))
        for _ in range(count):
            s = min(int(rng.lognormvariate(math.log(2048), 1.8)), 8 << 20)
            if rng.random() < 0.02:
                s = 0  # __init__.py and friends
            p["files"].append(["", s, "small"])
            small_sizes.append(p["files"][-1])
        if i in big:
            for _ in range(rng.randint(2, 5)):
                s = min(int(rng.lognormvariate(math.log(24 << 20), 0.7)), 256 << 20)
                p["files"].append(["", s, "so"])
                big_sizes.append(p["files"][-1])

    # Scale each group to its share of the requested size.
    for group, share in ((big_sizes, BIG_SHARE), (small_sizes, 1 - BIG_SHARE)):
        total = sum(f[1] for f in group) or 1
        factor = size * share / total
        for f in group:
            f[1] = int(f[1] * factor)

    # References: a DAG from lower to higher index; high indices are the
    # low-level libraries that many paths use (glibc-like), index 0 is the app.
    popularity = [1.0 / (n_paths - j) ** 0.8 for j in range(n_paths)]
    for i, p in enumerate(paths):
        candidates = list(range(i + 1, n_paths))
        k = min(len(candidates), 1 + int(rng.expovariate(1 / 4)))
        refs = set()
        if candidates:
            weights = [popularity[j] for j in candidates]
            refs.update(rng.choices(candidates, weights=weights, k=k))
        p["refs"] = refs
    referenced = {j for p in paths for j in p["refs"]}
    for j in range(1, n_paths):
        if j not in referenced:
            paths[rng.randrange(0, j)]["refs"].add(j)
    for i, p in enumerate(paths):
        if rng.random() < 0.3:
            p["refs"].add(i)  # Nix records self references too
    return paths


def _layout(rng: random.Random, p: dict) -> list[str]:
    """Give each file of `p` a relative path; return the directories to create."""
    short = p["name"].split("-", 1)[1].rsplit("-", 1)[0]
    dirs = ["bin", "lib", f"share/{short}", "include", f"lib/site-packages/{short}"]
    for _ in range(max(1, len(p["files"]) // 10)):
        parent = rng.choice(dirs)
        if parent.count("/") < 8:
            dirs.append(f"{parent}/{rng.choice(WORDS)}{rng.randint(0, 99)}")
    used = set(dirs)
    for n, f in enumerate(p["files"]):
        if f[2] == "so":
            major = rng.randint(1, 9)
            f[0] = f"lib/lib{short}-{rng.choice(WORDS)}{n}.so.{major}.{rng.randint(0, 20)}.0"
        elif rng.random() < 0.05:
            f[0] = f"bin/{rng.choice(WORDS)}-{short}{n}"
            f[2] = "exe"
        else:
            name = f"{rng.choice(WORDS)}_{n}{rng.choice(EXTS)}"
            if rng.random() < 0.002:
                name = f"r\u00e9sum\u00e9-{n}.txt"
            f[0] = f"{rng.choice(dirs)}/{name}"
            if rng.random() < 0.1:
                f[2] = "exe"
        while f[0] in used:
            f[0] += "_"
        used.add(f[0])
    return dirs


def _rmtree(path: Path) -> None:
    def onerror(func, p, exc):
        os.chmod(os.path.dirname(p), 0o755)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o755)
        func(p)

    shutil.rmtree(path, onerror=onerror)


def _customisation(out: Path, app: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo("bin")
        ti.type, ti.linkname, ti.mtime = tarfile.SYMTYPE, f"{app}/bin", 1
        tar.addfile(ti)
        data = b"synthetic store for fastlayer benchmarks\n"
        ti = tarfile.TarInfo("etc/motd")
        ti.size, ti.mode, ti.mtime = len(data), 0o644, 1
        tar.addfile(ti, io.BytesIO(data))
    (out / "layer.tar").write_bytes(buf.getvalue())
    (out / "checksum").write_text(hashlib.sha256(buf.getvalue()).hexdigest())


def generate(directory: Path, size: int, seed: int, n_paths: int, n_files: int) -> dict:
    rng = random.Random(seed)
    pools = Pools(random.Random(seed + 1))
    plan = _plan(rng, seed, size, n_paths, n_files)
    store = directory / "nix" / "store"
    store.mkdir(parents=True)
    names = [f"/nix/store/{p['name']}" for p in plan]
    stats = {"paths": n_paths, "files": 0, "dirs": 0, "symlinks": 0, "hardlinks": 0, "bytes": 0}
    written = []  # host paths of regular files, for hard links
    offset = 0
    for i, p in enumerate(plan):
        top = store / p["name"]
        dirs = _layout(rng, p)
        all_dirs = [top] + [top / d for d in dirs]
        for d in all_dirs:
            d.mkdir(parents=True, exist_ok=True)
        nar_size = 0
        for rel, fsize, kind in p["files"]:
            host = top / rel
            if written and kind == "small" and rng.random() < 0.005:
                os.link(rng.choice(written), host)
                stats["hardlinks"] += 1
                nar_size += os.lstat(host).st_size
                continue
            fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                pools.write(fd, fsize, offset, binary=kind != "small" or rng.random() < 0.2)
            finally:
                os.close(fd)
            offset += fsize + 4093
            os.chmod(host, 0o555 if kind in ("so", "exe") else 0o444)
            written.append(host)
            stats["files"] += 1
            stats["bytes"] += fsize
            nar_size += fsize
            if kind == "so":  # libfoo.so -> libfoo.so.MAJOR -> libfoo.so.MAJOR.MINOR.0
                major = host.name.rsplit(".", 2)[0]
                (host.parent / major).symlink_to(host.name)
                (host.parent / major.rsplit(".", 1)[0]).symlink_to(major)
                stats["symlinks"] += 2
        # Links: executables' aliases, directory links, absolute links into
        # referenced paths, the odd dangling link.
        for n in range(max(1, len(p["files"]) // 25)):
            where = top / rng.choice(dirs)
            link = where / f"link{n}-{rng.choice(WORDS)}"
            if link.exists() or link.is_symlink():
                continue
            r = rng.random()
            refs = sorted(p["refs"] - {i})
            if r < 0.5 and p["files"]:
                target = os.path.relpath(top / rng.choice(p["files"])[0], where)
            elif r < 0.7:
                target = os.path.relpath(top / rng.choice(dirs), where)
            elif r < 0.97 and refs:
                target = names[rng.choice(refs)]
            else:
                target = f"../missing-{n}"
            link.symlink_to(target)
            stats["symlinks"] += 1
        for d in sorted(all_dirs, key=lambda d: -len(d.parts)):
            os.utime(d, (1, 1))
        for dirpath, dirnames, filenames in os.walk(top):
            for name in filenames + dirnames:
                os.utime(os.path.join(dirpath, name), (1, 1), follow_symlinks=False)
        for d in sorted(all_dirs, key=lambda d: -len(d.parts)):
            os.chmod(d, 0o555)
            stats["dirs"] += 1
        os.utime(top, (1, 1))
        p["narSize"] = nar_size

    graph = [
        {
            "closureSize": 0,
            "narHash": "",
            "narSize": p["narSize"],
            "path": names[i],
            "references": sorted(names[j] for j in p["refs"]),
        }
        for i, p in enumerate(plan)
    ]
    graph.sort(key=lambda e: e["path"])
    (directory / "graph.json").write_text(json.dumps(graph, indent=1))

    in_degree = {name: 0 for name in names}
    for i, p in enumerate(plan):
        for j in p["refs"] - {i}:
            in_degree[names[j]] += 1
    order = sorted(names, key=lambda n: (-in_degree[n], n.split("-", 1)[1], n))
    keep = STORE_LAYERS - 1
    layers = [[n] for n in order[:keep]]
    if order[keep:]:
        layers.append(order[keep:])
    custom = f"/nix/store/{store_hash(seed, -1, 'customisation-layer')}-customisation-layer"
    _customisation(directory / custom.lstrip("/"), names[0])
    conf = {
        "architecture": "amd64",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "os": "linux",
        "store_dir": "/nix/store",
        "from_image": None,
        "store_layers": layers,
        "customisation_layer": custom,
        "repo_tag": "fastlayer-bench:latest",
        "created": "1970-01-01T00:00:01+00:00",
        "mtime": "1970-01-01T00:00:01+00:00",
        "uid": "0",
        "gid": "0",
        "uname": "root",
        "gname": "root",
    }
    (directory / "conf.json").write_text(json.dumps(conf, indent=1))
    host_store = str(store)
    conf_abs = dict(conf, store_dir=host_store, customisation_layer=str(directory) + custom)
    conf_abs["store_layers"] = [
        [host_store + p.removeprefix("/nix/store") for p in layer] for layer in layers
    ]
    (directory / "conf-abs.json").write_text(json.dumps(conf_abs, indent=1))
    return stats


def ensure_store(
    directory: str | Path, size: int, seed: int = 1, n_paths=None, n_files=None, quiet=False
) -> dict:
    """Generate the store unless `directory` holds one with the same parameters.

    Returns the stamp: parameters plus counts (paths, files, bytes, ...)."""
    directory = Path(directory).resolve()
    scale = size / GIB
    n_paths = n_paths or max(10, round(400 * scale))
    n_files = n_files or max(50, round(40_000 * scale))
    params = {"version": VERSION, "size": size, "seed": seed, "paths": n_paths, "files": n_files}
    stamp_file = directory / "stamp.json"
    if stamp_file.exists():
        stamp = json.loads(stamp_file.read_text())
        if stamp.get("params") == params:
            if not quiet:
                print(f"synthstore: reusing {directory} ({_summary(stamp)})", file=sys.stderr)
            return stamp
        stamp_file.unlink()
        for name in ("nix", "graph.json", "conf.json", "conf-abs.json"):
            target = directory / name
            if target.is_dir():
                _rmtree(target)
            elif target.exists():
                target.unlink()
    elif directory.exists() and any(directory.iterdir()):
        raise SystemExit(f"synthstore: {directory} exists and holds no synthstore; not touching it")
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats = generate(directory, size, seed, n_paths, n_files)
    stamp = {"params": params, **stats, "seconds": round(time.perf_counter() - t0, 1)}
    stamp_file.write_text(json.dumps(stamp, indent=1) + "\n")
    if not quiet:
        print(f"synthstore: generated {directory} ({_summary(stamp)})", file=sys.stderr)
    return stamp


def _summary(stamp: dict) -> str:
    return (
        f"{stamp['paths']} paths, {stamp['files']} files, {stamp['dirs']} dirs, "
        f"{stamp['symlinks']} symlinks, {stamp['hardlinks']} hard links, "
        f"{stamp['bytes'] / (1 << 20):.0f} MiB"
    )


def floor_once(store: Path) -> tuple[int, int]:
    """sha256 every regular file under `store` once; return (files, bytes)."""
    files = nbytes = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for dirpath, _dirs, names in os.walk(store):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            h = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
                    nbytes += n
            files += 1
    return files, nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/fastlayer-bench", help="output directory")
    ap.add_argument("--size", default="1G", help="total file bytes, e.g. 64M, 1G, 4G")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--paths", type=int, help="store paths (default 400 per GiB)")
    ap.add_argument("--files", type=int, help="files (default 40,000 per GiB)")
    args = ap.parse_args(argv)
    ensure_store(args.dir, parse_size(args.size), args.seed, args.paths, args.files)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
