"""GPU memory budget: how many KV-cache blocks fit next to the weights.

Per GPU, with tensor parallelism over `tp` GPUs::

    available = hbm_capacity - weight_bytes / tp - activation_reserve
    blocks    = floor(free_gpu_memory_fraction * available / block_bytes)
    block_bytes = tokens_per_block * kv_bytes_per_token / num_kv_heads * kv_heads_per_gpu

(``kv_heads_per_gpu`` is ``num_kv_heads / tp``, or 1 when tp exceeds the KV heads and
they are replicated.) ``weight_bytes`` counts the decoder linears in the model's weight
precision with their scales (fp8 / int8: 1 byte a weight, int4: half a byte plus group
scales; sim/specs.py ``Quantization``) and the rest in bf16; ``kv_bytes_per_token`` the
KV cache's element format (bf16: 2 bytes, fp8 / int8: 1). ``max_tokens`` caps the pool at ``ceil(max_tokens /
tokens_per_block)`` blocks, so at least ``max_tokens`` tokens fit, as TensorRT-LLM's
``KvCacheConfig.max_tokens`` does.
"""

from __future__ import annotations

import math

from servesim.sim.specs import HardwareSpec, ModelSpec, gb
from servesim.sim.types import ConfigError

# The most KV blocks a pool may hold: the block manager keeps a list of the free ones (2^26:
# ~2.5 GB of Python ints; the "unlimited" 10^9-token cache at 32 tokens a block is 31M).
MAX_POOL_BLOCKS = 2**26

# Fixed part of the activation reserve: cuBLAS/attention workspaces, CUDA-graph memory
# pools, allocator slack. A round, conservative figure; users override the reserve.
FIXED_RESERVE_BYTES = 512 * 2**20


def kv_bytes_per_block(model: ModelSpec, tokens_per_block: int, tp: int = 1) -> int:
    """KV bytes one block occupies on one GPU (all layers, K and V), in the model's KV dtype."""
    per_token = 2 * model.num_layers * model.kv_heads_per_gpu(tp) * model.head_dim * model.kv_elem_bytes
    return tokens_per_block * per_token


# Rows of logits assumed when the caller does not give max_batch_size.
DEFAULT_SAMPLING_ROWS = 256


def default_activation_reserve_bytes(
    model: ModelSpec, max_num_tokens: int, tp: int = 1, max_batch_size: int | None = None
) -> int:
    """Memory to keep free for one forward pass of up to `max_num_tokens` tokens.

    Formula (bytes, b = dtype bytes, d = hidden, q = heads*head_dim, kv = kv_heads*head_dim,
    I = intermediate, V = vocab)::

        FIXED_RESERVE_BYTES                                       (512 MiB workspaces)
        + max_num_tokens * b * (2d + (2q + 2kv)/tp + 3I/tp)       (one layer's activations)
        + min(max_num_tokens, max_batch_size) * ceil(V/tp) * 8    (fp32 logits + probs)

    (``max_batch_size`` None: DEFAULT_SAMPLING_ROWS = 256 rows of logits; pass the
    scheduler's max_batch_size for the real figure.)

    The per-token term is every intermediate tensor of one decoder layer held at once
    (residual, normed input, qkv, attention output, gate_up, SiLU*up): an upper bound on
    the live set, since layers run one after another and free their intermediates.
    """
    if max_batch_size is None:
        max_batch_size = DEFAULT_SAMPLING_ROWS
    if max_num_tokens < 1 or max_batch_size < 1:
        raise ValueError("max_num_tokens and max_batch_size must be positive")
    b = model.dtype_bytes
    d = model.hidden_size
    q = model.num_heads // tp * model.head_dim
    kv = model.kv_heads_per_gpu(tp) * model.head_dim
    i = model.intermediate_size // tp
    per_token = b * (2 * d + 2 * q + 2 * kv + 3 * i)
    sampling_rows = min(max_num_tokens, max_batch_size)
    logits = sampling_rows * (-(-model.vocab_size // tp)) * 8
    return FIXED_RESERVE_BYTES + max_num_tokens * per_token + logits


def kv_pool_blocks(
    model: ModelSpec,
    hw: HardwareSpec,
    tokens_per_block: int,
    free_gpu_memory_fraction: float,
    activation_reserve_bytes: float,
    tp: int = 1,
    max_tokens: int | None = None,
    location: str = "",
    reserve_location: str | None = None,
    reserve_note: str = "",
    reserve_hint: str = "",
) -> int:
    """Number of KV blocks per GPU (see the module docstring for the formula).

    Raises ConfigError (at `location`, e.g. ``exp.yaml: variants[0]``) when the weights do
    not fit on a GPU, when nothing is left for the KV cache, or on bad arguments. When the
    weights alone would leave room and it is the activation reserve that takes it, the
    error is at ``reserve_location`` (the setting the reserve comes from, e.g.
    ``scheduler.max_num_tokens``), ``reserve_note`` saying how it was derived and
    ``reserve_hint`` what to do.
    """
    problems: list[str] = []
    if not isinstance(tokens_per_block, int) or tokens_per_block < 1:
        problems.append(f"tokens_per_block must be a positive integer, got {tokens_per_block!r}")
    if not (0.0 < free_gpu_memory_fraction <= 1.0):
        problems.append(f"free_gpu_memory_fraction must be in (0, 1], got {free_gpu_memory_fraction!r}")
    if activation_reserve_bytes < 0:
        problems.append(f"activation_reserve_bytes must be >= 0, got {activation_reserve_bytes!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        problems.append(f"max_tokens must be a positive integer or null, got {max_tokens!r}")
    if problems:
        raise ConfigError([(location, p) for p in problems])
    model.check_tp(tp, location)

    weights = model.weight_bytes / tp
    hbm = hw.hbm_capacity_bytes
    per_gpu = " per GPU" if tp > 1 else ""
    if weights >= hbm:
        raise ConfigError(
            f"model {model.name} needs {gb(weights)} of "
            + ("" if model.quant.is_bf16 else f"{model.quant.label} ")
            + "weights per GPU"
            + (f" (tp={tp})" if tp > 1 else "")
            + f" but {hw.name} has {gb(hbm)}",
            location,
        )
    available = hbm - weights - activation_reserve_bytes
    block = kv_bytes_per_block(model, tokens_per_block, tp)
    blocks = int(math.floor(free_gpu_memory_fraction * available / block)) if available > 0 else 0
    if blocks < 1 and reserve_location is not None and free_gpu_memory_fraction * (hbm - weights) >= block:
        raise ConfigError(
            f"no room for the KV cache: the activation reserve{' ' + reserve_note if reserve_note else ''} is "
            f"{human_bytes(activation_reserve_bytes)}, more than the {gb(hbm - weights)} that {hw.name} "
            f"({gb(hbm)}{per_gpu}) leaves beside model {model.name}'s weights"
            + (f"; {reserve_hint}" if reserve_hint else ""),
            reserve_location,
        )
    if blocks < 1:
        raise ConfigError(
            f"no room for the KV cache: {hw.name} has {gb(hbm)}{per_gpu}, model {model.name} takes "
            f"{gb(weights)} of weights{per_gpu} and the activation reserve {human_bytes(activation_reserve_bytes)}; "
            f"one KV block of {tokens_per_block} tokens needs {block / 1e6:.1f} MB "
            f"(free_gpu_memory_fraction={free_gpu_memory_fraction})",
            location,
        )
    if max_tokens is not None:
        blocks = min(blocks, -(-max_tokens // tokens_per_block))
    if blocks > MAX_POOL_BLOCKS:
        raise ConfigError(f"a KV pool of {blocks:,} blocks ({gb(hbm)} of {hw.name}): the simulator holds at most "
                          f"{MAX_POOL_BLOCKS:,}; cap it with kv_cache.max_tokens", location)
    return blocks


def human_bytes(nbytes: float) -> str:
    """Decimal bytes in a unit fit for the number, for messages: ``80.0 GB``,
    ``6.8 TB``, ``1.1 PB``, ``3.2e+05 EB``."""
    for unit, scale in (("GB", 1e9), ("TB", 1e12), ("PB", 1e15)):
        if nbytes < 1000 * scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1e18:.3g} EB"


def max_num_tokens_that_fit(model: ModelSpec, hw: HardwareSpec, tokens_per_block: int, free_gpu_memory_fraction: float,
                            tp: int = 1, max_batch_size: int | None = None) -> int:
    """The largest max_num_tokens whose estimated activation reserve
    (:func:`default_activation_reserve_bytes`) leaves room for one KV block (0: none)."""
    room = hw.hbm_capacity_bytes - model.weight_bytes / tp
    block = kv_bytes_per_block(model, tokens_per_block, tp)

    def fits(t: int) -> bool:
        reserve = default_activation_reserve_bytes(model, t, tp, max_batch_size=max_batch_size)
        return free_gpu_memory_fraction * (room - reserve) >= block

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


__all__ = [
    "MAX_POOL_BLOCKS",
    "human_bytes",
    "max_num_tokens_that_fit",
    "kv_pool_blocks",
    "kv_bytes_per_block",
    "default_activation_reserve_bytes",
    "FIXED_RESERVE_BYTES",
    "DEFAULT_SAMPLING_ROWS",
]
