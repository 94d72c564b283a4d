"""CUDA-graph batch sizes: generation-only iterations run as a graph captured for the
smallest size at least the batch, padding the rest (TensorRT-LLM / vLLM style)."""

from __future__ import annotations

import bisect


def capture_sizes(max_batch_size: int, step: int = 8) -> list[int]:
    """1, 2, 4, 8, then every `step` up to max_batch_size (always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size]
    s = 8 + step
    while s < max_batch_size:
        sizes.append(s)
        s += step
    if not sizes or sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def token_capture_sizes(max_tokens: int) -> list[int]:
    """Token counts captured for piecewise graphs: every 16 up to 256, every 64 up to 1024,
    then every 128 (GEMM tiles are 64-128 rows, so the padding adds little work), and
    max_tokens itself."""
    if max_tokens <= 0:
        raise ValueError(f"piecewise graphs: max_tokens must be positive, got {max_tokens}")
    sizes = [s for s in range(16, 257, 16)] + list(range(320, 1025, 64))
    s = 1152
    while s < max_tokens:
        sizes.append(s)
        s += 128
    sizes = [s for s in sizes if s < max_tokens] + [max_tokens]
    return sizes


class GraphPadding:
    def __init__(self, sizes: list[int]):
        self.sizes = sorted(sizes)
        self.max = self.sizes[-1]

    def padded(self, n: int) -> int:
        """Captured size that runs a batch of n (0 if n needs eager mode)."""
        if n > self.max or n <= 0:
            return 0
        return self.sizes[bisect.bisect_left(self.sizes, n)]
