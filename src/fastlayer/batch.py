"""Many images in one run: planned together, each distinct layer produced once.

    result = build_many(["a.toml", "b.toml"], "out/", format="docker-archive")
    print(result.summary())

1. Every spec is loaded and its inputs opened; a spec that fails is reported
   and the others go on (result.failed; the CLI exits 1 at the end).
2. Specs on the default strategy are planned together (`shared`, see
   plan/shared.py): a path used by one image never shares a layer with paths
   other images use, so a layer several images have is the same layer in
   each. Specs naming another strategy keep theirs.
3. Images are built `jobs` at a time, an image only after the images that
   first produce its shared layers: those layers are then known to the layer
   cache (an OCI layout or a registry holds them: not read again) or lie in
   an uncompressed archive this run wrote (copied from there by the kernel).

Outputs: docker-archive / oci-archive: DIR/<spec file stem>.tar (.tar.gz,
.tar.zst when compressed as a whole); oci-dir: DIR is one layout holding
every image under its name:tag, each blob written once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blake3 import blake3

from fastlayer.builder import BuildResult, Inputs, build_into, layer_cache, layer_inputs
from fastlayer.errors import FastlayerError
from fastlayer.spec import Spec, load_spec

SUFFIX = {"none": ".tar", "gzip": ".tar.gz", "zstd": ".tar.zst"}
DEFAULT_STRATEGY = "popularity"  # a spec's strategy when it names none


@dataclass
class Item:
    """One image of a batch: its spec, where it went, and how it ended."""

    source: str  # the spec file, or "spec[i]" for one given as a dict
    output: str = ""
    result: BuildResult | None = None
    error: str | None = None
    spec: Spec | None = None
    inputs: Inputs | None = None
    plan: Any = None
    written: int = 0  # bytes of its output (new blobs only, in a shared layout)

    ref_name: str | None = None  # its name in the output, when not the spec's

    @property
    def name(self) -> str:
        """The spec file's name without .toml/.json (for a dict: its image name's
        last component): what the image is named after in the output."""
        if self.ref_name:
            return self.ref_name
        if not self.source.startswith("spec["):
            return self.name_of_file()
        assert self.spec is not None
        return self.spec.name.rsplit("/", 1)[-1]

    def name_of_file(self) -> str:
        stem = Path(self.source).name
        for suffix in (".toml", ".json"):
            stem = stem.removesuffix(suffix)
        return stem


@dataclass
class BatchResult:
    items: list[Item] = field(default_factory=list)
    shard: tuple[int, int] | None = None

    @property
    def failed(self) -> list[Item]:
        return [x for x in self.items if x.error is not None]

    def counts(self) -> dict[str, int]:
        done = [x.result for x in self.items if x.result is not None]
        n_new = sum(len(r.layer_keys) - r.layer_keys.count(None) for r in done)
        reused = sum(r.reused + r.copied for r in done)
        return {
            "images": len(done),
            "of": len(self.items),
            "layers_built": n_new - reused,
            "layers_reused": reused,
            "bytes_read": sum(r.read_bytes for r in done),
            "bytes_written": sum(x.written for x in self.items if x.result is not None),
        }

    def summary(self) -> str:
        c = self.counts()
        shard = f"shard {self.shard[0]}/{self.shard[1]}: " if self.shard else ""
        return (
            f"{shard}{c['images']} of {c['of']} images built; layers: {c['layers_built']} built, "
            f"{c['layers_reused']} reused; {_size(c['bytes_read'])} read, "
            f"{_size(c['bytes_written'])} written"
        )


def batch_error(item: Item) -> str:
    """The item's error naming its spec (once)."""
    assert item.error is not None
    return item.error if item.source in item.error else f"{item.source}: {item.error}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def build_many(
    specs: Sequence[str | os.PathLike[str] | dict[str, Any] | Spec],
    output_dir: str,
    *,
    format: str = "docker-archive",
    compress: str | None = None,
    cache: Any = None,
    jobs: int = 2,
    strategy: str = "shared",
    on_done: Callable[[Item], None] | None = None,
    shard: tuple[int, int] | None = None,
    names: Sequence[str] | None = None,
    **shared: Any,
) -> BatchResult:
    """Build every spec's image into output_dir (see the module's docstring);
    with shard (K, N), only the specs of shard K of N (see in_shard). names:
    each image's name in the output, when not its spec's. shared: cache_repo,
    cache_from, insecure, timeout, stall, as for builder.build (one shared
    cache for the batch)."""
    from fastlayer.sinks import open_sink

    if shared.get("cache_to"):  # refused before any work
        from fastlayer.builder import shared_cache_for_build

        shared_cache_for_build(None, None, shared["cache_to"])
    items = _prepare(specs, strategy, shard)
    for item, name in zip(items, names or (), strict=False):
        item.ref_name = name
    shared_layout = format == "oci-dir"
    _outputs(items, output_dir, format, compress, shared_layout)
    if not shared_layout:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise FastlayerError(f"cannot make {output_dir}: {e.strerror}") from None
    finish_lock = threading.Lock()

    def run(item: Item, reuse: dict) -> BuildResult:
        assert item.spec is not None
        spec = item.spec
        kind = compress or spec.compression
        before = _tree_size(output_dir) if shared_layout else 0

        @contextlib.contextmanager
        def sink_for(mtime: int):
            with open_sink(item.output, format=format, compress=kind, name=spec.name,
                           mtime=mtime) as sink:  # fmt: skip
                if shared_layout:
                    sink.ref_name = item.name  # type: ignore[attr-defined]
                    sink = _Serialised(sink, finish_lock)
                yield sink

        result = build_into(spec, sink_for, cache=cache, plan=item.plan, inputs=item.inputs,
                            reuse=reuse, remote=remote)  # fmt: skip
        item.written = (
            _tree_size(output_dir) - before if shared_layout else os.path.getsize(item.output)
        )
        return result

    with _batch_cache(cache) as cache, _shared_cache(shared) as remote:
        _schedule(items, run, 1 if shared_layout else max(1, jobs), on_done)
    return BatchResult(items, shard)


def push_many(
    specs: Sequence[str | os.PathLike[str] | dict[str, Any] | Spec],
    prefix: str,
    *,
    cache: Any = None,
    jobs: int = 2,
    strategy: str = "shared",
    on_done: Callable[[Item], None] | None = None,
    shard: tuple[int, int] | None = None,
    **push: Any,
) -> BatchResult:
    """Push every spec's image to prefix/<last component of its name>:<tag>
    (with shard, those of shard K of N only)."""
    from fastlayer.cache.remote import RegistryCache
    from fastlayer.publish import push_spec
    from fastlayer.registry.client import STALL
    from fastlayer.registry.reference import parse_reference

    dest = parse_reference(prefix)
    if dest.tag or dest.digest:
        raise FastlayerError(f"{prefix}: a batch pushes under a repository prefix, not a tag")
    items = _prepare(specs, strategy, shard)
    for item in items:
        if item.spec is not None:
            item.output = f"{prefix.rstrip('/')}/{item.spec.name.rsplit('/', 1)[-1]}"
            if item.spec.tag:
                item.output += f":{item.spec.tag}"
    _no_duplicates(items, "destination")

    # one shared layer cache for the batch: a key is asked, and a blob's size checked,
    # once for every image, and an entry one image wrote is not written again. It lives
    # as long as the batch, so --timeout (one push's limit) is not its limit: the stall
    # limit is
    remote = RegistryCache.from_flags(
        *(push.pop(k, None) for k in ("cache_repo", "cache_from", "cache_to")),
        insecure=push.get("insecure", False), stall=push.get("stall", STALL),
    )  # fmt: skip

    def run(item: Item, reuse: dict) -> BuildResult:
        pushed = push_spec(item.spec, item.output, cache=cache, plan=item.plan,
                           inputs=item.inputs, remote=remote, **push)  # fmt: skip
        item.output = f"{pushed.reference.name}:{pushed.tag}@{pushed.digest}"
        item.written = pushed.stats.uploaded_bytes
        assert pushed.build is not None
        return pushed.build

    try:
        with _batch_cache(cache) as cache:
            _schedule(items, run, max(1, jobs), on_done)
    finally:
        if remote is not None:
            remote.close()
    return BatchResult(items, shard)


# -- the steps --------------------------------------------------------------------------


def in_shard(name: str, shard: tuple[int, int] | None) -> bool:
    """Whether the image named name (its spec's name) is shard K of N's (1-based):
    by a hash of the name alone, so adding or removing specs moves no other."""
    if shard is None:
        return True
    k, n = shard
    return int.from_bytes(blake3(name.encode("utf-8", "surrogateescape")).digest()[:8]) % n == k - 1


def parse_shard(text: str) -> tuple[int, int]:
    """ "K/N" -> (K, N), 1 <= K <= N."""
    k, sep, n = text.partition("/")
    if not (re.fullmatch(r"[0-9]{1,9}/[0-9]{1,9}", text) and 1 <= int(k) <= int(n)):
        raise FastlayerError(f"--shard {text!r}: give K/N with 1 <= K <= N (e.g. 2/4)")
    return int(k), int(n)


def _prepare(
    specs: Sequence[Any], strategy: str, shard: tuple[int, int] | None = None
) -> list[Item]:
    """Load every spec (of the shard), open its inputs and plan the images together."""
    items = []
    for i, given in enumerate(specs):
        where = os.fspath(given) if isinstance(given, (str, os.PathLike)) else f"spec[{i}]"
        item = Item(where)
        if shard is not None and not where.startswith("spec["):
            if not in_shard(item.name_of_file(), shard):
                continue  # another shard's: not even loaded
        try:
            item.spec = load_spec(given)
            if not in_shard(item.name, shard):
                continue
            item.inputs = layer_inputs(item.spec)
        except FastlayerError as e:
            item.error = str(e)
        items.append(item)
    together = [
        x for x in items
        if x.error is None and x.spec.strategy == DEFAULT_STRATEGY  # type: ignore[union-attr]
        and x.inputs.store_budget(x.spec) is not None  # type: ignore[union-attr]
    ]  # fmt: skip
    if strategy == "shared" and together:
        from fastlayer.plan.shared import shared_plans

        try:
            plans = shared_plans(
                [x.inputs.graph for x in together],  # type: ignore[union-attr]
                [x.inputs.store_budget(x.spec) for x in together],  # type: ignore[union-attr]
            )
        except FastlayerError as e:
            for x in together:
                x.error = f"planning the batch together: {e}"
            return items
        for x, plan in zip(together, plans, strict=True):
            x.plan = plan
    elif together:  # another strategy: each image alone, planned here for the schedule
        from fastlayer.plan import make_plan

        for x in together:
            try:
                x.plan = make_plan(x.inputs.graph, strategy, x.inputs.store_budget(x.spec))  # type: ignore[union-attr]
            except FastlayerError as e:
                x.error = str(e)
    return items


def _outputs(
    items: list[Item], output_dir: str, format: str, compress: str | None, shared: bool
) -> None:
    for item in items:
        if item.spec is None:
            continue
        if shared:
            item.output = output_dir
            continue
        kind = compress or item.spec.compression
        suffix = SUFFIX.get(kind, ".tar") if format == "docker-archive" else ".tar"
        item.output = os.path.join(output_dir, item.name + suffix)
    if shared:
        _valid_ref_names(items)
    _no_duplicates(items, "output" if not shared else "name", shared)


# what a ref.name may be (the OCI image layout's annotation grammar)
_REF_NAME = re.compile(
    r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*"
)


def _valid_ref_names(items: list[Item]) -> None:
    """In a shared layout each image is named after its spec: the name must be a
    valid ref.name, or skopeo and umoci could not name the image."""
    for item in items:
        if item.error is None and not _REF_NAME.fullmatch(item.name):
            item.error = (
                f"{item.name!r} cannot name an image in an OCI layout (letters, digits and "
                "-._ between them): rename the spec file"
            )


def _no_duplicates(items: list[Item], what: str, by_name: bool = False) -> None:
    """The second of two items with the same output (or name) fails: it would
    replace the first."""
    seen: dict[str, Item] = {}
    for item in items:
        if item.error is None and item.output:
            key = item.name if by_name else item.output
            if key in seen:
                item.error = f"its {what} {key} is also {seen[key].source}'s"
            else:
                seen[key] = item


def _schedule(
    items: list[Item], run: Callable[[Item, dict], BuildResult], jobs: int,
    on_done: Callable[[Item], None] | None,
) -> None:  # fmt: skip
    """Build items jobs at a time, each after the items that first produce its
    shared layers; a failure is recorded on its item, never stops the rest."""
    if on_done is not None:
        for item in items:
            if item.error is not None:  # failed before building: reported first
                on_done(item)
    todo = [x for x in items if x.error is None]
    keys = {id(x): _plan_keys(x) for x in todo}
    first: dict[str, int] = {}
    for n, x in enumerate(todo):
        for k in keys[id(x)]:
            first.setdefault(k, n)
    needs = {n: {first[k] for k in keys[id(x)]} - {n} for n, x in enumerate(todo)}
    reuse: dict[str, tuple[str, int, int, str]] = {}
    done: set[int] = set()
    running: dict[Future, int] = {}
    threads: dict[int, int] = {}  # item -> ident of the thread building it

    def task(n: int, known: dict) -> BuildResult:
        threads[n] = threading.get_ident()
        try:
            return run(todo[n], known)
        finally:
            threads.pop(n, None)

    with ThreadPoolExecutor(jobs, thread_name_prefix="fastlayer-batch") as pool:
        try:
            _drive(todo, needs, task, jobs, pool, running, done, reuse, on_done)
        except BaseException:
            # Ctrl-C, SIGTERM or SIGHUP reach the main thread only: stop the builds in
            # flight the same way, so each cleans up (no .part left); the pool waits
            for ident in list(threads.values()):
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt)
                )
            raise


def _drive(
    todo: list[Item], needs: dict[int, set[int]], task: Callable[[int, dict], BuildResult],
    jobs: int, pool: ThreadPoolExecutor, running: dict[Future, int], done: set[int],
    reuse: dict[str, tuple[str, int, int, str]], on_done: Callable[[Item], None] | None,
) -> None:  # fmt: skip
    waiting = list(range(len(todo)))
    while waiting or running:
        for n in [n for n in waiting if needs[n] <= done][: jobs - len(running)]:
            waiting.remove(n)
            running[pool.submit(task, n, dict(reuse))] = n
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for f in finished:
            n = running.pop(f)
            item = todo[n]
            try:
                item.result = f.result()
            except FastlayerError as e:
                item.error = str(e)
            except OSError as e:  # a full disk, a file size limit: this image only
                where = f" writing {item.output}" if item.output else ""
                item.error = f"{e.strerror or e}{where}"
            else:
                _remember(item, reuse)
            done.add(n)
            if on_done is not None:
                on_done(item)


def _plan_keys(item: Item) -> list[str]:
    """Recipe keys of the item's planned store layers and its file layers (for the
    schedule only: an image waits for the one that first produces a layer it has)."""
    from fastlayer.builder import owner_of
    from fastlayer.cache.keys import file_layer_key, store_layer_key

    assert item.spec is not None and item.inputs is not None
    spec, owner = item.spec, owner_of(item.spec)
    layers = item.plan.layers if item.plan is not None else []
    found = [store_layer_key(x.paths, owner, spec.store_root) for x in layers]
    found += [file_layer_key(f.lead_dirs, f.roots, owner, spec.permissions)
              for f in item.inputs.files]  # fmt: skip
    return [k for k in found if k]


def _remember(item: Item, reuse: dict[str, tuple[str, int, int, str]]) -> None:
    """Where the item's layers lie uncompressed in its output file, for the next."""
    result = item.result
    if result is None or result.record is None or not os.path.isfile(item.output):
        return
    for key, w in zip(result.layer_keys, result.record.layers, strict=False):
        if key and w.offset is not None:
            reuse.setdefault(key, (item.output, w.offset, w.size, w.diff_id))


class _Serialised:
    """A sink whose finish() (the index.json update of a shared layout) runs one
    image at a time."""

    def __init__(self, sink: Any, lock: threading.Lock):
        self._sink, self._lock = sink, lock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)

    def finish(self, config: dict, repo_tags: list[str]) -> Any:
        with self._lock:
            return self._sink.finish(config, repo_tags)


@contextlib.contextmanager
def _batch_cache(cache: Any):
    """The layer cache a batch uses: with none asked for, one of its own for the
    run (a batch shares layers through it), removed at the end."""
    if cache is not False:
        yield layer_cache(cache)
        return
    with tempfile.TemporaryDirectory(prefix="fastlayer-batch-cache-") as tmp:
        yield layer_cache(tmp)


@contextlib.contextmanager
def _shared_cache(shared: dict[str, Any]) -> Iterator[Any]:
    """The registry-shared layer cache a batch build reads (builder.build's flags)."""
    from fastlayer.builder import shared_cache_for_build

    kw = dict(shared)
    remote = shared_cache_for_build(kw.pop("cache_repo", None), kw.pop("cache_from", None),
                                    kw.pop("cache_to", None), **kw)  # fmt: skip
    try:
        yield remote
    finally:
        if remote is not None:
            remote.close()


def _tree_size(root: str) -> int:
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(d, f)).st_size
    return total


def build_index(
    specs: Sequence[str | os.PathLike[str] | dict[str, Any] | Spec], layout: str, **kw: Any
) -> tuple[BatchResult, str | None]:
    """One image per platform into the OCI layout, then an image index naming them,
    under the specs' common `name:tag` (which they must share). Returns the batch
    and the index's digest; when an image fails, no index is written and the
    layout is left as it was (a new one is not created)."""
    from fastlayer.publish import platform_of
    from fastlayer.sinks.oci import add_image_index

    names = [os.fspath(s) if isinstance(s, (str, os.PathLike)) else f"spec[{i}]"
             for i, s in enumerate(specs)]  # fmt: skip
    loaded = [load_spec(s) for s in specs]
    first = loaded[0]
    for where, spec in zip(names, loaded, strict=True):
        if (spec.name, spec.tag) != (first.name, first.tag) or not spec.tag:
            raise FastlayerError(
                f"--index: {where} is {spec.name}:{spec.tag or '(no tag)'} but {names[0]} is "
                f"{first.name}:{first.tag or '(no tag)'}; give every spec the index's name and tag"
            )
    seen: dict[str, str] = {}
    for where, spec in zip(names, loaded, strict=True):
        key = json.dumps(platform_of(spec), sort_keys=True)
        if key in seen:
            raise FastlayerError(f"--index: {seen[key]} and {where} are both for "
                                 f"{'/'.join(platform_of(spec).values())}")  # fmt: skip
        seen[key] = where
    members = [f"index-member-{i}" for i in range(len(specs))]  # replaced by the index
    try:
        with _restored_on_failure(layout) as target:
            result = build_many(specs, target, format="oci-dir", names=members, **kw)
            if result.failed:
                raise _IndexFailed(result)
            found = [(x.result.manifest_digest, platform_of(x.spec)) for x in result.items]  # type: ignore[union-attr]
            ref = f"{first.name}:{first.tag}"
            return result, add_image_index(target, found, ref, members)  # type: ignore[arg-type]
    except _IndexFailed as e:
        return e.result, None


class _IndexFailed(Exception):
    """An image of the index failed: nothing of the run may stay in the layout."""

    def __init__(self, result: BatchResult):
        self.result = result


@contextlib.contextmanager
def _restored_on_failure(layout: str) -> Iterator[str]:
    """Yield where to build: a new layout is built beside it and renamed at the end;
    an existing one gets its index.json and blob list back if the build fails."""
    if not os.path.lexists(layout):
        parent = os.path.dirname(os.path.abspath(layout))
        tmp = tempfile.mkdtemp(dir=parent, prefix=".fastlayer-index-", suffix=".part")
        try:
            yield os.path.join(tmp, "layout")
            os.rename(os.path.join(tmp, "layout"), layout)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    index = os.path.join(layout, "index.json")
    blobs = os.path.join(layout, "blobs", "sha256")
    before = Path(index).read_bytes() if os.path.isfile(index) else None
    had = set(os.listdir(blobs)) if os.path.isdir(blobs) else set()
    try:
        yield layout
    except BaseException:
        if before is not None:
            from fastlayer.sinks.output import write_output

            write_output(index, before)
        for name in set(os.listdir(blobs)) - had if os.path.isdir(blobs) else ():
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(blobs, name))
        raise
