"""The validation layer every outside input goes through: grammar, types,
caps, depth, and files that are not regular or lie outside their root."""

import json
import os

import pytest

from fastlayer import untrusted
from fastlayer.untrusted import Invalid

HEX = "ab" * 32


@pytest.mark.parametrize(
    "value",
    [
        "sha256:" + HEX[:-1],
        "sha256:" + HEX.upper(),
        "sha256:../../../../etc/shadow",
        "md5:" + HEX,
        "sha256:" + HEX + "\n",
        7,
        None,
    ],
)
def test_bad_digests_are_refused(value):
    with pytest.raises(Invalid, match="where: not a digest"):
        untrusted.digest(value, "where")


def test_blob_path_names_only_blobs():
    assert untrusted.blob_path("sha256:" + HEX, "w") == "blobs/sha256/" + HEX
    assert untrusted.blob_path("sha512:" + HEX * 2, "w") == "blobs/sha512/" + HEX * 2


@pytest.mark.parametrize(
    "name", ["/etc/shadow", "../x", "a/../../b", "a/..", "", "a\0b", ".", "./"]
)
def test_member_names_stay_inside(name):
    with pytest.raises(Invalid):
        untrusted.member_name(name, "m")


def test_member_names_are_normalised():
    assert untrusted.member_name("./a//b/./c", "m") == "a/b/c"


def test_types_and_ranges():
    with pytest.raises(Invalid, match=r"x: must be an integer, not true or false"):
        untrusted.integer(True, "x")
    with pytest.raises(Invalid, match=r"out of range"):
        untrusted.integer(2**70, "x")
    with pytest.raises(Invalid, match=r"out of range"):
        untrusted.integer(-1, "x")
    with pytest.raises(Invalid, match=r"env\[1\]: must be a string"):
        untrusted.str_list(["A=1", 2], "env")
    with pytest.raises(Invalid, match=r"env: must be a list, not a string"):
        untrusted.str_list("A=1", "env")
    with pytest.raises(Invalid, match=r"labels\['a'\]: must be a string"):
        untrusted.str_dict({"a": []}, "labels")
    with pytest.raises(Invalid, match=r"m: missing 'Config'"):
        untrusted.field({}, "Config", str, "m")
    assert untrusted.str_list(None, "e", allow_none=True) == []


def test_json_depth_size_and_syntax(tmp_path):
    with pytest.raises(Invalid, match="nested"):
        untrusted.parse_json("[" * 100_000 + "]" * 100_000, "g")
    with pytest.raises(Invalid, match="nested deeper than 64"):
        untrusted.parse_json("[" * 70 + "]" * 70, "g")
    assert untrusted.parse_json("[" * 10 + "]" * 10, "g") == [[[[[[[[[[]]]]]]]]]]
    with pytest.raises(Invalid, match="not valid JSON"):
        untrusted.parse_json(b"\xff{", "g")
    big = tmp_path / "big.json"
    big.write_text(json.dumps(["x" * 100] * 50_000))
    with pytest.raises(Invalid, match="larger than 4194304 bytes"):
        untrusted.load_json_file(str(big), "graph")


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open would hang here
    with pytest.raises(Invalid, match="is a fifo, not a regular file"):
        untrusted.open_regular(str(fifo), "config")
    with pytest.raises(Invalid, match="is a character device"):
        untrusted.open_regular("/dev/zero", "layer")
    with pytest.raises(Invalid, match="is a directory"):
        untrusted.open_regular(str(tmp_path), "layer")


def test_names_resolve_inside_their_root(tmp_path):
    root = tmp_path / "img"
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / "ok").write_bytes(b"ok")
    (root / "blobs" / "in").symlink_to("ok")
    (root / "blobs" / "out").symlink_to("/etc/passwd")
    (root / "blobs" / "up").symlink_to("../../outside")
    (tmp_path / "outside").write_bytes(b"secret")
    with untrusted.open_inside(str(root), "blobs/in", "w") as f:
        assert f.read() == b"ok"
    for name in ("blobs/out", "blobs/up"):
        with pytest.raises(Invalid, match="resolves outside the image"):
            untrusted.open_inside(str(root), name, "w")
    with pytest.raises(Invalid, match="absolute name"):
        untrusted.open_inside(str(root), "/etc/passwd", "w")


def test_image_references():
    for ok in ("app", "app:1.0", "reg.example:5000/team/app", "reg:5000/a/b:v_1"):
        assert untrusted.image_ref(ok, "r") == ok
    for bad in ("App:1", "a:1\n", "a::1", "", "a:-x", "a b", "reg:5000/", "a:" + "x" * 129):
        with pytest.raises(Invalid, match="not an image reference"):
            untrusted.image_ref(bad, "r")
