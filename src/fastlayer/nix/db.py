"""The Nix database of an image's store: /nix/var/nix/db/db.sqlite, schema 10.

What `nix-store --load-db` would register (nixpkgs' includeNixDB), written
directly: every path of the closure with its narHash (as Nix stores it,
`sha256:<base16>`), narSize, references, deriver, and one registration time.
narHash/narSize are computed from the store when the path is on disk; one
that the graph also gives must agree, else the build fails naming the path
(a corrupt store is never registered). The same inputs give the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from fastlayer.errors import FastlayerError
from fastlayer.nix import base32
from fastlayer.untrusted import MAX_INT, short

SCHEMA_VERSION = 10

# Nix 2.x's schema (src/libstore/schema.sql), as a database it made shows it.
SCHEMA = """
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null,
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"""


@dataclass
class Registration:
    path: str
    nar_hash_hex: str  # base16 sha256 of the NAR
    nar_size: int
    references: list[str]
    deriver: str | None = None


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def hash_hex(nar_hash: str, where: str = "") -> str:
    """base16 of any form Nix writes: sha256:<base32|base16>, sha256-<base64>.
    Anything else (it may come from a graph or a base image) is an error,
    prefixed with `where`."""
    digest = _sha256_bytes(nar_hash) if isinstance(nar_hash, str) else None
    if digest is None:
        raise FastlayerError(f"{where}unrecognised narHash {short(nar_hash)}")
    return digest.hex()


def _sha256_bytes(nar_hash: str) -> bytes | None:
    try:
        if nar_hash.startswith("sha256-"):
            raw = base64.b64decode(nar_hash[7:], validate=True)
            return raw if len(raw) == 32 else None
        value = nar_hash.removeprefix("sha256:")
        if _HEX64.fullmatch(value):
            return bytes.fromhex(value)
        return base32.decode(value) if len(value) == 52 else None
    except (ValueError, binascii.Error):
        return None


def registrations(graph, on_disk=lambda p: p, jobs: int | None = None) -> list[Registration]:
    """One registration per path of graph (a ClosureGraph), hashes checked."""
    from fastlayer.nix.nar import nar_hash_many

    names = list(graph.names)
    present = [p for p in names if os.path.lexists(on_disk(p))]
    computed = dict(zip(present, nar_hash_many([on_disk(p) for p in present], jobs), strict=True))
    regs = []
    for i, path in enumerate(names):
        given = graph.nar_hash[i] if graph.nar_hash else None
        given_size = int(graph.nar_size[i])
        given_hex = hash_hex(given, f"graph: {path}: ") if given else None
        info = computed.get(path)
        if info is None and not given:
            raise FastlayerError(f"no narHash for {path}: not in the graph and not on disk")
        if info is not None:
            mine = hash_hex(info.sri)
            if given and given_hex != mine:
                raise FastlayerError(
                    f"{path}: its contents hash to {info.nar_hash}, the graph says {given}"
                )
            if given_size and given_size != info.nar_size:
                raise FastlayerError(
                    f"{path}: its NAR is {info.nar_size} bytes, the graph says {given_size}"
                )
            nar_hex, size = mine, info.nar_size
        else:
            nar_hex, size = str(given_hex), given_size
        refs = [names[j] for j in graph.indices[graph.indptr[i] : graph.indptr[i + 1]]]
        deriver = graph.deriver[i] if graph.deriver else None
        regs.append(Registration(path, nar_hex, size, refs, deriver))
    return regs


def write_db(db_dir: str, regs: Sequence[Registration], registration_time: int) -> None:
    """db.sqlite and schema in db_dir; paths in sorted order, so bytes are stable."""
    os.makedirs(db_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=db_dir, prefix=".db-", suffix=".sqlite")
    os.close(fd)
    try:
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute("pragma journal_mode = delete")  # one self-contained file
            con.executescript(SCHEMA)
            con.execute("begin")
            ids: dict[str, int] = {}
            for r in sorted(regs, key=lambda r: r.path):
                cur = con.execute(
                    "insert into ValidPaths (path, hash, registrationTime, deriver, narSize)"
                    " values (?, ?, ?, ?, ?)",
                    (r.path, "sha256:" + r.nar_hash_hex, registration_time, r.deriver, r.nar_size),
                )
                ids[r.path] = int(cur.lastrowid or 0)
            for r in sorted(regs, key=lambda r: r.path):
                for ref in sorted(set(r.references)):
                    if ref not in ids:
                        raise FastlayerError(f"{r.path} references {ref}, which is not registered")
                    con.execute(
                        "insert into Refs (referrer, reference) values (?, ?)",
                        (ids[r.path], ids[ref]),
                    )
            con.execute("commit")
        finally:
            con.close()
        os.replace(tmp, os.path.join(db_dir, "db.sqlite"))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    with open(os.path.join(db_dir, "schema"), "w") as f:
        f.write(str(SCHEMA_VERSION))


def write_gcroots(root: str, paths: Sequence[str]) -> None:
    """/nix/var/nix/gcroots/docker/<name> -> path, as nixpkgs adds for the contents."""
    gc = os.path.join(root, "nix/var/nix/gcroots/docker")
    os.makedirs(gc, exist_ok=True)
    for p in paths:
        link = os.path.join(gc, os.path.basename(p))
        if not os.path.lexists(link):
            os.symlink(p, link)


DB_MEMBER = "nix/var/nix/db/db.sqlite"


def read_db(path: str, what: str | None = None) -> list[Registration]:
    """The registrations of an existing Nix database (e.g. a base image's),
    every row checked: it goes into the image's database as it is."""
    what = what or f"Nix database {path}"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("select id, path, hash, narSize, deriver from ValidPaths").fetchall()
        by_id = {r[0]: r[1] for r in rows}
        refs: dict[int, list[str]] = {}
        for referrer, reference in con.execute("select referrer, reference from Refs"):
            if reference not in by_id:
                raise FastlayerError(f"{what}: Refs names a path id {short(reference)} it lacks")
            refs.setdefault(referrer, []).append(by_id[reference])
    except sqlite3.DatabaseError as e:
        raise FastlayerError(f"{what}: not a Nix database: {e}") from None
    finally:
        con.close()
    return [_row(what, i, p, h, size, deriver, refs) for i, p, h, size, deriver in rows]


def _row(
    what: str, i: int, p: object, h: object, size: object, deriver: object, refs: dict
) -> Registration:
    if not (isinstance(p, str) and p.startswith("/") and p.isprintable()):
        raise FastlayerError(f"{what}: bad path {short(p)} in ValidPaths")
    if size is not None and not (type(size) is int and 0 <= size <= MAX_INT):
        raise FastlayerError(f"{what}: bad narSize {short(size)} for {p}")
    if deriver is not None and not isinstance(deriver, str):
        raise FastlayerError(f"{what}: bad deriver {short(deriver)} for {p}")
    nar_hex = hash_hex(h, f"{what}: {p}: ")  # type: ignore[arg-type]
    return Registration(p, nar_hex, size or 0, sorted(refs.get(i, [])), deriver)


def merge(base: list[Registration], ours: list[Registration]) -> list[Registration]:
    """The union; a path registered in both must have the same hash."""
    merged = {r.path: r for r in base}
    for r in ours:
        old = merged.get(r.path)
        if old is not None and old.nar_hash_hex != r.nar_hash_hex:
            raise FastlayerError(
                f"{r.path} is registered in the base image with sha256:{old.nar_hash_hex}, "
                f"but hashes to sha256:{r.nar_hash_hex} here"
            )
        if old is not None:
            refs = sorted(set(old.references) | set(r.references))
            r = Registration(r.path, r.nar_hash_hex, r.nar_size, refs, r.deriver)
        merged[r.path] = r
    return list(merged.values())


def base_image_db(image, dest: str) -> bool:
    """Copy the topmost /nix/var/nix/db/db.sqlite of a base image (model.Image) to
    dest; False when no layer has one."""
    import shutil
    import tarfile

    for layer in reversed(image.layers):
        try:
            with layer.open() as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    name = member.name.removeprefix("./").lstrip("/")
                    if name == DB_MEMBER and member.isreg():
                        src = tar.extractfile(member)
                        assert src is not None
                        with open(dest, "wb") as out:
                            shutil.copyfileobj(src, out)
                        return True
        except (tarfile.TarError, EOFError) as e:
            raise FastlayerError(f"base image layer {layer.comment}: not a tar: {e}") from None
    return False
