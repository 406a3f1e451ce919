"""Reference scanning: against a brute-force scan of the NAR, and against real Nix builds."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import validators
from fastlayer._native.nar import nar_walk
from fastlayer._native.scan import RefTable
from nixbuild import nix_build

from fastlayer.commands import graph as graph_cmd
from fastlayer.errors import FastlayerError
from fastlayer.nix.base32 import ALPHABET
from fastlayer.nix.nar import BUFFER_SIZE, nar_hash
from fastlayer.nix.scan import PathInfo, closure_sizes, scan_references, scan_store


def random_hash(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(32))


def nar_bytes(path: Path) -> bytes:
    """The NAR as Nix itself writes it (not fastlayer's serialiser, which is under test)."""
    nix_store = validators.require("nix-store")
    return subprocess.run([nix_store, "--dump", str(path)], capture_output=True, check=True).stdout


def test_scan_chunks_finds_hash_split_anywhere() -> None:
    rng = random.Random(1)
    hashes = [random_hash(rng) for _ in range(50)]
    table = RefTable("".join(hashes).encode())
    target = hashes[17].encode()
    data = b"\x00junk/" + target + b"-name\n"
    for cut in range(len(data) + 1):
        found = bytearray(len(hashes))
        table.scan_chunks([data[:cut], data[cut:]], found)
        assert [i for i, f in enumerate(found) if f] == [17], cut
    found = bytearray(len(hashes))
    table.scan_chunks([bytes([b]) for b in data], found)  # one byte at a time
    assert found[17] == 1 and sum(found) == 1


def test_scan_chunks_windows() -> None:
    rng = random.Random(2)
    hashes = [random_hash(rng) for _ in range(3)]
    table = RefTable("".join(hashes).encode())
    cases = {
        hashes[0][:31].encode() + b"!": [],  # 31 characters only
        hashes[0].upper().encode(): [],  # not base32
        b"0" * 7 + hashes[1].encode() + b"abc": [1],  # inside a longer base32 run
        (hashes[2] + hashes[0]).encode(): [0, 2],  # back to back
    }
    for data, expected in cases.items():
        found = bytearray(3)
        table.scan_chunks([data], found)
        assert [i for i, f in enumerate(found) if f] == expected, data


def make_fake_store(root: Path, rng: random.Random) -> dict[str, str]:
    """Store paths (no Nix) mentioning each other in contents, names and link targets."""
    root.mkdir()
    names = {random_hash(rng): f"pkg{i}" for i in range(24)}
    hashes = list(names)
    for h, name in names.items():
        base = root / f"{h}-{name}"
        refs = rng.sample(hashes, rng.randint(0, 4))
        if name == "pkg0":  # a store path that is a single file
            base.write_bytes(b"see /nix/store/" + refs[0].encode() + b"-x" if refs else b"")
            continue
        base.mkdir()
        for k, ref in enumerate(refs):
            where = k % 4
            if where == 0:  # at a random offset of a multi-buffer file
                blob = bytearray(rng.randbytes(rng.randint(0, 9000)))
                pos = rng.randint(0, len(blob))
                blob[pos:pos] = ref.encode()
                (base / f"data{k}").write_bytes(bytes(blob))
            elif where == 1:
                (base / f"link{k}").symlink_to(f"/nix/store/{ref}-dep/lib")
            elif where == 2:
                (base / f"{ref}-named").write_bytes(b"")
            else:  # mixed into printable base32 text
                text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 200)))
                (base / f"text{k}").write_text(text + ref + text)
        # Near misses that must not count.
        (base / "near").write_text(rng.choice(hashes)[:31] + "-" + rng.choice(hashes).upper())
    return names


def brute_force_refs(store: Path) -> dict[str, list[str]]:
    """Nix's definition: a hash part occurring anywhere in the NAR."""
    entries = sorted(os.listdir(store))
    nars = {e: nar_bytes(store / e) for e in entries}
    return {
        str(store / e): sorted(str(store / o) for o in entries if o[:32].encode() in nars[e])
        for e in entries
    }


def test_fake_store_matches_brute_force(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_fake_store(store, random.Random(3))
    assert scan_references(store, jobs=2) == brute_force_refs(store)


def test_fake_store_small_buffers(tmp_path: Path) -> None:
    # Odd buffer sizes move every read boundary; the carry must keep results equal.
    store = tmp_path / "store"
    make_fake_store(store, random.Random(4))
    entries = sorted(os.listdir(store))
    table = RefTable("".join(e[:32] for e in entries).encode())
    expected = brute_force_refs(store)
    for bufsize in (4096, 4099, 5000):
        for e in entries:
            found = bytearray(len(entries))
            nar_walk(os.fsencode(store / e), lambda mv: None, table.address, found, bufsize)
            got = sorted(str(store / entries[i]) for i, f in enumerate(found) if f)
            assert got == expected[str(store / e)], (bufsize, e)


def test_closure_of_roots_only(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_fake_store(store, random.Random(5))
    everything = scan_references(store)
    root = sorted(everything)[3]
    closure, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p not in closure:
            closure.add(p)
            todo.extend(everything[p])
    # Roots may be given by base name too.
    assert scan_references(store, [os.path.basename(root)]) == {p: everything[p] for p in closure}
    with pytest.raises(FastlayerError, match="not a store path"):
        scan_references(store, ["/elsewhere/x"])
    with pytest.raises(FastlayerError, match="no-such-store"):
        scan_references(tmp_path / "no-such-store")


def test_closure_sizes_with_cycle() -> None:
    infos = [
        PathInfo("/s/a", "h", 1, ("/s/b",)),
        PathInfo("/s/b", "h", 10, ("/s/c", "/s/b")),
        PathInfo("/s/c", "h", 100, ("/s/a",)),  # a -> b -> c -> a
        PathInfo("/s/d", "h", 1000, ("/s/a",)),
        PathInfo("/s/e", "h", 10000, ()),
    ]
    assert closure_sizes(infos) == {
        "/s/a": 111,
        "/s/b": 111,
        "/s/c": 111,
        "/s/d": 1111,
        "/s/e": 10000,
    }


def test_cli_graph_scan(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_fake_store(store, random.Random(6))
    parser = argparse.ArgumentParser()
    graph_cmd.register(parser.add_subparsers())
    out = tmp_path / "graph.json"
    args = parser.parse_args(
        ["graph", "scan", str(store), "-o", str(out), "--print-store-dir", "/nix/store"]
    )
    assert args.func(args) == 0
    graph = json.loads(out.read_text())
    expected = {
        p.replace(str(store), "/nix/store"): [r.replace(str(store), "/nix/store") for r in refs]
        for p, refs in brute_force_refs(store).items()
    }
    assert {g["path"]: g["references"] for g in graph} == expected
    assert [list(g) for g in graph][0] == [
        "closureSize",
        "narHash",
        "narSize",
        "path",
        "references",
    ]


# --- against real Nix builds ---------------------------------------------------

NIX_EXPR = r"""
let
  mk = name: script: builtins.derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  leaf = mk "fl-scan-leaf"
    "/bin/mkdir -p $out/bin; echo leaf > $out/bin/data; /bin/chmod +x $out/bin/data";
  # A store path that is a single file.
  file = mk "fl-scan-file" "echo ${leaf}/bin/data > $out";
  # Referenced only through a symlink target.
  link = mk "fl-scan-link" "/bin/mkdir $out; /bin/ln -s ${file} $out/only-a-symlink";
  # Referenced only through a file name.
  named = mk "fl-scan-name" "/bin/mkdir $out; /bin/touch $out/$(/usr/bin/basename ${leaf})";
  # An input that is not a reference (its hash only appears upper-cased).
  upper = mk "fl-scan-upper" "/bin/mkdir $out; echo ${leaf} | /usr/bin/tr a-z A-Z > $out/upper";
  # A hash part straddling the walker's first 1 MiB buffer boundary.
  big = mk "fl-scan-big" ("/bin/mkdir $out; /usr/bin/head -c 1048317 /dev/zero > $out/big;"
    + " echo ${link} >> $out/big; /usr/bin/head -c 99999 /dev/zero >> $out/big");
in mk "fl-scan-top"
  "/bin/mkdir $out; echo ${named} ${upper} ${big} > $out/deps; echo $out > $out/self"
"""


@pytest.fixture(scope="module")
def nix_built(tmp_path_factory) -> tuple[str, list[dict]]:
    return nix_build(NIX_EXPR, tmp_path_factory.mktemp("nix"))


def test_references_match_nix(nix_built: tuple[str, list[dict]]) -> None:
    top, nix_infos = nix_built
    assert len(nix_infos) == 7
    ours = {p.path: p for p in scan_store("/nix/store", [top], jobs=2)}
    expected = {i["path"]: sorted(i["references"]) for i in nix_infos}
    assert {p: list(i.references) for p, i in ours.items()} == expected
    assert top in expected[top]  # self reference kept, as Nix does
    # The big file's reference must really straddle the walker's buffer boundary.
    big = next(p for p in expected if p.endswith("-fl-scan-big"))
    (link,) = expected[big]
    at = nar_bytes(Path(big)).find(os.path.basename(link)[:32].encode())
    assert at < BUFFER_SIZE < at + 32


def test_nar_hashes_match_nix(nix_built: tuple[str, list[dict]]) -> None:
    top, nix_infos = nix_built
    ours = {p.path: p for p in scan_store("/nix/store", [top])}
    for i in nix_infos:
        assert (ours[i["path"]].nar_size, nar_hash(i["path"]).sri) == (i["narSize"], i["narHash"])
        assert ours[i["path"]].nar_hash == nar_hash(i["path"]).nar_hash
