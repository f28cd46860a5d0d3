"""Two different UTF-8 texts with the same XXH3-128: the attack the cache key must survive.

XXH3's long-input loop adds, for each 8-byte lane of each 64-byte stripe, ``data`` to the
neighbouring accumulator and ``low32(data ^ secret) * high32(data ^ secret)`` to its own. The
default secret is public, so a client can make a lane's low half equal to the secret's: the product
is then 0 whatever the high half holds, and the high half only *adds* into the neighbour. Raising
that high half by +d in one stripe and lowering the same lane's by -d in another stripe of the same
block leaves every accumulator, so every output bit, unchanged.

The lanes below were chosen so that the secret's bytes read as valid UTF-8 in context
(``c2 b8`` is U+00B8, ``c8 9f`` U+021F, ``c9 81`` U+0241). The filler is words of over 100
characters, each one ``[UNK]`` to WordPiece, so the whole text is a few dozen tokens; the two texts
differ in tokens the tokenizer does see (``cat``/``dat``, ``.``/``-``), so their true vectors differ.
"""

from __future__ import annotations

import xxhash

__all__ = ["xxh3_128_collision"]

# The first 128 bytes of XXH3's default secret (kSecret in xxhash.h): a constant of the algorithm.
_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
)
_STRIPE, _LANE = 64, 8


def _lane_offset(stripe: int, lane: int) -> int:
    return stripe * _STRIPE + lane * _LANE


def _secret_low_half(stripe: int, lane: int) -> bytes:
    start = (stripe + lane) * _LANE  # stripe n reads the secret from byte 8n on
    return _SECRET[start : start + 4]


def xxh3_128_collision() -> tuple[str, str]:
    """``(a, b)``: different texts, identical ``xxh3_128`` (checked here, so a wrong secret fails loudly)."""
    filler = ("x" * 119 + " ") * 18  # 2,160 bytes: past XXH3's 240-byte short path, two blocks
    text = bytearray(filler.encode())
    first, second = (6, 0), (15, 0)  # same lane, two stripes of the first 1,024-byte block

    at = _lane_offset(*first)
    text[at - 6 : at] = b" the \xc2"  # a lead byte, so the secret's 0xb8 is a continuation
    text[at : at + 4] = _secret_low_half(*first)  # b8 08 46 74: the product term is zero
    text[at + 4 : at + 12] = b" cat sat"
    at2 = _lane_offset(*second)
    text[at2 - 2 : at2] = b"  "
    text[at2 : at2 + 4] = _secret_low_half(*second)  # c8 9f 7e c9
    text[at2 + 4 : at2 + 12] = b"\x81. a mat"  # 0x81 ends the two-byte U+0241
    a = bytes(text)

    # +1 in the second byte of the first lane's high half ("cat" -> "dat"), -1 in the same byte of
    # the second's ("." -> "-"): the two carries into the neighbouring accumulator cancel.
    other = bytearray(a)
    other[at + 5] += 1
    other[at2 + 5] -= 1
    b = bytes(other)
    if a == b or xxhash.xxh3_128_digest(a) != xxhash.xxh3_128_digest(b):
        raise AssertionError("the crafted pair does not collide: XXH3's secret or layout is not as assumed")
    return a.decode("utf-8"), b.decode("utf-8")
