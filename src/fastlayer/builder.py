"""spec + graph -> plan -> layers -> sink. Nothing else happens here.

The order of work: check the spec, open the base image, plan store layers
within the budget the base leaves, stage the customisation layer, then feed
every layer once into the sink (base layers verified as copied, store layers
walked one ahead and streamed in a single pass), and finish with the config.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from fastlayer.emit import KnownOnly, Owner, Pipeline, ReaderSource, StreamSource, store_layer
from fastlayer.errors import CacheMismatch, FastlayerError
from fastlayer.model import Image, Known, Layer, LayerSource, WrittenLayer, compression_of
from fastlayer.nixconf import merge_env
from fastlayer.sinks.base import ImageSink
from fastlayer.sources import explicit
from fastlayer.sources.base_image import open_image
from fastlayer.sources.customisation import customisation_layer, stage
from fastlayer.spec import Spec, format_time, load_spec, parse_time

if TYPE_CHECKING:
    from fastlayer.cache import LayerCache
    from fastlayer.cache.remote import RegistryCache

# a build's cache argument: a directory, None (the default one), False (none), an open cache
CacheChoice = Union[str, "os.PathLike[str]", bool, None, "LayerCache"]

# Keys whose dicts merge (child wins per key); any other key set by the child
# replaces the base's value. Env merges by variable name, as nixpkgs does.
MERGED_KEYS = ("Labels", "ExposedPorts", "Volumes")


@dataclass
class LayerInfo:
    diff_id: str
    size: int
    digest: str
    paths: list[str] = field(default_factory=list)
    comment: str = ""


@dataclass
class BuildResult:
    name: str
    tag: str
    image_id: str  # config digest
    manifest_digest: str | None
    config: dict[str, Any]
    layers: list[LayerInfo]
    plan: Any = None
    record: Any = None  # the sink's ImageRecord
    reused: int = 0  # layers the output held already (the layer cache said which)
    read_bytes: int = 0  # bytes of the layers produced from disk (store, files)
    copied: int = 0  # layers copied from an earlier image of the same batch
    layer_keys: list[str | None] = field(default_factory=list)  # recipe keys, image order
    remote_hits: int = 0  # layers a registry-shared cache named and the sink held
    remote_asked: int = 0  # keys the shared cache was asked for
    remote_fetch: bool = False  # a file output that may take layers from the shared cache
    # (portable key, entry) of this image's layers that the shared cache lacked
    remote_new: list[Any] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tag": self.tag,
            "image_id": self.image_id,
            "manifest_digest": self.manifest_digest,
            "layers": [
                {"diff_id": x.diff_id, "size": x.size, "digest": x.digest, "paths": x.paths}
                for x in self.layers
            ],
        }


def inherit_config(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The runtime config of an image built on `base` (documented in README)."""
    out = dict(base)
    for key, value in child.items():
        if key == "Env":
            out["Env"] = merge_env(base.get("Env") or [], value)
        elif key in MERGED_KEYS:
            out[key] = {**(base.get(key) or {}), **value}
        else:
            out[key] = value
    if "Entrypoint" in child and "Cmd" not in child:
        out.pop("Cmd", None)  # a new entrypoint resets the base's arguments, as in Docker
    return out


def derive_tag(config: dict[str, Any]) -> str:
    """32 hex characters from the config, which holds every layer's diff_id."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:32]


def closure_rows(graph: Any, roots: list[str]) -> Any:
    """Indices of every path reachable from roots (all paths when no roots)."""
    import numpy as np  # only builds with store paths need it

    if not roots:
        return np.arange(graph.n)
    index = graph.index()
    missing = [p for p in roots if p not in index]
    if missing:
        raise FastlayerError(f"the closure graph does not cover store path {missing[0]}")
    seen = np.zeros(graph.n, dtype=bool)
    stack = [index[p] for p in roots]
    indptr, indices = graph.indptr, graph.indices
    while stack:
        i = stack.pop()
        if seen[i]:
            continue
        seen[i] = True
        stack.extend(int(j) for j in indices[indptr[i] : indptr[i + 1]] if not seen[j])
    return np.flatnonzero(seen)


def closure_graph(spec: Spec) -> Any:
    """The closure of the contents' store paths (a ClosureGraph), or None."""
    if not spec.contents.graph:
        return None
    from fastlayer.graph import load_graph  # numpy: only for images with store paths

    graph = load_graph(spec.contents.graph, store_dir=spec.store_dir)
    rows = closure_rows(graph, spec.contents.store_paths)
    return graph.subgraph(rows) if len(rows) < graph.n else graph


def plan_store_layers(spec: Spec, base_layers: int, graph: Any = None) -> Any:
    """The store layers' plan, or None when the image holds no store paths."""
    from fastlayer.plan.limit import store_layer_budget

    if not spec.include_store_paths or not spec.contents.graph:
        return None
    budget = store_layer_budget(spec.max_layers, base_layers)
    from fastlayer.plan import make_plan, read_plan

    graph = graph if graph is not None else closure_graph(spec)
    previous = read_plan(spec.previous_plan) if spec.previous_plan else None
    return make_plan(graph, spec.strategy, budget, previous=previous, steps=spec.pipeline)


def stage_nix_db(spec: Spec, graph: Any, base: Image | None, staging: Path, mtime: int) -> None:
    """/nix/var/nix/db registering the closure (merged with the base image's
    database, if it has one), and gcroots for the contents."""
    from fastlayer.nix.db import (
        base_image_db,
        merge,
        read_db,
        registrations,
        write_db,
        write_gcroots,
    )

    if graph is None:
        raise FastlayerError("nix_db needs contents.graph (the closure to register)")
    regs = registrations(graph, spec.on_disk)
    if base is not None:
        found = staging / ".base-db.sqlite"
        if base_image_db(base, str(found)):
            regs = merge(read_db(str(found)), regs)
            found.unlink()
    when = int(os.environ.get("SOURCE_DATE_EPOCH", mtime))
    write_db(str(staging / "nix/var/nix/db"), regs, when)
    write_gcroots(str(staging), spec.contents.store_paths)


class _Progress:
    """Layer k of n, bytes, rate and time left on a terminal; nothing otherwise.

    The total is the sum of the layers' sizes: exact for a layer done, or begun
    when its size is known before it is produced (a walked layer); for a layer
    not yet begun, its estimate (a store layer's narSize sum; none: 0); for a
    layer whose size shows only as it is produced (a decompressed base layer),
    the bytes seen so far. So the percentage never passes 100% and the total
    is exact from the last layer on."""

    def __init__(self, estimates: list[int | None], layers: int, enabled: bool):
        self.bar = None
        self.layers = layers
        self.sizes = [*estimates, *[None] * (layers - len(estimates))]  # per layer, 0-based
        self.done = 0  # bytes of the layers finished
        total = sum(s or 0 for s in self.sizes)
        if enabled:
            from tqdm import tqdm

            try:  # a terminal that reports no size (a bare pty) gets 80x24
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except OSError:
                width = 0
            self.bar = tqdm(
                total=total or None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
                dynamic_ncols=bool(width),
                ncols=None if width else 80,
                nrows=None if width else 24,  # tqdm hides bars below a 0-row screen
            )

    def _total_from(self, k: int, seen: int) -> int:
        """seen bytes, plus what layers k.. (0-based) are expected to hold."""
        return seen + sum(s or 0 for s in self.sizes[k:])

    def wrap(self, source: LayerSource, k: int) -> LayerSource:
        if self.bar is None or hasattr(source, "pump_blob"):  # a download: counted apart
            return source
        bar, layers, progress = self.bar, self.layers, self

        class Counted:
            size = source.size
            known = getattr(source, "known", None)

            def pump(self, write: Callable[[memoryview], object]) -> str:
                if k - 1 < len(progress.sizes):
                    progress.sizes[k - 1] = source.size  # exact, or None: counted as seen
                bar.total = progress._total_from(k - 1, progress.done)
                bar.set_description(f"layer {k}/{layers}")

                def counted(view: memoryview) -> object:
                    bar.update(len(view))
                    if bar.n > bar.total:  # a layer of unknown size: grow with it
                        bar.total = progress._total_from(k, bar.n)
                    return write(view)

                digest = source.pump(counted)
                if k - 1 < len(progress.sizes):
                    progress.sizes[k - 1] = bar.n - progress.done
                progress.done = bar.n
                bar.total = progress._total_from(k, progress.done)
                bar.refresh()  # the layer done: shown whole, however short it took
                return digest

        return Counted()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _size_estimates(base: Image | None, plan: Any) -> list[int | None]:
    """Sizes of the first layers as known before building: base layers' (None when
    compressed), then store layers' narSize sums; later layers are measured."""
    sizes: list[int | None] = [x.size for x in base.layers] if base else []
    return sizes + ([x.size for x in plan.layers] if plan else [])


def build(
    spec: Spec | dict[str, Any] | str,
    output: str | None = None,
    *,
    format: str = "docker-archive",
    compress: str | None = None,
    progress: bool = False,
    cache: CacheChoice = None,
    cache_repo: str | None = None,
    cache_from: str | None = None,
    cache_to: str | None = None,
    insecure: bool = False,
    timeout: float | None = None,
    stall: float | None = None,
) -> BuildResult:
    """Build the image of spec into output (None: stdout) in the given format.

    cache: the layer cache directory, None for the default one (FASTLAYER_CACHE,
    else $XDG_CACHE_HOME/fastlayer), False for none, or an open LayerCache.
    cache_repo or cache_from (docker://REG/REPO): a layer cache shared through a
    registry, read (see shared_cache_for_build); insecure, timeout, stall: for
    that registry, as for push (None: push's defaults; 0: no limit)."""
    from fastlayer.sinks import open_sink

    spec = load_spec(spec)
    remote = shared_cache_for_build(cache_repo, cache_from, cache_to, insecure=insecure,
                                    timeout=timeout, stall=stall)  # fmt: skip

    def sink_for(mtime: int) -> ContextManager[ImageSink]:
        kind = compress or spec.compression
        return open_sink(output, format=format, compress=kind, name=spec.name, mtime=mtime)

    try:
        return build_into(spec, sink_for, progress=progress, cache=cache, remote=remote)
    finally:
        if remote is not None:
            remote.close()


def shared_cache_for_build(
    cache_repo: str | None, cache_from: str | None, cache_to: str | None, **kw: Any
) -> RegistryCache | None:
    """The shared layer cache a build to a file or layout reads (None: none named).
    It is only read: an entry names a blob in the registry, and a build that
    wrote entries would first have to upload every new layer's blob, a push."""
    if cache_to:
        raise FastlayerError(
            f"--cache-to {cache_to}: build only reads the shared layer cache; "
            "push writes it (its entries name blobs in the registry)"
        )
    if not (cache_repo or cache_from):
        return None
    from fastlayer.cache.remote import RegistryCache, cache_ref
    from fastlayer.registry import client

    source = cache_ref(cache_from, "--cache-from") if cache_from else (
        cache_ref(cache_repo, "--cache-repo")  # type: ignore[arg-type]
    )  # fmt: skip
    # None (not given): the defaults push has; 0 is no limit, as on the command line
    for name, default in (("timeout", client.DEADLINE), ("stall", client.STALL)):
        if kw.get(name) is None:
            kw[name] = default
    return RegistryCache(source, None, **kw)


def layer_cache(cache: CacheChoice) -> LayerCache | None:
    """The LayerCache a build's cache argument names (see build)."""
    from fastlayer.cache import open_cache

    return open_cache(cache)


def owner_of(spec: Spec) -> Owner:
    """mtime, uid, gid and names every generated entry of spec's image carries."""
    mtime = int(parse_time(spec.mtime, "mtime").timestamp())
    return Owner(mtime=mtime, uid=spec.uid, gid=spec.gid, uname=spec.uname, gname=spec.gname)


class Inputs(NamedTuple):
    """What a spec's layers come from, before planning."""

    base: Image | None
    graph: Any  # the closure (ClosureGraph) or None
    files: list[explicit.FileLayer]  # explicit and root layers

    def store_budget(self, spec: Spec) -> int | None:
        """Store layers the plan may use (None: the image holds no store paths)."""
        if not spec.include_store_paths or not spec.contents.graph:
            return None
        from fastlayer.plan.limit import store_layer_budget

        n_base = len(self.base.layers) if self.base else 0
        return store_layer_budget(spec.max_layers, n_base + len(self.files))


def layer_inputs(spec: Spec) -> Inputs:
    """Open the base image, load the closure, expand explicit and root layers."""
    base = open_image(spec.from_image, tag=spec.from_image_tag) if spec.from_image else None
    graph = closure_graph(spec) if (spec.nix_db or spec.include_store_paths) else None
    n_base = len(base.layers) if base else 0
    # explicit and root layers (sources/explicit.py holds the budget rule)
    has_store = bool(spec.include_store_paths and spec.contents.graph)
    files = explicit.explicit_layers(spec)
    files += explicit.fit(spec, n_base, len(files), explicit.root_layers(spec), has_store)
    return Inputs(base, graph, files)


def build_into(
    spec: Spec | dict[str, Any] | str,
    sink_for: Callable[[int], ContextManager[ImageSink]],
    *,
    name: str | None = None,
    tag: str | None = None,
    progress: bool = False,
    cache: CacheChoice = None,
    plan: Any = None,
    reuse: dict[str, tuple[str, int, int, str]] | None = None,
    inputs: Inputs | None = None,
    remote: RegistryCache | None = None,
) -> BuildResult:
    """Build into the sink sink_for(mtime) opens (a file, a registry...).

    name/tag: the reference to record, when not the spec's own. plan: the store
    layers' plan when made elsewhere (a batch plans its images together), from
    inputs (layer_inputs(spec), made once for both).
    reuse: recipe key -> (file, offset, size, diff_id) of layers this run wrote
    already, uncompressed, into a file: copied from there instead of produced.
    remote: a layer cache shared through a registry (cache/remote.py), asked for
    the layers the local cache misses when the sink can skip layers it holds."""
    spec = load_spec(spec)
    cache = layer_cache(cache)
    created = parse_time(spec.created, "created")
    owner = owner_of(spec)
    mtime = owner.mtime
    base, graph, files = inputs if inputs is not None else layer_inputs(spec)
    n_base = len(base.layers) if base else 0
    if plan is None:
        plan = plan_store_layers(spec, n_base + len(files), graph)
    store_paths = [layer.paths for layer in plan.layers] if plan else []
    n_layers = n_base + len(store_paths) + len(files) + 1
    bar = _Progress(_size_estimates(base, plan), n_layers, progress)
    name = name or spec.name
    recipes = Recipes(cache, spec, owner, store_paths, files, base, reuse or {}, remote, graph)
    try:
        with tempfile.TemporaryDirectory(prefix="fastlayer-stage-") as staging_dir:
            staging = Path(staging_dir)
            stage(spec, staging)
            if spec.nix_db:
                stage_nix_db(spec, graph, base, staging, mtime)
            custom = customisation_layer(spec, staging, owner)
            with sink_for(mtime) as sink:
                infos: list[LayerInfo] = []
                for k, (source, paths, comment) in enumerate(
                    _sources(spec, base, store_paths, owner, custom, files, sink, recipes),
                    start=1,
                ):
                    w = _add_layer(sink, bar.wrap(source, k), comment, recipes)
                    infos.append(LayerInfo(w.diff_id, w.size, w.digest, paths, comment))
                config = _image_config(spec, base, infos, created)
                # a derived tag comes from the config, so only now is it known
                final_tag = tag or spec.tag or derive_tag(config)
                record = sink.finish(config, [f"{name}:{final_tag}"])
            recipes.record(record.layers)
    except CacheMismatch as e:
        recipes.forget(e.expected)
        raise
    finally:
        bar.close()
    result = BuildResult(
        name, final_tag, record.config_digest, record.manifest_digest, config, infos, plan, record
    )
    result.reused, result.read_bytes = recipes.reused, recipes.read_bytes
    result.copied = sum(x is not None for x in recipes.copied)
    result.layer_keys = [None] * n_base + recipes.keys + [None]  # per layer, image order
    result.remote_hits, result.remote_new = recipes.remote_held, recipes.remote_new
    result.remote_asked = recipes.remote.stats.asked if recipes.remote is not None else 0
    result.remote_fetch = recipes.fetching
    return result


def stream(spec: Spec | dict[str, Any] | str, **kw: Any) -> BuildResult:
    """Build as an uncompressed docker-archive on stdout."""
    return build(spec, None, format="docker-archive", compress="none", **kw)


def _sources(
    spec: Spec,
    base: Image | None,
    store_paths: list[list[str]],
    owner: Owner,
    custom: Any,
    files: list[explicit.FileLayer],
    sink: ImageSink,
    recipes: Recipes,
) -> Iterator[tuple[LayerSource, list[str], str]]:
    """Every layer's source in image order. A layer the cache knows and the sink
    holds already (sink.skips) is never walked nor read, nor is one a file sink
    takes as a checked download from a shared cache (cache/fetch.py); the others
    go through one pipeline, carrying what the cache knows of them."""
    if base is not None:
        for i, layer in enumerate(base.layers):
            verify = spec.verify_base and not recipes.verified(i)
            yield ReaderSource(layer, verify), [], f"base layer {layer.comment}"
    makers = [
        functools.partial(store_layer, paths, owner, spec.store_root) for paths in store_paths
    ]
    makers += [functools.partial(f.stream, spec, owner) for f in files]  # same single pass
    kinds = [(paths, f"store paths: {paths}") for paths in store_paths]
    kinds += [([], f.comment) for f in files]
    skips = getattr(sink, "skips", None)
    # a file sink says which blob kind it stores (stores_blob; None: uncompressed);
    # the shared cache gives it layers only as checked downloads (cache/fetch.py)
    from fastlayer.cache.fetch import Prefetch, may_fetch

    to_file = hasattr(sink, "stores_blob")
    stores = getattr(sink, "stores_blob", None)
    fetching = to_file and recipes.remote is not None and may_fetch(stores)
    recipes.fetching = fetching
    if skips is not None or fetching:
        recipes.by_content()  # worth a read of the files only where a skip saves more
    if (skips is not None and not to_file and getattr(sink, "takes_shared", True)) or fetching:
        recipes.ask_remote()
    fetched = recipes.fetches(stores, makers) if to_file else [None] * len(makers)
    held = _held(skips, recipes.known)
    if not to_file:
        recipes.check_remote(held)
    recipes.reused += sum(held)
    produce = [
        not h and c is None and f is None
        for h, c, f in zip(held, recipes.copied, fetched, strict=True)
    ]
    with (
        Prefetch([f for f in fetched if f is not None]),  # type: ignore[misc]
        Pipeline([m for m, p in zip(makers, produce, strict=True) if p]) as pipeline,
    ):
        piped = pipeline.sources()
        for i, ((paths, comment), known, h) in enumerate(
            zip(kinds, recipes.known, held, strict=True)
        ):
            if h:
                yield KnownOnly(known), paths, comment
                continue
            if recipes.copied[i] is not None:
                yield ReaderSource(recipes.copied[i]), paths, comment
                continue
            if fetched[i] is not None:
                yield fetched[i], paths, comment
                continue
            source = next(piped)
            source.known = known  # type: ignore[attr-defined]
            recipes.read_bytes += source.size or 0
            yield source, paths, comment
    yield StreamSource(custom), [], "customisation layer"


def _add_layer(sink: ImageSink, source: LayerSource, comment: str, recipes: Recipes) -> Any:
    """sink.add_layer; a layer fetched from the shared cache whose blob did not hold
    (sinks keep nothing of it then) is built from the store instead, with a warning."""
    fallback = getattr(source, "fallback", None)
    if fallback is None:
        return sink.add_layer(source, comment)
    from fastlayer.cache.fetch import HintFailed

    try:
        return sink.add_layer(source, comment)
    except HintFailed as e:
        assert recipes.remote is not None
        recipes.remote.stats.failed += 1
        recipes.remote_held -= 1
        if not e.quiet:
            recipes.remote.warn(f"layer cache {recipes.remote.source} {e}; the layer is built")
        stream = fallback()
        recipes.read_bytes += stream.size or 0
        return sink.add_layer(StreamSource(stream), comment)


def _held(skips: Callable[[Known], bool] | None, known: list[Known | None]) -> list[bool]:
    """Which layers the sink holds, asked in parallel: for a registry each answer is
    a request or two, and a warm push of hundreds of layers would wait on them."""
    if skips is None:
        return [False] * len(known)
    todo = [k for k in known if k is not None]
    if len(todo) < 2:
        return [k is not None and skips(k) for k in known]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, len(todo)), "fastlayer-skips") as pool:
        answers = iter(list(pool.map(skips, todo)))
    return [k is not None and next(answers) for k in known]


def region_reader(path: str, offset: int, size: int) -> Callable[[], Any]:
    """An opener of size bytes at offset in path (for sinks that read, not copy)."""

    return functools.partial(_Slice, path, offset, size)


class _Slice:
    """A reader of one region of a file."""

    def __init__(self, path: str, offset: int, size: int):
        self.f = open(path, "rb")  # noqa: SIM115 (closed by the reader's user)
        self.f.seek(offset)
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> _Slice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Recipes:
    """The cache's side of one build: each layer's recipe key and what the cache
    knows of it, and afterwards what the sink wrote, recorded under those keys."""

    def __init__(
        self, cache: LayerCache | None, spec: Spec, owner: Owner,
        store_paths: list[list[str]], files: list[explicit.FileLayer], base: Image | None,
        reuse: dict[str, tuple[str, int, int, str]], remote: RegistryCache | None = None,
        graph: Any = None,
    ):  # fmt: skip
        self.cache = cache
        self.remote = remote
        self.remote_held = 0  # layers the shared cache named and the sink held
        self.remote_new: list[tuple[str, Any]] = []  # (portable key, Entry) to share
        self.reused = 0  # layers the sink already held: never read
        self.fetching = False  # layers may come from the shared cache as downloads
        self.read_bytes = 0  # bytes of the layers produced from disk
        self.base = base.layers if base is not None else []
        n = len(store_paths) + len(files)
        self.keys: list[str | None] = [None] * n
        self.known: list[Known | None] = [None] * n
        self.base_keys: list[str | None] = [None] * len(self.base)
        self.copied: list[Layer | None] = [None] * n  # layers copied from this run's files
        self.content_keys: list[str | None] = [None] * n  # see by_content
        self.files, self.owner, self.rules = files, owner, spec.permissions
        self.portable: list[str | None] = [None] * n  # keys any machine computes alike
        self.from_remote = [False] * n  # known[i] came from the shared cache
        if cache is None and not reuse and remote is None:
            return
        from fastlayer.cache.keys import (
            base_region_key,
            file_layer_key,
            store_layer_key,
            store_layer_portable_key,
        )

        self.keys = [store_layer_key(p, owner, spec.store_root) for p in store_paths]
        self.keys += [file_layer_key(f.lead_dirs, f.roots, owner, spec.permissions) for f in files]
        if remote is not None:
            nar = _nar_hashes(graph)
            for i, paths in enumerate(store_paths):
                if self.keys[i] is not None:  # every path there: the walk would not fail
                    self.portable[i] = store_layer_portable_key(paths, owner, nar)
        for i, key in enumerate(self.keys):
            if key in reuse:
                path, offset, size, diff_id = reuse[key]
                self.copied[i] = Layer(diff_id, region_reader(path, offset, size), size,
                                       f"copied from {path}", (path, offset))  # fmt: skip
        if cache is None:
            return
        for i, key in enumerate(self.keys):
            entry = cache.get(key) if key else None
            if entry is not None:
                self.known[i] = Known(entry.diff_id, entry.size, entry.blobs)
        if spec.verify_base:
            for i, layer in enumerate(self.base):
                if layer.region is not None and layer.size is not None:
                    path, offset = layer.region
                    self.base_keys[i] = base_region_key(path, offset, layer.size, layer.diff_id)

    def by_content(self) -> None:
        """For file layers whose stat key missed, look up their content key (a
        fresh checkout: same bytes, new inodes and times)."""
        if self.cache is None and self.remote is None:
            return
        from fastlayer.cache.keys import file_layer_content_key

        n_store = len(self.keys) - len(self.files)
        for j, f in enumerate(self.files):
            i = n_store + j
            if self.known[i] is not None or self.keys[i] is None:
                continue
            key = file_layer_content_key(f.lead_dirs, f.roots, self.owner, self.rules)
            self.content_keys[i] = key
            self.portable[i] = key  # names, modes and bytes: the same on any machine
            entry = self.cache.get(key) if key and self.cache is not None else None
            if entry is not None:
                self.known[i] = Known(entry.diff_id, entry.size, entry.blobs)

    def ask_remote(self) -> None:
        """Ask the shared cache for the layers nothing local knows (one parallel
        round of lookups); a hit becomes the layer's hint."""
        if self.remote is None:
            return
        # a cache also written asks for every layer: what it holds need not be written again
        every = self.remote.writes_where_read()
        want = [(i, k) for i, k in enumerate(self.portable)
                if k and (every or self.known[i] is None)]  # fmt: skip
        if not want:
            return
        found = self.remote.lookup([k for _, k in want])
        for i, key in want:
            hit = found.get(key)
            if hit is not None and self.known[i] is None:
                e = hit.entry
                self.known[i] = Known(e.diff_id, e.size, dict(e.blobs))
                self.from_remote[i] = True

    def check_remote(self, held: list[bool]) -> None:
        """A shared hint the sink could not confirm (blob gone, wrong size) is
        dropped with a warning, so the layer is built as if never seen."""
        for i, h in enumerate(held):
            if not self.from_remote[i]:
                continue
            if h:
                self.remote_held += 1
                continue
            assert self.remote is not None
            self.remote.stats.failed += 1
            key = self.portable[i] or ""
            self.remote.warn(f"layer cache {self.remote.source} entry {key[:12]}: its blob is "
                             "missing or not as described; the layer is built")  # fmt: skip
            self.known[i] = None
            self.from_remote[i] = False

    def fetches(
        self, stores: str | None, makers: list[Callable[[], Any]]
    ) -> list[LayerSource | None]:
        """For a file sink (storing blobs of kind `stores`, None: uncompressed): per
        layer, the checked download of its shared cache entry's blob when that is
        the faster way to it (cache/fetch.py), else None. A shared hint is acted on
        only so: never to skip a layer, nor to name one before its bytes."""
        out: list[LayerSource | None] = [None] * len(self.known)
        if self.remote is None:
            return out
        from fastlayer.cache.fetch import FetchedLayer, fetch_kind

        for i, known in enumerate(self.known):
            if not self.from_remote[i] or known is None:
                continue
            kind = fetch_kind(stores, known.blobs) if self.copied[i] is None else None
            if kind is not None:
                key, blob = self.portable[i] or "", kind == stores  # blob: written as it is
                out[i] = FetchedLayer(self.remote.blob_chunks, known, kind, key, makers[i], blob)
                self.remote_held += 1
            self.known[i] = None  # the hint is the download's business only
            self.from_remote[i] = False
        return out

    def verified(self, i: int) -> bool:
        """Whether base layer i was verified by an earlier build, its file unchanged."""
        key = self.base_keys[i]
        if key is None or self.cache is None:
            return False
        entry = self.cache.get(key)
        layer = self.base[i]
        return entry is not None and (entry.diff_id, entry.size) == (layer.diff_id, layer.size)

    def record(self, written: list[WrittenLayer]) -> None:
        """What the sink wrote, under each layer's key (a build that failed records nothing)."""
        from fastlayer.cache import Entry
        from fastlayer.sinks.compress import blob_kind

        n_base = len(self.base)
        if self.remote is not None:
            mine = written[n_base : n_base + len(self.keys)]
            for pkey, w in zip(self.portable, mine, strict=False):
                if pkey and w.digest:
                    kind = blob_kind(compression_of(w.media_type))
                    entry = self.remote.new_entry(pkey, kind, w.diff_id, w.size, w.digest,
                                                  w.blob_size)  # fmt: skip
                    if entry is not None:
                        self.remote_new.append((pkey, entry))
        if self.cache is None:
            return
        for key, layer in zip(self.base_keys, self.base, strict=True):
            if key is not None:
                self.cache.put(key, Entry(layer.diff_id, layer.size or 0))
        mine = written[n_base : n_base + len(self.keys)]
        for key, alt, w in zip(self.keys, self.content_keys, mine, strict=False):
            blobs = {blob_kind(compression_of(w.media_type)): (w.digest, w.blob_size)}
            for k in (key, alt):
                if k is not None:
                    self.cache.put(k, Entry(w.diff_id, w.size, blobs if w.digest else {}))

    def forget(self, diff_id: str) -> None:
        """Drop the entries that named diff_id: their recipe gave other bytes."""
        for key, alt, known in zip(self.keys, self.content_keys, self.known, strict=True):
            for k in (key, alt):
                if k and known is not None and known.diff_id == diff_id and self.cache:
                    self.cache.drop(k, f"its recipe no longer gives {diff_id}", quiet=True)


def _nar_hashes(graph: Any) -> dict[str, str | None]:
    """Store path -> narHash, from the closure graph (empty when it has none)."""
    if graph is None:
        return {}
    return dict(zip(graph.names, graph.nar_hash, strict=True))


def _image_config(
    spec: Spec, base: Image | None, layers: list[LayerInfo], created: Any
) -> dict[str, Any]:
    base_cfg = base.config if base else {}
    when = format_time(created)
    n_base = len(base.layers) if base else 0
    history = list(base_cfg.get("history") or []) if base else []
    history += [{"created": when, "comment": x.comment} for x in layers[n_base:]]
    config: dict[str, Any] = {"created": when, "architecture": spec.architecture, "os": spec.os}
    if spec.variant:
        config["variant"] = spec.variant
    config["config"] = inherit_config(base_cfg.get("config") or {}, spec.config)
    config["rootfs"] = {"type": "layers", "diff_ids": [x.diff_id for x in layers]}
    config["history"] = history
    return config
