"""The device KV cache, addressed by the block ids that the engine's block manager hands out.

One allocation ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` holds
every layer's keys and values; ``k_cache(l)`` / ``v_cache(l)`` are contiguous views
``[num_blocks, block_size, Hkv, D]`` (the layout `kernels.ops` reads and writes). Token
``p`` of a request whose block list is ``blocks`` lives in block ``blocks[p // block_size]``,
row ``p % block_size``; its flat slot is ``block * block_size + p % block_size``.

Every block id in ``range(num_blocks)`` is usable; the pool reserves none.

An fp8 pool (``dtype=torch.float8_e4m3fn``, ``kv_cache.dtype: fp8``) holds e4m3 keys and
values with one scale per tensor -- ``k_scales[l]`` / ``v_scales[l]``, a layer's keys and its
values -- that the RoPE + KV-write kernel divides by and the attention kernels multiply by
(`kernels.ops`). The scales are fixed when the pool is made: 1.0 by default (what serving
engines use without calibrated scales), or calibrated -- `observed_scales` of a pool of the
model's dtype after a calibration prefill (`LlamaModel.calibrate_kv_scales`): each layer's
amax of its keys / values over ``FP8_MAX / headroom``, so the largest value seen maps to
``448 / headroom`` and the bulk lies in e4m3's normal range (with scale 1.0, values below
2^-6 -- a small random model's keys and values -- fall into its subnormals, 1-3 significant
bits). Block moves copy the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FP8_KV_DTYPES = (torch.float8_e4m3fn,)


class KVPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cuda", *, k_scales: Sequence[float] | float | None = None,
                 v_scales: Sequence[float] | float | None = None):
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if int(v) <= 0:
                raise ValueError(f"KVPool: {name} must be positive, got {v}")
        self.num_layers = int(num_layers)
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv = torch.zeros(self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads,
                              self.head_dim, dtype=dtype, device=self.device)
        self.k_caches = [self.kv[layer, 0] for layer in range(self.num_layers)]
        self.v_caches = [self.kv[layer, 1] for layer in range(self.num_layers)]
        self.is_fp8 = dtype in FP8_KV_DTYPES
        self.k_scales = self._scales(k_scales, "k_scales")
        self.v_scales = self._scales(v_scales, "v_scales")
        # block moves on the raw bytes (index ops are not implemented for every fp8 dtype)
        self._moves = self.kv.view(torch.uint8) if self.is_fp8 else self.kv

    def _scales(self, given: Sequence[float] | float | None, what: str) -> list[float]:
        if given is None:
            return [1.0] * self.num_layers
        vals = [float(given)] * self.num_layers if isinstance(given, (int, float)) else [float(x) for x in given]
        if len(vals) != self.num_layers or not all(v > 0 and v != float("inf") for v in vals):
            raise ValueError(f"KVPool: {what} must be {self.num_layers} positive finite scales (one a layer), "
                             f"got {given!r}")
        if not self.is_fp8 and any(v != 1.0 for v in vals):
            raise ValueError(f"KVPool: {what} apply to an fp8 pool only (this one is {self.dtype})")
        return vals
    def observed_scales(self, block_ids: Sequence[int] | torch.Tensor | None = None, headroom: float = 2.0,
                        ) -> tuple[list[float], list[float]]:
        """Per-layer fp8 scales ``(k_scales, v_scales)`` from the amax of this (unquantised)
        pool's keys and values in ``block_ids`` (default all): ``amax * headroom / 448`` (a
        layer that holds only zeros gets 1.0). ``headroom`` > 1 leaves room for values larger
        than the calibration's before e4m3 saturates (its relative precision is the same
        over its normal range, so headroom costs no precision there)."""
        from servesim.kernels.reference import FP8_MAX

        if self.is_fp8:
            raise ValueError("observed_scales: calibrate on a pool of the model's dtype, not an fp8 one")
        if not headroom >= 1.0:
            raise ValueError(f"observed_scales: headroom must be >= 1, got {headroom!r}")
        kv = self.kv if block_ids is None else self.kv.index_select(2, self._ids(block_ids, "observed_scales"))
        amax = kv.abs().amax(dim=(2, 3, 4, 5)).float().cpu()  # [layers, 2]
        sc = [[float(a) * headroom / FP8_MAX if float(a) > 0 else 1.0 for a in row] for row in amax.tolist()]
        return [r[0] for r in sc], [r[1] for r in sc]

    # ---- sizing ---------------------------------------------------------------------
    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers (keys and values)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    @classmethod
    def from_memory_budget(cls, memory_bytes: int | None, num_layers: int, block_size: int,
                           num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float16,
                           device: torch.device | str = "cuda", *, gpu_memory_fraction: float = 0.9,
                           max_blocks: int | None = None) -> KVPool:
        """A pool with as many blocks as fit in ``memory_bytes``.

        ``memory_bytes=None`` sizes it from the device: ``gpu_memory_fraction`` of the
        device's total memory minus what is already in use (CUDA only).
        """
        per_block = cls.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        if memory_bytes is None:
            dev = torch.device(device)
            if dev.type != "cuda":
                raise ValueError("KVPool.from_memory_budget: memory_bytes is required on a non-CUDA device")
            free, total = torch.cuda.mem_get_info(dev)
            used = total - free
            memory_bytes = int(total * gpu_memory_fraction) - used
        num_blocks = int(memory_bytes) // per_block
        if max_blocks is not None:
            num_blocks = min(num_blocks, int(max_blocks))
        if num_blocks < 1:
            raise ValueError(
                f"KVPool.from_memory_budget: {memory_bytes} bytes do not hold one KV block "
                f"({per_block} bytes: {num_layers} layers x {block_size} tokens x {num_kv_heads} kv heads "
                f"x {head_dim} x 2 x {torch.empty((), dtype=dtype).element_size()} bytes)")
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # ---- views ----------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        return self.k_caches[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.v_caches[layer]

    def slot(self, block_ids: Sequence[int], position: int) -> int:
        """Flat slot of token ``position`` of a request holding ``block_ids``."""
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    # ---- block moves ----------------------------------------------------------------
    def copy_blocks(self, src_ids: Sequence[int] | torch.Tensor, dst_ids: Sequence[int] | torch.Tensor) -> None:
        """Copy whole blocks ``src_ids[i] -> dst_ids[i]`` in every layer (keys and values).

        Used for partial reuse of a shared prefix block (copy on write). Sources are read
        before any destination is written, so overlapping lists are safe.
        """
        src = self._ids(src_ids, "copy_blocks source")
        dst = self._ids(dst_ids, "copy_blocks destination")
        if src.shape != dst.shape:
            raise ValueError(f"copy_blocks: {src.numel()} source ids but {dst.numel()} destination ids")
        if src.numel() == 0:
            return
        self._moves.index_copy_(2, dst, self._moves.index_select(2, src))

    def to_host(self, block_ids: Sequence[int] | torch.Tensor, out: torch.Tensor | None = None,
                non_blocking: bool = False) -> torch.Tensor:
        """Blocks ``[num_layers, 2, n, block_size, Hkv, D]`` on the host (for offload).

        ``out`` may be a preallocated (pinned) host buffer of that shape; with
        ``non_blocking=True`` the caller synchronises before reading it.
        """
        ids = self._ids(block_ids, "to_host")
        data = self._moves.index_select(2, ids)
        if self.is_fp8:
            data = data.view(self.dtype)
        if out is None:
            pin = self.device.type == "cuda"
            out = torch.empty(data.shape, dtype=self.dtype, device="cpu", pin_memory=pin)
        elif tuple(out.shape) != tuple(data.shape):
            raise ValueError(f"to_host: out has shape {tuple(out.shape)}, expected {tuple(data.shape)}")
        out.copy_(data, non_blocking=non_blocking)
        return out

    def from_host(self, block_ids: Sequence[int] | torch.Tensor, data: torch.Tensor,
                  non_blocking: bool = False) -> None:
        """Write host blocks (as returned by ``to_host``) into ``block_ids`` (reload)."""
        ids = self._ids(block_ids, "from_host")
        expect = (self.num_layers, 2, ids.numel(), self.block_size, self.num_kv_heads, self.head_dim)
        if tuple(data.shape) != expect:
            raise ValueError(f"from_host: data has shape {tuple(data.shape)}, expected {expect}")
        if ids.numel() == 0:
            return
        dev = data.to(device=self.device, dtype=self.dtype, non_blocking=non_blocking)
        if self.is_fp8:
            dev = dev.view(torch.uint8)
        self._moves.index_copy_(2, ids, dev)

    def _ids(self, ids: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
        """Block ids as an int64 tensor on the pool's device, range-checked when that costs
        no device sync (host lists and CPU tensors)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"{what}: block ids must be 1-D, got shape {tuple(ids.shape)}")
            if ids.device.type == "cpu" and ids.numel():
                self._check_range(int(ids.min()), int(ids.max()), what)
            return ids.to(device=self.device, dtype=torch.int64)
        ids = [int(i) for i in ids]
        if ids:
            self._check_range(min(ids), max(ids), what)
        return torch.tensor(ids, dtype=torch.int64, device=self.device)

    def _check_range(self, lo: int, hi: int, what: str) -> None:
        if lo < 0 or hi >= self.num_blocks:
            raise IndexError(f"{what}: block id {lo if lo < 0 else hi} out of range [0, {self.num_blocks})")

    def __repr__(self) -> str:
        return (f"KVPool(layers={self.num_layers}, blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device}, {self.nbytes / 2**20:.1f} MiB)")
