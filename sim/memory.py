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

With a parallelism layout (policies/parallelism.py: ``tp`` x ``pp`` GPUs, ``ep`` expert
groups) every figure is that of the fullest GPU: ``weight_bytes`` becomes
`weight_bytes_per_gpu` (a stage's ``L / pp`` layers, attention and a dense MLP split over
``tp`` with the KV projections of replicated KV heads counted on every GPU, an MoE layer's
``E / ep`` experts each split over ``tp / ep`` GPUs plus the replicated router, the
vocabulary-parallel embedding on the first stage and lm_head on the last), the KV block
holds the stage's ``L / pp`` layers of the GPU's KV heads, and the activation reserve one
layer's tensors at the GPU's split (an MoE layer's: the expert copies a GPU can receive).
Every GPU of the replica then holds ``weights + reserve + blocks x block_bytes <=
hbm_capacity`` (`per_gpu_memory_bytes`).
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


def kv_bytes_per_block(model: ModelSpec, tokens_per_block: int, tp: int = 1, pp: int = 1) -> int:
    """KV bytes one block occupies on one GPU (its stage's layers, K and V), in the model's KV dtype."""
    per_token = 2 * (model.num_layers // pp) * model.kv_heads_per_gpu(tp) * model.head_dim * model.kv_elem_bytes
    return tokens_per_block * per_token


def _tp_of(tp: int, layout) -> tuple[int, int, int]:
    return (tp, 1, 1) if layout is None else (layout.tp, layout.pp, layout.ep)


def weight_bytes_per_gpu(model: ModelSpec, layout=None) -> int:
    """Bytes of weights on the fullest GPU of a replica split as `layout` (module doc);
    ``model.weight_bytes`` on one GPU."""
    tp, pp, ep = _tp_of(1, layout)
    if tp == pp == ep == 1:
        return model.weight_bytes
    return split_weight_bytes(model, tp, pp, ep)


def split_weight_bytes(model: ModelSpec, tp: int, pp: int, ep: int) -> int:
    """`weight_bytes_per_gpu`'s count, part by part (equal to ``model.weight_bytes`` on one GPU)."""
    q, b = model.quant, model.dtype_bytes
    d, hd, L = model.hidden_size, model.head_dim, model.num_layers // pp
    qg, kvg = model.num_heads // tp * hd, model.kv_heads_per_gpu(tp) * hd
    layer = q.weight_bytes(d, qg + 2 * kvg, b) + q.weight_bytes(qg, d, b)  # qkv, o
    small = 2 * d  # the two RMSNorms (replicated)
    if model.qk_norm:
        small += 2 * hd
    if model.qkv_bias:
        small += qg + 2 * kvg
    if model.o_bias:
        small += d
    if model.is_moe:
        mtp = tp // ep
        ie = model.moe_intermediate_size // mtp
        layer += model.num_experts // ep * (q.weight_bytes(d, 2 * ie, b) + q.weight_bytes(ie, d, b))
        small += d * model.num_experts  # the router (bf16, replicated)
    else:
        i = model.intermediate_size // tp
        layer += q.weight_bytes(d, 2 * i, b) + q.weight_bytes(i, d, b)
        if model.mlp_bias:
            small += 2 * i + d
    vocab = -(-model.vocab_size // tp) * d
    first = vocab  # embedding
    last = d + (vocab if (not model.tie_word_embeddings or pp > 1) else 0)  # final norm, lm_head
    stages = [L * (layer + small * b) + (first * b if s == 0 else 0) + (last * b if s == pp - 1 else 0)
              for s in range(pp)]
    return max(stages)


# Rows of logits assumed when the caller does not give max_batch_size.
DEFAULT_SAMPLING_ROWS = 256


def default_activation_reserve_bytes(
    model: ModelSpec, max_num_tokens: int, tp: int = 1, max_batch_size: int | None = None, layout=None
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
    tp, pp, ep = _tp_of(tp, layout)
    b = model.dtype_bytes
    d = model.hidden_size
    q = model.num_heads // tp * model.head_dim
    kv = model.kv_heads_per_gpu(tp) * model.head_dim
    if model.is_moe:  # the copies of a token a GPU may compute (at most min(k, E / ep)), each 3 x its width
        k = min(model.num_experts_per_tok, model.num_experts // ep)
        per_token = b * (2 * d + 2 * q + 2 * kv + k * (3 * (model.moe_intermediate_size // (tp // ep)) + 2 * d))
    else:
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
    layout=None,
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
    if layout is None:
        model.check_tp(tp, location)
    tp, pp, ep = _tp_of(tp, layout)

    weights = model.weight_bytes / tp if layout is None else weight_bytes_per_gpu(model, layout)
    hbm = hw.hbm_capacity_bytes
    split = tp * pp > 1
    per_gpu = " per GPU" if split else ""
    if weights >= hbm:
        what = ", ".join(f"{k}={v}" for k, v in (("tp", tp), ("pp", pp), ("ep", ep)) if v > 1)
        raise ConfigError(
            f"model {model.name} needs {gb(weights)} of "
            + ("" if model.quant.is_bf16 else f"{model.quant.label} ")
            + "weights per GPU"
            + (f" ({what})" if split else "")
            + f" but {hw.name} has {gb(hbm)}"
            + (f" (at least {math.ceil(weights * tp * pp / hbm)} GPUs' memory for the weights alone: use more "
               "GPUs, cluster.tensor_parallel x cluster.pipeline_parallel, or a smaller precision)"
               if layout is not None else ""),
            location,
        )
    available = hbm - weights - activation_reserve_bytes
    block = kv_bytes_per_block(model, tokens_per_block, tp, pp)
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
                            tp: int = 1, max_batch_size: int | None = None, layout=None) -> int:
    """The largest max_num_tokens whose estimated activation reserve
    (:func:`default_activation_reserve_bytes`) leaves room for one KV block (0: none)."""
    room = hw.hbm_capacity_bytes - (model.weight_bytes / tp if layout is None else weight_bytes_per_gpu(model, layout))
    tp, pp, _ = _tp_of(tp, layout)
    block = kv_bytes_per_block(model, tokens_per_block, tp, pp)

    def fits(t: int) -> bool:
        reserve = default_activation_reserve_bytes(model, t, tp, max_batch_size=max_batch_size, layout=layout)
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


def per_gpu_memory_bytes(model: ModelSpec, layout, tokens_per_block: int, blocks: int,
                         activation_reserve_bytes: float) -> float:
    """Bytes the fullest GPU of the replica holds: its weights, the reserve and its KV pool."""
    return (weight_bytes_per_gpu(model, layout) + activation_reserve_bytes
            + blocks * kv_bytes_per_block(model, tokens_per_block, layout.tp, layout.pp))


__all__ = [
    "weight_bytes_per_gpu",
    "per_gpu_memory_bytes",
    "MAX_POOL_BLOCKS",
    "human_bytes",
    "max_num_tokens_that_fit",
    "kv_pool_blocks",
    "kv_bytes_per_block",
    "default_activation_reserve_bytes",
    "FIXED_RESERVE_BYTES",
    "DEFAULT_SAMPLING_ROWS",
]
