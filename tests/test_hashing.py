"""servesim.traces.hashing: the 64-bit mixers every key and token id is made with."""

from __future__ import annotations

import numpy as np

from servesim.traces.hashing import GOLDEN, MASK64, fmix64, ints_to_u64, splitmix64

VALUES = [0, 1, 2, 0x9E3779B97F4A7C15, MASK64, 1 << 63, 123456789, 0xDEADBEEFCAFEBABE]


def _fmix64_reference(x: int) -> int:
    """MurmurHash3's fmix64 in plain Python ints (Austin Appleby's reference)."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & MASK64
    return x ^ (x >> 33)


def _splitmix64_reference(x: int) -> int:
    """splitmix64's output function (Vigna's reference) in plain Python ints."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def test_mixers_match_their_references():
    a = np.array(VALUES, dtype=np.uint64)
    assert fmix64(a).tolist() == [_fmix64_reference(v) for v in VALUES]
    assert splitmix64(a).tolist() == [_splitmix64_reference(v) for v in VALUES]
    assert a.tolist() == VALUES  # inputs untouched (new arrays)
    # splitmix64 seeded with 0: its first output is the published 0xE220A8397B1DCDAF
    assert int(splitmix64(np.array([0], dtype=np.uint64) + GOLDEN)[0]) == 0xE220A8397B1DCDAF


def test_ints_to_u64():
    small = [0, -1, 5, (1 << 63) - 1, -(1 << 63)]
    assert ints_to_u64(lambda: iter(small), len(small)).tolist() == [v & MASK64 for v in small]
    big = [1 << 64, -(1 << 70), 3]
    out = ints_to_u64(lambda: iter(big), len(big)).tolist()
    assert out[2] == 3 and len(set(out)) == 3
    assert out == ints_to_u64(lambda: iter(big), len(big)).tolist()  # deterministic
