"""64-bit hashing primitives: numpy ``uint64`` arithmetic (wrapping), fixed constants.

The one place for the mixers the project hashes with, so every key and token id is the
same in every process and on every platform (Python's salted ``hash()`` is never used):

* :func:`fmix64` -- MurmurHash3's 64-bit finaliser; the prefix-cache chain keys and the
  workload block ids (:mod:`servesim.traces.reuse_bound`);
* :func:`splitmix64` -- splitmix64's finaliser (Stafford's "Mix13"); the GPU backend's
  prompt token ids (:func:`servesim.gpu_backend.executor.prompt_token_ids`);
* :data:`GOLDEN` -- ``2**64 / phi`` rounded to odd (invertible mod ``2**64``): the
  multiplier of the chain keys' polynomial hash and splitmix64's increment;
* :func:`ints_to_u64` -- Python ints (any size) to ``uint64`` words to hash.

Both finalisers are bijections on ``uint64``. Changing any of these changes every key
and token id, hence the runs' outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import numpy as np

U64 = np.uint64
MASK64 = (1 << 64) - 1
GOLDEN = U64(0x9E3779B97F4A7C15)

_F1 = U64(0xFF51AFD7ED558CCD)
_F2 = U64(0xC4CEB9FE1A85EC53)
_S1 = U64(0xBF58476D1CE4E5B9)
_S2 = U64(0x94D049BB133111EB)
_33, _30, _27, _31 = U64(33), U64(30), U64(27), U64(31)


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, elementwise on a uint64 array; a new array."""
    x = x ^ (x >> _33)
    x *= _F1
    x ^= x >> _33
    x *= _F2
    x ^= x >> _33
    return x


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on a uint64 array; a new array."""
    x = (x ^ (x >> _30)) * _S1
    x = (x ^ (x >> _27)) * _S2
    return x ^ (x >> _31)


def ints_to_u64(make_iter: Callable[[], Iterable[int]], count: int) -> np.ndarray:
    """Python ints (from ``make_iter()``, called again if the fast path fails) -> uint64.
    Ints in the int64 range map by two's complement; any other int to a blake2b digest
    of its bytes, so distinct ints stay distinct up to hash collisions."""
    try:
        return np.fromiter(make_iter(), dtype=np.int64, count=count).view(U64)
    except (OverflowError, ValueError, TypeError):
        pass
    out = np.empty(count, dtype=U64)
    for k, x in enumerate(make_iter()):
        x = int(x)
        if -(1 << 63) <= x < (1 << 63):
            out[k] = x & MASK64
        else:
            raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
            out[k] = int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"servesim-bigint").digest(), "little")
    return out


__all__ = ["U64", "MASK64", "GOLDEN", "fmix64", "splitmix64", "ints_to_u64"]
