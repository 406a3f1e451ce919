"""Nix's base-32 encoding ("nix-base32"), as in store paths and narHash.

Not RFC 4648: the alphabet omits e, o, u, t, and the digits are written
most significant first over the little-endian integer value of the bytes
(Nix src/libutil/hash.cc, printHash32). A 20-byte store-path hash gives 32
characters, a sha256 gives 52.
"""

from __future__ import annotations

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_DIGIT = {c: i for i, c in enumerate(ALPHABET)}


def encoded_len(nbytes: int) -> int:
    """Characters needed for nbytes bytes."""
    return (nbytes * 8 - 1) // 5 + 1 if nbytes else 0


def encode(data: bytes) -> str:
    """nix-base32 of data."""
    value = int.from_bytes(data, "little")
    n = encoded_len(len(data))
    return "".join(ALPHABET[(value >> (5 * i)) & 31] for i in range(n - 1, -1, -1))


def decode(text: str) -> bytes:
    """Bytes whose nix-base32 is text; ValueError if text is not such an encoding."""
    nbytes = len(text) * 5 // 8
    if encoded_len(nbytes) != len(text):
        raise ValueError(f"invalid nix-base32 length {len(text)}: {text!r}")
    value = 0
    for c in text:
        digit = _DIGIT.get(c)
        if digit is None:
            raise ValueError(f"invalid nix-base32 character {c!r} in {text!r}")
        value = (value << 5) | digit
    if value >> (8 * nbytes):
        raise ValueError(f"nix-base32 value out of range: {text!r}")
    return value.to_bytes(nbytes, "little")
