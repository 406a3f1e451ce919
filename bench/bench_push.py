"""Pushing the synthetic image to a local registry: fastlayer against skopeo.

    python bench/bench_push.py [--dir /tmp/fastlayer-bench-push] [--size 1G]

Generates (once) the store of bench/synthstore.py in its own directory (one
file is changed and restored below, so not a store others share), starts
Debian's docker-registry on 127.0.0.1 (fresh storage per tool), and times,
in the same run:

1. `fastlayer build spec -o image.tar`: the docker-archive skopeo is given
   (what nixpkgs' streamLayeredImage would produce);
2. `fastlayer push spec docker://...`: build and push in one go;
3. `fastlayer push image.tar docker://...`: the same image from the file;
4. `skopeo copy docker-archive:image.tar docker://...`;
5. each push again, unchanged;
6. after changing one file of a leaf store path (a path alone in its layer):
   `fastlayer push spec` again, and `fastlayer build` + `skopeo copy` again.

Bytes uploaded are read from each registry's access log (completed blob
PUTs) and the blobs' sizes on disk, the same way for both tools. skopeo
keeps its own blob-info cache (as root under /var/lib/containers/cache),
which it uses to skip known layers on the re-push, as fastlayer uses its
cache under $XDG_CACHE_HOME (fresh here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "src")]

from registry_fixture import Registry  # noqa: E402
from synthstore import ensure_store, parse_size  # noqa: E402

POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


def run(argv: list[str], env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return time.perf_counter() - t


def uploaded(reg: Registry, mark: int) -> tuple[int, int]:
    digests = reg.uploads_since(mark)
    return len(digests), sum(reg.blob_path(d).stat().st_size for d in digests)


def leaf_file(store: Path, plan: dict, graph: list[dict]) -> Path:
    """A file of a store path that references nothing else and is alone in its layer."""
    refs = {n["path"]: set(n["references"]) - {n["path"]} for n in graph}
    for layer in plan["layers"]:
        paths = layer["paths"] if isinstance(layer, dict) else layer
        if len(paths) == 1 and not refs.get(paths[0]):
            top = store / paths[0].removeprefix("/nix/store/")
            for f in sorted(top.rglob("*")):
                if f.is_file() and not f.is_symlink() and f.stat().st_nlink == 1:
                    return f
    raise SystemExit("no leaf store path alone in a layer")


def one_round(
    r: int, work: Path, env: dict, spec_file: Path, directory: Path, graph: list, jobs: str,
    rows: dict[str, list[tuple[float, int, int]]],
) -> int:  # fmt: skip
    """Every step once, on fresh registries and a fresh fastlayer cache; returns tar size."""
    env = {**env, "XDG_CACHE_HOME": str(work / f"cache-{r}")}
    fl = [sys.executable, "-m", "fastlayer"]
    skopeo = ["skopeo", "--policy", str(work / "policy.json"), "copy", "--quiet"]
    skopeo += ["--dest-tls-verify=false"]
    regs = {k: Registry(work / f"reg-{k}-{r}").start() for k in ("spec", "tar", "skopeo")}
    changed: Path | None = None
    original = b""

    def add(label: str, t: float, n: int = 0, b: int = 0) -> None:
        rows.setdefault(label, []).append((t, n, b))

    try:
        tar = work / "image.tar"
        meta = work / "meta.json"
        t = run([*fl, "build", "-q", str(spec_file), "-o", str(tar), "--metadata", str(meta)], env)
        add("fastlayer build -o image.tar (input of skopeo)", t)
        size = tar.stat().st_size

        def push(label: str, source: Path, reg: Registry) -> None:
            mark = reg.mark()
            t = run([*fl, "push", "-q", "--insecure", "-j", jobs, str(source),
                     f"docker://{reg.host}/bench:1"], env)  # fmt: skip
            add(label, t, *uploaded(reg, mark))

        def copy(label: str, source: Path) -> None:
            reg = regs["skopeo"]
            mark = reg.mark()
            t = run([*skopeo, f"docker-archive:{source}", f"docker://{reg.host}/bench:1"], env)
            add(label, t, *uploaded(reg, mark))

        push("fastlayer push SPEC (build + push)", spec_file, regs["spec"])
        push("fastlayer push image.tar", tar, regs["tar"])
        copy("skopeo copy docker-archive:image.tar", tar)
        push("fastlayer push SPEC again, unchanged", spec_file, regs["spec"])
        push("fastlayer push image.tar again, unchanged", tar, regs["tar"])
        copy("skopeo copy image.tar again, unchanged", tar)

        plan = json.loads(meta.read_text())
        changed = leaf_file(directory / "nix" / "store", plan, graph)
        original = changed.read_bytes()
        os.chmod(changed, 0o644)
        changed.write_bytes(original + b"changed\n")
        push("leaf changed: fastlayer push SPEC", spec_file, regs["spec"])
        tar2 = work / "image2.tar"
        t = run([*fl, "build", "-q", str(spec_file), "-o", str(tar2)], env)
        add("leaf changed: fastlayer build -o image2.tar", t)
        copy("leaf changed: skopeo copy docker-archive:image2.tar", tar2)
        tar2.unlink()
        return size
    finally:
        if changed is not None and original:
            changed.write_bytes(original)
            os.chmod(changed, 0o444)
            os.utime(changed, (1, 1))
        for reg in regs.values():
            reg.stop()
            shutil.rmtree(reg.root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/fastlayer-bench-push")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--jobs", default="3", help="fastlayer push -j")
    ap.add_argument("--repeat", type=int, default=3, help="rounds, each on fresh registries")
    args = ap.parse_args()
    directory = Path(args.dir).resolve()
    stamp = ensure_store(directory, parse_size(args.size))
    graph = json.loads((directory / "graph.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="fastlayer-bench-push-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE.parent / "src"),
        "TMPDIR": str(work),
    }
    spec = {
        "name": "bench",
        "tag": "1",
        "store_root": str(directory),
        "max_layers": 100,
        "contents": {"graph": str(directory / "graph.json")},  # every path of the graph
        "config": {"Cmd": ["/bin/true"]},
    }
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    (work / "policy.json").write_text(POLICY)
    rows: dict[str, list[tuple[float, int, int]]] = {}
    size = 0
    try:
        for r in range(args.repeat):
            size = one_round(r, work, env, spec_file, directory, graph, args.jobs, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"store: {stamp['bytes'] / (1 << 20):.0f} MiB in {stamp['paths']} paths; "
          f"image.tar {size / (1 << 20):.0f} MiB; {os.cpu_count()} cores\n")  # fmt: skip
    print("| step | seconds | blobs uploaded | MiB uploaded |")
    print("|---|---:|---:|---:|")
    for label, runs in rows.items():
        t = min(x[0] for x in runs)
        _, n, b = runs[-1]
        print(f"| {label} | {t:.2f} | {n} | {b / (1 << 20):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
