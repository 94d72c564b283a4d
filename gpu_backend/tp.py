"""Tensor parallelism for the GPU backend: the Llama model sharded over N processes.

Layout (Megatron, as `ModelSpec.linear_shapes` prices it):

- ``qkv`` and ``gate_up`` are column-parallel: rank ``r`` holds the rows of its query heads,
  of its KV heads (keys and values) and of its slice of the MLP's intermediate features;
- ``o`` and ``down`` are row-parallel: rank ``r`` holds the matching columns, and the
  partial sums of every rank are added by an **all-reduce after each** (two per layer);
- attention heads are split ``Hq / tp`` per rank; KV heads ``Hkv / tp`` per rank, or, when
  ``tp > Hkv``, **replicated**: rank ``r`` holds KV head ``r // (tp / Hkv)``, the one its
  query heads read (`ModelSpec.check_tp` refuses any other split);
- the **embedding is replicated** (a row gather, no compute, and no collective), the
  **lm_head vocab-parallel**: rank ``r`` holds rows ``r * Vp .. (r + 1) * Vp`` of it
  (``Vp = ceil(V / tp)``, the last rank's zero-padded) and the logits of every rank are
  put together with an **all-gather** (every rank then holds all logits; rank 0 samples);
- every rank's KV pool (`KVPool`) holds its own KV heads in the **same block ids**: the
  engine's block manager decides for all of them, so nothing rank-specific reaches it.

Weights are produced sharded: random weights (`sharded_random_weights`) are drawn in the
very order `weights.random_weights` draws them, whole tensor by whole tensor, and each rank
keeps its slice (so TP=N equals TP=1 with the same seed; at most one layer's full tensors
exist at a time), and checkpoints (`weights.load_safetensors_weights` with ``slices``)
are read one rank's rows or columns at a time.

Lock step. Rank 0 is the serving process: the engine, its scheduler and block manager,
the executor's input packing and the sampler live there. Every device operation that
touches the model or the KV pool is first broadcast to the other ranks as a small message
(`Lockstep`: an int64 header over gloo, then the packed int64 and int32 inputs over the
default group, device to device on NCCL), and each of them
runs the same operation on its shard (`worker_loop`): eager forward passes, decode CUDA
graphs, piecewise graphs, their captures, block copies and swaps. The collectives inside a
forward pass then pair up across the ranks. On GPUs the collectives are NCCL and the CUDA
graphs capture them (torch.distributed's NCCL collectives are capturable once the
communicator exists: `init_tp` runs one all-reduce eagerly first); if a capture fails the
runners fall back to eager runs of the same padded shapes, as on one GPU, with a message.
On CPUs the collectives are gloo (the CI test: tests/test_gpu_tp.py).

Not supported with tp > 1: speculative decoding (the drafter would need its own lock step).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from servesim.kernels import ops

from .graph_runner import GraphRunner
from .kv_pool import KVPool
from .model import AttnMetadata, LlamaModel
from .piecewise_runner import PiecewiseRunner
from .rope import build_cos_sin_cache
from .weights import LayerWeights, LlamaWeights, ModelDims, WeightLoadError, load_safetensors_weights, \
    quantize_weights_fp8

# --------------------------------------------------------------------------------------
# the shard of one rank
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardDims(ModelDims):
    """The `ModelDims` one of ``tp`` ranks computes with: its query heads, KV heads and
    intermediate features (``num_heads``, ``num_kv_heads``, ``q_size``, ``kv_size``,
    ``intermediate_size`` are per rank; every other attribute is the model's). The model's
    own are ``spec.num_heads`` etc."""

    tp: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"rank {self.rank} outside [0, {self.tp})")
        self.spec.check_tp(self.tp, "cluster.tensor_parallel")

    @property
    def num_heads(self) -> int:
        return self.spec.num_heads // self.tp

    @property
    def num_kv_heads(self) -> int:
        return self.spec.kv_heads_per_gpu(self.tp)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.spec.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.spec.head_dim

    @property
    def intermediate_size(self) -> int:
        return self.spec.intermediate_size // self.tp

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.spec.vocab_size // self.tp)

    # ---- index ranges of this rank's slice of the full tensors ----------------------
    def q_rows(self) -> tuple[int, int]:
        return self.rank * self.q_size, (self.rank + 1) * self.q_size

    def kv_rows(self) -> tuple[int, int]:
        """Rows of k_proj / v_proj this rank holds (its KV heads)."""
        s = self.spec
        if self.tp <= s.num_kv_heads:
            first = self.rank * self.num_kv_heads
        else:  # replicated: the KV head of this rank's query heads
            first = self.rank // (self.tp // s.num_kv_heads)
        return first * s.head_dim, (first + self.num_kv_heads) * s.head_dim

    def inter_rows(self) -> tuple[int, int]:
        return self.rank * self.intermediate_size, (self.rank + 1) * self.intermediate_size

    def vocab_rows(self) -> tuple[int, int]:
        vp = self.vocab_per_rank
        return min(self.rank * vp, self.spec.vocab_size), min((self.rank + 1) * vp, self.spec.vocab_size)

    def hf_slice(self, name: str) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` of this rank's part of HF tensor ``name`` (None: all of it)."""
        if name.endswith("self_attn.q_proj.weight"):
            return (0, *self.q_rows())
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            return (0, *self.kv_rows())
        if name.endswith("self_attn.o_proj.weight"):
            return (1, *self.q_rows())
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            return (0, *self.inter_rows())
        if name.endswith("mlp.down_proj.weight"):
            return (1, *self.inter_rows())
        if name == "lm_head.weight":
            return (0, *self.vocab_rows())
        return None

    def num_params(self) -> int:
        """Parameters this rank holds (the replicated embedding and norms, its slices, its
        padded lm_head rows)."""
        s = self.spec
        h = s.hidden_size
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * self.intermediate_size + 2 * h
        lm = self.vocab_per_rank * h  # (a tied lm_head: a view of the embedding, or one padded copy)
        return s.vocab_size * h + s.num_layers * layer + h + (0 if s.tie_word_embeddings else lm)


def shard_dims(spec: Any, tp: int, rank: int) -> ShardDims:
    """The `ShardDims` of ``rank`` of ``tp`` for a model spec / config dict / `ModelDims`."""
    return ShardDims(ModelDims.from_spec(spec).spec, tp=int(tp), rank=int(rank))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:t.shape[0]].copy_(t)
    return out


def shard_layer(full: LayerWeights, sd: ShardDims) -> LayerWeights:
    """This rank's slices of one layer's fused full-size weights (contiguous copies)."""
    s = sd.spec
    q0, q1 = sd.q_rows()
    k0, k1 = sd.kv_rows()
    i0, i1 = sd.inter_rows()
    qs, kvs, inter = s.q_size, s.kv_size, s.intermediate_size
    qkv = torch.cat([full.qkv[q0:q1], full.qkv[qs + k0:qs + k1], full.qkv[qs + kvs + k0:qs + kvs + k1]])
    gate_up = torch.cat([full.gate_up[i0:i1], full.gate_up[inter + i0:inter + i1]])
    return LayerWeights(input_norm=full.input_norm.clone(), qkv=qkv.contiguous(), o=full.o[:, q0:q1].contiguous(),
                        post_norm=full.post_norm.clone(), gate_up=gate_up.contiguous(),
                        down=full.down[:, i0:i1].contiguous())


def _shard_lm_head(lm_head: torch.Tensor, sd: ShardDims) -> torch.Tensor:
    v0, v1 = sd.vocab_rows()
    return _pad_rows(lm_head[v0:v1], sd.vocab_per_rank)


def shard_weights(full: LlamaWeights, sd: ShardDims) -> LlamaWeights:
    """This rank's `LlamaWeights` from the whole model's (embedding replicated, lm_head
    vocab-parallel: its rows, zero-padded to ``vocab_per_rank``)."""
    layers = [shard_layer(lw, sd) for lw in full.layers]
    return LlamaWeights(full.embed, layers, full.final_norm, _shard_lm_head(full.lm_head, sd))


def sharded_random_weights(sd: ShardDims, seed: int = 0, dtype: torch.dtype = torch.float32,
                           device: torch.device | str = "cpu", std: float = 0.02) -> LlamaWeights:
    """This rank's part of ``weights.random_weights(spec, seed, ...)``: the same draws in
    the same order, each full tensor drawn and sliced (one layer's at a time)."""
    s = sd.spec
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    h, i = s.hidden_size, s.intermediate_size

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)

    def ones() -> torch.Tensor:
        return torch.ones(h, dtype=dtype, device=device)

    embed = normal(s.vocab_size, h)
    layers = []
    for _ in range(s.num_layers):
        full = LayerWeights(input_norm=ones(), qkv=normal(s.q_size + 2 * s.kv_size, h), o=normal(h, s.q_size),
                            post_norm=ones(), gate_up=normal(2 * i, h), down=normal(h, i))
        layers.append(shard_layer(full, sd))
        del full
    lm_head = embed if s.tie_word_embeddings else normal(s.vocab_size, h)
    return LlamaWeights(embed, layers, ones(), _shard_lm_head(lm_head, sd))


def load_sharded_weights(sd: ShardDims, path: str | os.PathLike, dtype: torch.dtype | None = None,
                         device: torch.device | str = "cpu") -> LlamaWeights:
    """This rank's part of an HF safetensors checkpoint: only its rows / columns are read."""
    w = load_safetensors_weights(sd.spec, path, dtype=dtype, device=device, slices=sd.hf_slice)
    lm_head = w.embed if sd.spec.tie_word_embeddings else w.lm_head
    if sd.spec.tie_word_embeddings:
        lm_head = lm_head[slice(*sd.vocab_rows())]
    return LlamaWeights(w.embed, w.layers, w.final_norm, _pad_rows(lm_head, sd.vocab_per_rank))


def _check_shard_weights(w: LlamaWeights, sd: ShardDims) -> None:
    s, h = sd.spec, sd.spec.hidden_size
    want = [("embed", w.embed, (s.vocab_size, h)), ("final_norm", w.final_norm, (h,)),
            ("lm_head", w.lm_head, (sd.vocab_per_rank, h))]
    if len(w.layers) != s.num_layers:
        raise WeightLoadError(f"weights have {len(w.layers)} layers, the config {s.num_layers}")
    for n, lw in enumerate(w.layers):
        want += [(f"layers[{n}].qkv", lw.qkv, (sd.q_size + 2 * sd.kv_size, h)),
                 (f"layers[{n}].o", lw.o, (h, sd.q_size)),
                 (f"layers[{n}].gate_up", lw.gate_up, (2 * sd.intermediate_size, h)),
                 (f"layers[{n}].down", lw.down, (h, sd.intermediate_size))]
    bad = [f"{name}: shape {tuple(t.shape)}, expected {shape}" for name, t, shape in want if tuple(t.shape) != shape]
    if bad:
        raise WeightLoadError(f"rank {sd.rank} of {sd.tp}: shard weights do not match the model:\n  "
                              + "\n  ".join(bad))


# --------------------------------------------------------------------------------------
# the lock-step channel
# --------------------------------------------------------------------------------------

STOP, FORWARD, GRAPH, PIECEWISE, CAPTURE_GRAPH, CAPTURE_PIECEWISE, COPY_BLOCKS, TO_HOST, FROM_HOST = range(9)
OP_NAMES = ("stop", "forward", "graph", "piecewise", "capture_graph", "capture_piecewise", "copy_blocks",
            "to_host", "from_host")
HEADER = 1024  # int64 words of a message's header
_DTYPES = (torch.int64, torch.int32)


def encode_header(op: int, ints: Sequence[int], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``HEADER``-word int64 header of a message: ``op``, the counts, each tensor's
    dtype code and shape (2 dims at most), the ints."""
    if not 0 <= op < len(OP_NAMES):
        raise ValueError(f"Lockstep: unknown operation {op}")
    words = [op, len(ints), len(tensors)]
    for t in tensors:
        if t.dtype not in _DTYPES:
            raise TypeError(f"Lockstep: {OP_NAMES[op]} tensor of {t.dtype} (int64 / int32 only)")
        if t.dim() > 2:
            raise ValueError(f"Lockstep: {OP_NAMES[op]} tensor of {t.dim()} dims (at most 2)")
        words += [_DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (2 - t.dim())]
    words += [int(i) for i in ints]
    if len(words) > HEADER:
        raise ValueError(f"Lockstep: a {OP_NAMES[op]} message of {len(words)} header words (at most {HEADER})")
    head = torch.zeros(HEADER, dtype=torch.int64)
    head[:len(words)] = torch.tensor(words, dtype=torch.int64)
    return head


def decode_header(head: torch.Tensor) -> tuple[int, list[int], list[tuple[torch.dtype, tuple[int, ...]]]]:
    """``(op, ints, [(dtype, shape), ...])`` of a header made by `encode_header`."""
    w = head.tolist()
    op, n_ints, n_t = w[0], w[1], w[2]
    specs = [w[3 + 4 * i: 7 + 4 * i] for i in range(n_t)]
    ints = w[3 + 4 * n_t: 3 + 4 * n_t + n_ints]
    return op, ints, [(_DTYPES[c], tuple(dims[:nd])) for c, nd, *dims in specs]


def pack(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The message's payload: per dtype of `_DTYPES` with elements, its tensors flattened
    and concatenated (in order)."""
    out = []
    for dt in _DTYPES:
        parts = [t.reshape(-1) for t in tensors if t.dtype == dt]
        if parts and sum(p.numel() for p in parts):
            out.append(torch.cat(parts))
    return out


def unpack(shapes: Sequence[tuple[torch.dtype, tuple[int, ...]]], fill, device) -> list[torch.Tensor]:
    """The tensors of a message from its header's shapes; ``fill(flat)`` receives each
    payload buffer of `pack` in place (a broadcast) before it is split into views."""
    out: list[torch.Tensor | None] = [None] * len(shapes)
    for dt in _DTYPES:
        idx = [i for i, (d, _) in enumerate(shapes) if d == dt]
        sizes = [int(torch.Size(shapes[i][1]).numel()) for i in idx]
        flat = torch.empty(sum(sizes), dtype=dt, device=device)
        if sum(sizes):
            fill(flat)
        for i, part in zip(idx, flat.split(sizes)):
            out[i] = part.view(shapes[i][1])
    return out  # type: ignore[return-value]


class Lockstep:
    """Rank 0's device operations, broadcast to the other ranks.

    A message is ``op``, a few ints and int64/int32 tensors: one broadcast of a fixed
    ``HEADER``-word int64 header (`encode_header`: op, the ints, each tensor's dtype and
    shape) over ``header_group``, a gloo group (host memory: a waiting rank blocks on a
    socket, not in a GPU kernel, however long the engine is idle between arrivals), then,
    over the default group (NCCL on GPUs: device to device), one broadcast of the int64
    tensors packed together and one of the int32 ones (`pack`; absent when empty)."""

    def __init__(self, device: torch.device | str = "cpu", header_group=None):
        self.device = torch.device(device)
        self.header_group = header_group
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.sent = 0  # messages sent (rank 0)
        self.counts = dict.fromkeys(OP_NAMES, 0)  # ... of each operation
        self._head = None  # (work, header) of the last header sent, in flight

    def send(self, op: int, ints: Sequence[int] = (), tensors: Sequence[torch.Tensor] = ()) -> None:
        """Broadcast one operation. The header goes asynchronously (its gloo round trip
        overlaps rank 0's next host work; the previous one is waited for first, so headers
        keep their order and buffers); the payload follows on the device."""
        head = encode_header(op, ints, tensors)
        if self.world == 1:
            return
        self.flush()
        self._head = (dist.broadcast(head, 0, group=self.header_group, async_op=True), head)
        for flat in pack(tensors):
            dist.broadcast(flat.to(self.device), 0)
        self.sent += 1
        self.counts[OP_NAMES[op]] += 1

    def flush(self) -> None:
        """Wait until the last header has been sent."""
        if self._head is not None:
            self._head[0].wait()
            self._head = None

    def recv(self) -> tuple[int, list[int], list[torch.Tensor]]:
        head = torch.empty(HEADER, dtype=torch.int64)
        dist.broadcast(head, 0, group=self.header_group)
        op, ints, shapes = decode_header(head)
        return op, ints, unpack(shapes, lambda flat: dist.broadcast(flat, 0), self.device)


def _meta_message(m: AttnMetadata) -> tuple[list[int], list[torch.Tensor]]:
    ints = [m.num_context_tokens, m.num_context_chunks, m.num_decode, m.max_seq_len, *m.sampling_chunks]
    ts = [m.input_ids, m.positions, m.slot_mapping, m.sample_indices, m.ctx_block_tables, m.ctx_cu_q_lens,
          m.ctx_seq_lens, m.dec_block_tables, m.dec_seq_lens]
    return ints, ts


def _meta_from_message(ints: list[int], ts: list[torch.Tensor]) -> AttnMetadata:
    tc, n, b, msl, *chunks = ints
    ids, pos, slots, sidx, cbt, ccu, csl, dbt, dsl = ts
    return AttnMetadata(input_ids=ids, positions=pos, slot_mapping=slots, sample_indices=sidx,
                        ctx_block_tables=cbt, ctx_cu_q_lens=ccu, ctx_seq_lens=csl, dec_block_tables=dbt,
                        dec_seq_lens=dsl, num_context_tokens=tc, num_context_chunks=n, num_decode=b,
                        sampling_chunks=tuple(chunks), max_seq_len=msl)


# --------------------------------------------------------------------------------------
# the sharded model, its KV pool and runners
# --------------------------------------------------------------------------------------


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor deprecated)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TPKVPool(KVPool):
    """One rank's KV pool (its KV heads, the engine's block ids). On rank 0 (``leader``
    set) block copies and swaps are broadcast first; each rank keeps its own host copy of
    a swapped request's heads, under the key the leader assigns."""

    leader: Lockstep | None = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._next_key = 0
        self._keys: dict[int, int] = {}  # id(host tensor) -> swap key (rank 0)

    def copy_blocks(self, src_ids, dst_ids) -> None:
        if self.leader is not None:
            self.leader.send(COPY_BLOCKS, (), [self._ids(src_ids, "copy_blocks source"),
                                               self._ids(dst_ids, "copy_blocks destination")])
        super().copy_blocks(src_ids, dst_ids)

    def to_host(self, block_ids, out=None, non_blocking: bool = False) -> torch.Tensor:
        key = None
        if self.leader is not None:
            key = self._next_key
            self._next_key += 1
            self.leader.send(TO_HOST, (key, int(non_blocking)), [self._ids(block_ids, "to_host")])
        data = super().to_host(block_ids, out, non_blocking)
        if key is not None:
            self._keys[id(data)] = key
        return data

    def from_host(self, block_ids, data: torch.Tensor, non_blocking: bool = False) -> None:
        if self.leader is not None:
            key = self._keys.pop(id(data), None)
            if key is None:
                raise RuntimeError("TPKVPool.from_host: data that did not come from this pool's to_host")
            self.leader.send(FROM_HOST, (key, int(non_blocking)), [self._ids(block_ids, "from_host")])
        super().from_host(block_ids, data, non_blocking)


class TPLlamaModel(LlamaModel):
    """One rank's shard of a Llama model (see the module docstring). ``self.dims`` is the
    rank's `ShardDims`; `forward` returns the whole vocabulary's logits on every rank. On
    rank 0 ``leader`` (a `Lockstep`) makes `forward` broadcast its inputs first.
    ``weights``: None (random, `sharded_random_weights`), a checkpoint path (this rank's
    slices of it), or this rank's `LlamaWeights` (`shard_weights`)."""

    def __init__(self, spec: Any, tp: int, rank: int, weights: LlamaWeights | str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cuda", *, group=None,
                 impl: str = "auto", max_positions: int | None = None, seed: int = 0):
        self.dims = sd = shard_dims(spec, tp, rank)
        self.tp, self.rank, self.group = sd.tp, sd.rank, group
        self.dtype = dtype
        self.device = torch.device(device)
        self.impl = impl
        if weights is None:
            weights = sharded_random_weights(sd, seed=seed, dtype=dtype, device=self.device)
        elif isinstance(weights, (str, os.PathLike)):
            weights = load_sharded_weights(sd, weights, dtype=dtype, device=self.device)
        else:
            weights = weights.to(dtype=dtype, device=self.device)
        _check_shard_weights(weights, sd)
        if sd.quant.weights == "fp8":  # per-shard scales (a row-parallel shard's channels see its K slice)
            weights = quantize_weights_fp8(weights, per_channel=sd.quant.scales == "channel")
        self.weights = weights
        self.max_positions = int(max_positions or sd.max_position_embeddings)
        self.cos_sin = build_cos_sin_cache(sd.head_dim, self.max_positions, sd.rope_theta, sd.rope_scaling,
                                           device=self.device)
        self.scale = sd.head_dim ** -0.5
        self._split = [sd.q_size, sd.kv_size, sd.kv_size]
        self.kv_pool = None
        self.leader: Lockstep | None = None

    def make_kv_pool(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None, *,
                     k_scales=None, v_scales=None) -> TPKVPool:
        if k_scales is not None or v_scales is not None:  # the runner refuses kv_cache.scales: calibrated with TP
            raise ValueError("calibrated fp8 KV scales are not supported with tensor parallelism")
        d = self.dims
        pool = TPKVPool(d.num_layers, num_blocks, block_size, d.num_kv_heads, d.head_dim,
                        dtype or self.kv_cache_dtype, self.device)
        pool.leader = self.leader
        self.kv_pool = pool
        return pool

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def _post_attention(self, layer: int, attn: torch.Tensor, residual: torch.Tensor):
        """Row-parallel o and down, each followed by the all-reduce of its partial sums."""
        d, lw, impl = self.dims, self.weights.layers[layer], self.impl
        h = self._all_reduce(self._linear(attn.reshape(attn.shape[0], d.q_size), lw.o))
        x, residual = ops.rms_norm(h, lw.post_norm, d.rms_norm_eps, residual, impl=impl)
        out = self._linear(ops.silu_mul(self._linear(x, lw.gate_up), impl=impl), lw.down)
        return self._all_reduce(out), residual

    def _logits(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The vocab-parallel lm_head: each rank's rows, all-gathered (every rank gets
        ``[S, vocab]`` fp32)."""
        w = self.weights
        x, _ = ops.rms_norm(h, w.final_norm, self.dims.rms_norm_eps, residual, impl=self.impl)
        local = F.linear(x, w.lm_head)  # [S, Vp]
        if self.tp == 1:
            return local[:, :self.dims.vocab_size].float()
        S, vp = local.shape
        full = torch.empty(self.tp * S, vp, dtype=local.dtype, device=local.device)
        _all_gather(full, local.contiguous(), group=self.group)
        return full.view(self.tp, S, vp).permute(1, 0, 2).reshape(S, self.tp * vp)[:, :self.dims.vocab_size].float()

    @torch.no_grad()
    def forward(self, input_ids, positions, kv_pool, attn_meta):
        if self.leader is not None:
            ints, ts = _meta_message(attn_meta)
            self.leader.send(FORWARD, ints, ts)
        return super().forward(input_ids, positions, kv_pool, attn_meta)

    __call__ = forward


class TPGraphRunner(GraphRunner):
    """`GraphRunner` whose captures and runs rank 0 broadcasts first (`Lockstep`)."""

    def capture(self) -> bool:
        lead = self.model.leader
        if lead is not None and self.use_graphs and not self.captured:
            lead.send(CAPTURE_GRAPH)
        return super().capture()

    def run(self, input_ids, positions, block_tables, seq_lens, slot_mapping):
        lead = self.model.leader
        if lead is not None:
            lead.send(GRAPH, (), [input_ids, positions, block_tables, seq_lens, slot_mapping])
        return super().run(input_ids, positions, block_tables, seq_lens, slot_mapping)


class TPPiecewiseRunner(PiecewiseRunner):
    """`PiecewiseRunner` whose captures and runs rank 0 broadcasts first (`Lockstep`)."""

    def capture(self) -> bool:
        lead = self.model.leader
        if lead is not None and self.use_graphs and not self.captured:
            lead.send(CAPTURE_PIECEWISE)
        return super().capture()

    def run(self, input_ids, positions, attn_meta, padded=None):
        lead = self.model.leader
        if lead is not None:
            ints, ts = _meta_message(attn_meta)
            lead.send(PIECEWISE, [int(padded if padded is not None else self.padded_size(attn_meta.num_tokens)),
                                  *ints], [input_ids, positions, *ts[2:]])
        return super().run(input_ids, positions, attn_meta, padded)


# --------------------------------------------------------------------------------------
# process group, workers
# --------------------------------------------------------------------------------------


def free_tcp_address() -> str:
    """``tcp://127.0.0.1:PORT`` with a port free now (the ranks' rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


IDLE_TIMEOUT = timedelta(days=7)  # the header group's: a rank may wait that long for the next operation


def init_tp(rank: int, world: int, init_method: str, device: torch.device, timeout_s: float = 300.0):
    """Join the ranks' default process group (NCCL on CUDA, gloo on a CPU; ``timeout_s``
    bounds a collective: ranks meet inside one operation within seconds), run one eager
    all-reduce (the communicator then exists before any CUDA-graph capture), and make the
    gloo group the `Lockstep` headers go over (its timeout `IDLE_TIMEOUT`). Returns it."""
    if dist.is_initialized():
        raise RuntimeError("tensor parallel: a torch.distributed process group exists already in this process")
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (the device rules)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), device_id=device)
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    if int(t.item()) != world:
        raise RuntimeError(f"tensor parallel: the first all-reduce gave {t.item()}, expected {world}")
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def destroy_group(device: torch.device, timeout_s: float = 30.0) -> bool:
    """Destroy this process's process groups, waiting at most ``timeout_s``. NCCL's
    communicator teardown waits until every CUDA graph that captured one of its collectives
    is destroyed (drop the runners first: the callers do), and a peer that died can hang
    it too: the teardown runs in a daemon thread, and a timeout is reported rather than
    waited out. Returns whether it finished."""
    import gc
    import threading

    if not dist.is_initialized():
        return True
    gc.collect()  # captured graphs not referenced any more: destroyed now
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - a failed device: the teardown below may still work
            pass
    t = threading.Thread(target=dist.destroy_process_group, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        print(f"servesim tensor parallel: the process group's teardown did not finish in {timeout_s:.0f} s "
              "(a CUDA graph still holding an NCCL collective, or a dead rank); continuing without it",
              file=sys.stderr, flush=True)
        return False
    return True


@dataclass
class WorkerSpec:
    """What a rank > 0 needs to build its shard and runners (picklable)."""

    spec: Any  # ModelSpec
    tp: int
    init_method: str
    device_type: str  # "cuda" (rank r on cuda:r) or "cpu"
    dtype: torch.dtype
    seed: int
    weights: str | None
    num_blocks: int
    block_size: int
    max_positions: int | None = None
    graph_sizes: tuple[int, ...] | None = None
    piecewise_sizes: tuple[int, ...] | None = None
    max_blocks: int = 1
    use_graphs: bool | None = None
    kv_dtype: torch.dtype | None = None
    compile_attention: bool = False  # compile the attention kernels' variants before serving


def build_worker(ws: WorkerSpec, rank: int):
    """Rank ``rank``'s model, KV pool and runners (the process group exists)."""
    dev = torch.device(f"cuda:{rank}" if ws.device_type == "cuda" else "cpu")
    model = TPLlamaModel(ws.spec, ws.tp, rank, ws.weights, dtype=ws.dtype, device=dev, seed=ws.seed,
                         max_positions=ws.max_positions)
    pool = model.make_kv_pool(ws.num_blocks, ws.block_size, ws.kv_dtype)
    gr = TPGraphRunner(model, pool, ws.graph_sizes, ws.max_blocks, ws.use_graphs) if ws.graph_sizes else None
    pr = TPPiecewiseRunner(model, pool, ws.piecewise_sizes, ws.use_graphs) if ws.piecewise_sizes else None
    return model, pool, gr, pr


def worker_loop(model: TPLlamaModel, pool: KVPool, graph_runner: GraphRunner | None,
                piecewise_runner: PiecewiseRunner | None, chan: Lockstep) -> int:
    """Run rank 0's broadcast operations on this rank's shard until ``STOP``; returns the
    number of messages handled."""
    swaps: dict[int, torch.Tensor] = {}
    n = 0
    with torch.no_grad():
        while True:
            op, ints, ts = chan.recv()
            n += 1
            if op == STOP:
                return n
            if op == FORWARD:
                m = _meta_from_message(ints, ts)
                model.forward(m.input_ids, m.positions, pool, m)
            elif op == GRAPH:
                graph_runner.run(*ts)
            elif op == PIECEWISE:
                padded, *rest = ints
                m = _meta_from_message(rest, ts)
                piecewise_runner.run(m.input_ids, m.positions, m, padded)
            elif op == CAPTURE_GRAPH:
                graph_runner.capture()
            elif op == CAPTURE_PIECEWISE:
                piecewise_runner.capture()
            elif op == COPY_BLOCKS:
                pool.copy_blocks(ts[0], ts[1])
            elif op == TO_HOST:
                swaps[ints[0]] = pool.to_host(ts[0], non_blocking=bool(ints[1]))
            elif op == FROM_HOST:
                pool.from_host(ts[0], swaps.pop(ints[0]), non_blocking=bool(ints[1]))
            else:
                raise RuntimeError(f"tensor-parallel worker: unknown operation {op}")


def worker_main(rank: int, ws: WorkerSpec) -> None:
    """Entry point of rank ``rank`` > 0 (a spawned process)."""
    dev = torch.device(f"cuda:{rank}" if ws.device_type == "cuda" else "cpu")
    if ws.device_type == "cpu":
        torch.set_num_threads(1)
    headers = init_tp(rank, ws.tp, ws.init_method, dev)
    parts = None
    try:
        parts = build_worker(ws, rank)
        if ws.compile_attention and dev.type == "cuda":
            from .executor import _compile_attention_variants

            _compile_attention_variants(parts[0], parts[1], ws.block_size)
        worker_loop(*parts, Lockstep(dev, headers))
    except Exception as e:
        print(f"servesim tensor-parallel rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        parts = None  # the runners' graphs before the communicator (destroy_group)
        destroy_group(dev)


class TPGroup:
    """Rank 0 of a tensor-parallel group in this process, ranks 1..tp-1 spawned
    (`worker_main`). Use as a context manager: the exit sends ``STOP`` (when the group is
    healthy), joins the workers and destroys the process group."""

    def __init__(self, ws: WorkerSpec, join_timeout_s: float = 60.0):
        import torch.multiprocessing as mp

        self.ws = ws
        self.device = torch.device("cuda:0" if ws.device_type == "cuda" else "cpu")
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=worker_main, args=(r, ws), daemon=True) for r in range(1, ws.tp)]
        for p in self.procs:
            p.start()
        self.join_timeout_s = join_timeout_s
        self.chan: Lockstep | None = None
        try:
            headers = init_tp(0, ws.tp, ws.init_method, self.device)
        except Exception:
            self._kill()
            raise
        self.chan = Lockstep(self.device, headers)

    def __enter__(self) -> TPGroup:
        return self

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join(5)

    def close(self, ok: bool = True) -> None:
        if self.chan is not None and ok:
            try:
                self.chan.send(STOP)
                self.chan.flush()
            except Exception:  # noqa: BLE001 - a dead worker: terminate below
                ok = False
        for p in self.procs:
            p.join(self.join_timeout_s if ok else 2)
        self._kill()
        bad = [p.exitcode for p in self.procs if p.exitcode not in (0, None)]
        self.chan = None
        destroy_group(self.device, 30.0 if ok else 5.0)
        if ok and bad:
            raise RuntimeError(f"tensor-parallel worker(s) exited with {bad} (their messages are above)")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


# --------------------------------------------------------------------------------------
# rank 0's executor
# --------------------------------------------------------------------------------------


def _executor_cls():
    from .executor import GpuExecutor

    class TPExecutor(GpuExecutor):
        """`GpuExecutor` on rank 0 of a tensor-parallel group: its model is a
        `TPLlamaModel` with a ``leader``, its runners broadcast (`TPGraphRunner`,
        `TPPiecewiseRunner`), its pool is a `TPKVPool`: every device operation reaches the
        other ranks first. Sampling and everything on the host happen here only."""

        graph_runner_cls = TPGraphRunner
        piecewise_runner_cls = TPPiecewiseRunner

        def __init__(self, model: TPLlamaModel, *a, **kw):
            if kw.get("speculation") is not None:
                raise ValueError("speculative decoding is not supported with tensor parallelism")
            if model.leader is None and model.tp > 1:
                raise ValueError("TPExecutor: the model of rank 0 needs its Lockstep (model.leader)")
            super().__init__(model, *a, **kw)

        def stats(self) -> dict:
            lead = self.model.leader
            return {**super().stats(), "tensor_parallel": self.model.tp,
                    "lockstep_messages": lead.sent if lead is not None else 0,
                    "lockstep_ops": dict(lead.counts) if lead is not None else {}}

    return TPExecutor


def tp_executor(spec: Any, tp: int, device: torch.device, dtype: torch.dtype, weights: str | None, seed: int,
                num_blocks: int, tokens_per_block: int, *, graph_sizes=None, piecewise_sizes=None,
                max_seq_len: int | None = None, use_graphs: bool | None = None, **executor_kw):
    """Start a tensor-parallel group of ``tp`` ranks (rank 0 here, on ``cuda:0`` or the
    CPU; rank r on ``cuda:r``) and build rank 0's executor over it. Returns ``(group,
    executor)``; close the group (`TPGroup.close`, or ``with group:``) after the run."""
    ws = WorkerSpec(spec=ModelDims.from_spec(spec).spec, tp=int(tp), init_method=free_tcp_address(),
                    device_type=device.type, dtype=dtype, seed=int(seed), weights=None if weights is None else
                    str(weights), num_blocks=int(num_blocks), block_size=int(tokens_per_block),
                    graph_sizes=tuple(graph_sizes) if graph_sizes else None,
                    piecewise_sizes=tuple(piecewise_sizes) if piecewise_sizes else None,
                    max_blocks=max(1, -(-int(max_seq_len or ModelDims.from_spec(spec).max_position_embeddings)
                                        // int(tokens_per_block))),
                    use_graphs=use_graphs, compile_attention=device.type == "cuda")
    group = TPGroup(ws)
    try:
        model = TPLlamaModel(ws.spec, ws.tp, 0, ws.weights, dtype=dtype, device=group.device, seed=ws.seed)
        model.leader = group.chan
        ex = _executor_cls()(model, num_blocks, tokens_per_block, graph_sizes=graph_sizes,
                             piecewise_sizes=piecewise_sizes, max_seq_len=max_seq_len, use_graphs=use_graphs,
                             seed=seed, **executor_kw)
        # the workers size their static block tables as rank 0's executor did
        if ex.max_blocks != -(-int(max_seq_len or model.max_positions) // int(tokens_per_block)):
            raise RuntimeError("tp_executor: block-table width mismatch")
    except BaseException:
        group.close(ok=False)
        raise
    return group, ex


# --------------------------------------------------------------------------------------
# all-reduce timing (the calibration's sweep and benchmarks/tp_bench.py)
# --------------------------------------------------------------------------------------

DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_TOKENS = (512, 1024, 2048, 4096, 8192)


def allreduce_sizes(spec: Any, decode_batches=DECODE_BATCHES, prefill_tokens=PREFILL_TOKENS) -> list[int]:
    """Bytes of one layer's all-reduce in a decode step of each batch and a prefill step of
    each token count: rows x hidden x the serving dtype's bytes."""
    s = ModelDims.from_spec(spec).spec
    return sorted({int(n) * s.hidden_size * s.dtype_bytes for n in (*decode_batches, *prefill_tokens)})


def time_allreduce(sizes: Sequence[int], device: torch.device, reps: int = 20, group=None) -> list[dict]:
    """Seconds of one ``all_reduce`` of each message size (bytes of bf16; fp32 on a CPU,
    the same element count), on every rank of the current group together: the median of
    ``reps`` calls, each between a barrier and a CUDA-event pair (the host clock on a CPU)."""
    import numpy as np

    cuda = device.type == "cuda"
    out = []
    for nbytes in sizes:
        x = torch.ones(max(1, int(nbytes) // 2), dtype=torch.bfloat16 if cuda else torch.float32, device=device)
        for _ in range(3):
            dist.all_reduce(x, group=group)
        times = []
        for _ in range(reps):
            dist.barrier(group=group)
            if cuda:
                torch.cuda.synchronize(device)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dist.all_reduce(x, group=group)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                import time

                t = time.perf_counter()
                dist.all_reduce(x, group=group)
                times.append(time.perf_counter() - t)
        out.append({"bytes": int(nbytes), "seconds": float(np.median(times))})
    return out


def _sweep_rank(rank: int, tp: int, addr: str, sizes: list[int], reps: int, device_type: str, out: str) -> None:
    dev = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    init_tp(rank, tp, addr, dev)
    try:
        rows = time_allreduce(sizes, dev, reps)
        if rank == 0:
            import json

            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        destroy_group(dev)


def allreduce_sweep(tp: int, sizes: Sequence[int], reps: int = 20, device_type: str | None = None) -> list[dict]:
    """`time_allreduce` over ``tp`` spawned ranks (one a GPU; gloo processes on a CPU)."""
    import json
    import tempfile

    import torch.multiprocessing as mp

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and torch.cuda.device_count() < tp:
        raise RuntimeError(f"all-reduce sweep over {tp} GPUs: {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "allreduce.json")
        mp.spawn(_sweep_rank, args=(tp, free_tcp_address(), list(sizes), reps, device_type, out), nprocs=tp)
        with open(out) as f:
            return json.load(f)
