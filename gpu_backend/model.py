"""Llama-family model over a paged KV cache: one packed forward per engine iteration.

Packed layout of one iteration (no padding): the new tokens of every context chunk, chunk
after chunk, then one token per decoding sequence::

    tokens  | chunk 0 (q_0 tokens) | chunk 1 | ... | chunk N-1 | dec 0 | dec 1 | ... | dec B-1 |
            |<------------- num_context_tokens = Tc ------------>|<-------- B ---------->|

A context chunk's tokens sit at positions ``start .. start + q - 1`` where ``start`` is the
number of that request's tokens already in the cache (earlier chunks or reused prefix). A
decode token sits at ``position`` (= the request's KV length before this step). Every new
token's key/value is written to slot ``blocks[p // bs] * bs + p % bs`` of the KV pool.

Logits are computed only at the sampling positions, in this order: the last token of each
chunk that samples (chunk order), then every decode token.

One layer = fused rmsnorm -> qkv GEMM -> rope_kv_write (all three one kernel where the tuning
table picked `ops.rms_norm_qkv_rope`'s fused GEMM for the shape) -> paged prefill attention (context
part) and paged decode attention (decode part) -> o GEMM -> fused residual add + rmsnorm ->
gate_up GEMM -> silu_mul -> down GEMM. GEMMs are ``F.linear`` -- or, at the decode shapes where
the tuning table chose it (``kernels/gemv.py``), the small-M Triton GEMM with the rmsnorm or the
silu_mul before it fused into its prologue (`ops.rms_norm_linear`, `ops.silu_mul_linear`) -- (with fp8 weights,
``model_precision: fp8``: the input quantised per token and ``torch._scaled_mm``,
`weights.fp8_linear`; lm_head stays in the model's dtype); the rest are
`servesim.kernels.ops` (Triton on a GPU, their torch references on a CPU). With
``kv_cache.dtype: fp8`` the pool is e4m3 (`kv_cache_dtype`) and every KV write and
attention read passes the pool's per-layer key / value scales. A layer is
three parts: ``_pre_attention`` (token-wise, up to and including the KV-cache write),
``_attention`` (per sequence) and ``_post_attention`` (token-wise); the eager forward
runs them in turn, `piecewise_runner.PiecewiseRunner` captures the token-wise parts in
CUDA graphs and runs only the attention eagerly between them.

`LlamaModel.forward_decode` is the decode-only path with static-shape inputs only (no host
syncs, no data-dependent shapes) for CUDA-graph capture.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from servesim.kernels import ops

from .kv_pool import KVPool
from .rope import build_cos_sin_cache
from .weights import (Fp8Weight, LlamaWeights, ModelDims, fp8_linear, load_config, load_safetensors_weights,
                      quantize_weights_fp8, random_weights)

# --------------------------------------------------------------------------------------
# per-iteration inputs and attention metadata
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContextChunkInput:
    """New tokens of one request's context phase computed this iteration."""

    token_ids: Sequence[int]  # the new tokens (q_len >= 1)
    start_pos: int  # tokens of this request already in the KV cache
    block_ids: Sequence[int]  # the request's blocks, covering start_pos + q_len tokens
    sample: bool = True  # sample a token after the chunk's last token


@dataclass(frozen=True, slots=True)
class DecodeInput:
    """One decoding request: its last token, that token's position, its blocks."""

    token_id: int
    position: int  # = KV length before this step; the token's K/V is written there
    block_ids: Sequence[int]  # covering position + 1 tokens


@dataclass(slots=True)
class AttnMetadata:
    """Device tensors describing one packed iteration (see the module docstring).

    ``T = num_context_tokens + num_decode``; N context chunks, B decodes, S sampled rows.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot of each new token
    sample_indices: torch.Tensor  # [S] int64, rows of the packed tokens that produce logits
    ctx_block_tables: torch.Tensor  # [N, max_blocks] int32 (padded with block 0)
    ctx_cu_q_lens: torch.Tensor  # [N+1] int32, chunk n owns rows cu[n]:cu[n+1]
    ctx_seq_lens: torch.Tensor  # [N] int32, start_pos + q_len (KV incl. the new tokens)
    dec_block_tables: torch.Tensor  # [B, max_blocks] int32
    dec_seq_lens: torch.Tensor  # [B] int32, position + 1
    num_context_tokens: int  # Tc
    num_context_chunks: int  # N
    num_decode: int  # B
    sampling_chunks: tuple[int, ...]  # indices of the chunks that sample (logit rows 0..)
    max_seq_len: int  # the longest KV length in the batch (host int, for kernels' tuning)

    @property
    def num_tokens(self) -> int:
        return self.num_context_tokens + self.num_decode

    @property
    def num_sampling(self) -> int:
        return len(self.sampling_chunks) + self.num_decode


def _as_chunk(c: Any) -> ContextChunkInput:
    if isinstance(c, ContextChunkInput):
        return c
    if isinstance(c, dict):
        return ContextChunkInput(**c)
    return ContextChunkInput(*c)


def _as_decode(d: Any) -> DecodeInput:
    if isinstance(d, DecodeInput):
        return d
    if isinstance(d, dict):
        return DecodeInput(**d)
    return DecodeInput(*d)


def build_attn_metadata(context_chunks: Sequence[ContextChunkInput | tuple],
                        decode_seqs: Sequence[DecodeInput | tuple], block_size: int,
                        device: torch.device | str = "cpu", max_blocks: int | None = None) -> AttnMetadata:
    """Pack one iteration from plain Python lists.

    ``context_chunks``: ``ContextChunkInput`` or tuples ``(token_ids, start_pos, block_ids,
    sample)``; ``decode_seqs``: ``DecodeInput`` or tuples ``(token_id, position, block_ids)``.
    ``max_blocks`` pads the block tables to a fixed width (default: the longest list).

    Work is per request in Python and per token in torch; everything is built on the host
    and moved to ``device`` in two copies.
    """
    chunks = [_as_chunk(c) for c in context_chunks]
    decs = [_as_decode(d) for d in decode_seqs]
    n_ctx, n_dec = len(chunks), len(decs)
    n_req = n_ctx + n_dec
    if n_req == 0:
        raise ValueError("build_attn_metadata: empty iteration (no context chunk and no decode)")
    device = torch.device(device)

    q_lens = [len(c.token_ids) for c in chunks] + [1] * n_dec
    starts = [int(c.start_pos) for c in chunks] + [int(d.position) for d in decs]
    tables = [c.block_ids for c in chunks] + [d.block_ids for d in decs]
    n_blocks = [len(t) for t in tables]
    for r in range(n_req):
        kind, idx = ("context chunk", r) if r < n_ctx else ("decode seq", r - n_ctx)
        if q_lens[r] <= 0:
            raise ValueError(f"build_attn_metadata: {kind} {idx} has no tokens")
        if starts[r] < 0:
            raise ValueError(f"build_attn_metadata: {kind} {idx} has a negative start position {starts[r]}")
        need = starts[r] + q_lens[r]
        if n_blocks[r] * block_size < need:
            raise ValueError(f"build_attn_metadata: {kind} {idx} needs {-(-need // block_size)} blocks for "
                             f"{need} tokens (block size {block_size}) but has {n_blocks[r]}")
    width = max(n_blocks)
    if max_blocks is not None:
        if max_blocks < width:
            raise ValueError(f"build_attn_metadata: max_blocks={max_blocks} < {width} blocks of a request")
        width = max_blocks

    # -- block tables [R, width] (numpy on the host: cheaper than torch for small arrays)
    nb = np.asarray(n_blocks, dtype=np.int64)
    n_flat = int(nb.sum())
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int32, count=n_flat)
    rows = np.repeat(np.arange(n_req), nb)
    cols = np.arange(n_flat) - np.repeat(np.cumsum(nb) - nb, nb)
    bt = np.zeros((n_req, width), dtype=np.int32)
    bt[rows, cols] = flat

    # -- per-token positions and slots --------------------------------------------------
    ql = np.asarray(q_lens, dtype=np.int64)
    st = np.asarray(starts, dtype=np.int64)
    cu = np.zeros(n_req + 1, dtype=np.int64)
    np.cumsum(ql, out=cu[1:])
    n_tok = int(cu[-1])
    n_ctx_tok = int(cu[n_ctx])
    tok_row = np.repeat(np.arange(n_req), ql)
    positions = st[tok_row] + np.arange(n_tok) - cu[:-1][tok_row]
    slots = bt[tok_row, positions // block_size].astype(np.int64) * block_size + positions % block_size
    input_ids = np.empty(n_tok, dtype=np.int64)
    input_ids[:n_ctx_tok] = np.fromiter(chain.from_iterable(c.token_ids for c in chunks), dtype=np.int64,
                                        count=n_ctx_tok)
    input_ids[n_ctx_tok:] = [int(d.token_id) for d in decs]
    sampling_chunks = tuple(i for i, c in enumerate(chunks) if c.sample)
    sample_idx = np.concatenate([cu[1:n_ctx + 1][list(sampling_chunks)] - 1,
                                 np.arange(n_ctx_tok, n_tok, dtype=np.int64)])
    seq_lens = (st + ql).astype(np.int32)
    max_seq_len = int(seq_lens.max())
    n_sample = sample_idx.shape[0]

    # -- two host->device copies ----------------------------------------------------------
    pin = device.type == "cuda"
    i64 = torch.from_numpy(np.concatenate([input_ids, positions, slots, sample_idx]))
    i32 = torch.from_numpy(np.concatenate([bt.ravel(), seq_lens, cu[: n_ctx + 1].astype(np.int32)]))
    if device.type != "cpu":
        if pin:
            i64, i32 = i64.pin_memory(), i32.pin_memory()
        i64 = i64.to(device, non_blocking=pin)
        i32 = i32.to(device, non_blocking=pin)
    input_ids, positions, slots, sample_idx = i64.split([n_tok, n_tok, n_tok, n_sample])
    bt_d, seq_d, cu_d = i32.split([n_req * width, n_req, n_ctx + 1])
    bt_d = bt_d.view(n_req, width)
    return AttnMetadata(
        input_ids=input_ids, positions=positions, slot_mapping=slots, sample_indices=sample_idx,
        ctx_block_tables=bt_d[:n_ctx], ctx_cu_q_lens=cu_d, ctx_seq_lens=seq_d[:n_ctx],
        dec_block_tables=bt_d[n_ctx:], dec_seq_lens=seq_d[n_ctx:],
        num_context_tokens=n_ctx_tok, num_context_chunks=n_ctx, num_decode=n_dec,
        sampling_chunks=sampling_chunks, max_seq_len=max_seq_len,
    )


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------


class LlamaModel:
    """A Llama-family decoder (LlamaForCausalLM semantics) over a `KVPool`.

    ``spec``: an HF config dict (or an object with those attribute names, or `ModelDims`).
    ``weights``: `LlamaWeights`, a checkpoint path (safetensors, HF naming), or None for
    random weights drawn with ``seed``.
    """

    def __init__(self, spec: Any, weights: LlamaWeights | str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cuda", *,
                 impl: str = "auto", max_positions: int | None = None, seed: int = 0):
        self.dims = dims = ModelDims.from_spec(spec)
        self.dtype = dtype
        self.device = torch.device(device)
        self.impl = impl
        if weights is None:
            weights = random_weights(dims, seed=seed, dtype=dtype, device=self.device)
        elif isinstance(weights, (str, os.PathLike)):
            weights = load_safetensors_weights(dims, weights, dtype=dtype, device=self.device)
        else:
            weights = weights.to(dtype=dtype, device=self.device)
        weights.check(dims)
        if dims.quant.weights == "fp8":  # the four linears of every layer (per-tensor or per-channel scales)
            weights = quantize_weights_fp8(weights, per_channel=dims.quant.scales == "channel")
        self.weights = weights
        self.max_positions = int(max_positions or dims.max_position_embeddings)
        self.cos_sin = build_cos_sin_cache(dims.head_dim, self.max_positions, dims.rope_theta,
                                           dims.rope_scaling, device=self.device)
        self.scale = dims.head_dim ** -0.5
        self._split = [dims.q_size, dims.kv_size, dims.kv_size]
        self.kv_pool: KVPool | None = None

    # ---- construction helpers ------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                        device: torch.device | str = "cuda", **kw: Any) -> LlamaModel:
        """Config and weights from an HF checkpoint directory (safetensors)."""
        return cls(load_config(path), path, dtype=dtype, device=device, **kw)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's element type: e4m3 for ``kv_cache.dtype: fp8``, else the model's dtype."""
        return torch.float8_e4m3fn if self.dims.kv_dtype == "fp8" else self.dtype

    def make_kv_pool(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None, *,
                     k_scales: Sequence[float] | None = None, v_scales: Sequence[float] | None = None) -> KVPool:
        """A pool shaped for this model (in `kv_cache_dtype` unless ``dtype`` is given; an fp8
        one with ``k_scales`` / ``v_scales``, default 1.0); also attached as ``self.kv_pool``."""
        d = self.dims
        self.kv_pool = KVPool(d.num_layers, num_blocks, block_size, d.num_kv_heads, d.head_dim,
                              dtype or self.kv_cache_dtype, self.device, k_scales=k_scales, v_scales=v_scales)
        return self.kv_pool

    @torch.no_grad()
    def calibrate_kv_scales(self, prompts: Sequence[Sequence[int]], block_size: int = 16,
                            headroom: float = 2.0) -> tuple[list[float], list[float]]:
        """Per-layer fp8 KV scales ``(k_scales, v_scales)`` for an fp8 `KVPool`: the prompts
        are prefilled into a temporary pool of the model's dtype (post-RoPE keys and the
        values, as the cache holds them) and its `KVPool.observed_scales` returned."""
        if not prompts or not all(len(p) > 0 for p in prompts):
            raise ValueError("calibrate_kv_scales: needs at least one non-empty prompt")
        d = self.dims
        per = [-(-len(p) // block_size) for p in prompts]
        pool = KVPool(d.num_layers, sum(per), block_size, d.num_kv_heads, d.head_dim, self.dtype, self.device)
        starts = [sum(per[:i]) for i in range(len(per))]
        self.step([(list(p), 0, list(range(s0, s0 + n)), True) for p, s0, n in zip(prompts, starts, per)], [], pool)
        scales = pool.observed_scales(headroom=headroom)
        del pool
        return scales

    def attach_kv_pool(self, kv_pool: KVPool) -> None:
        self._check_pool(kv_pool)
        self.kv_pool = kv_pool

    def _check_pool(self, kv_pool: KVPool) -> None:
        d = self.dims
        if (kv_pool.num_layers, kv_pool.num_kv_heads, kv_pool.head_dim) != (d.num_layers, d.num_kv_heads, d.head_dim):
            raise ValueError(f"KV pool ({kv_pool.num_layers} layers, {kv_pool.num_kv_heads} kv heads, head_dim "
                             f"{kv_pool.head_dim}) does not fit the model ({d.num_layers}, {d.num_kv_heads}, "
                             f"{d.head_dim})")

    # ---- forward passes ----------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_pool: KVPool,
                attn_meta: AttnMetadata) -> torch.Tensor:
        """One packed iteration; returns fp32 logits ``[num_sampling, vocab]``."""
        self._check_pool(kv_pool)
        m = attn_meta
        n_tok = m.num_tokens
        if input_ids.shape[0] != n_tok or positions.shape[0] != n_tok:
            raise ValueError(f"forward: {input_ids.shape[0]} input ids / {positions.shape[0]} positions "
                             f"for an iteration of {n_tok} tokens")
        if m.max_seq_len > self.max_positions:
            raise ValueError(f"forward: a sequence reaches {m.max_seq_len} tokens, beyond the rope table's "
                             f"{self.max_positions} positions (max_position_embeddings / max_positions)")
        h, residual = self._run_layers(input_ids, positions, m.slot_mapping, kv_pool,
                                       lambda layer, q: self._attention(layer, q, kv_pool, m))
        idx = m.sample_indices
        return self._logits(h[idx], residual[idx])

    @torch.no_grad()
    def forward_decode(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, slot_mapping: torch.Tensor,
                       kv_pool: KVPool | None = None) -> torch.Tensor:
        """Decode-only iteration over static-shape inputs (CUDA-graph capturable).

        ``input_ids, positions, slot_mapping [B]`` int64, ``block_tables [B, max_blocks]``
        int32, ``seq_lens [B]`` int32 (= position + 1). Padding rows: ``slot_mapping = -1``
        (nothing written) and ``seq_lens >= 1`` with any valid block id. ``kv_pool``
        defaults to the attached pool. Returns fp32 logits ``[B, vocab]``.
        """
        pool = kv_pool if kv_pool is not None else self.kv_pool
        if pool is None:
            raise ValueError("forward_decode: no KV pool (pass kv_pool or call attach_kv_pool)")
        impl = self.impl

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
            return ops.paged_decode_attention(q, pool.k_caches[layer], pool.v_caches[layer], block_tables,
                                              seq_lens, self.scale, impl=impl, k_scale=pool.k_scales[layer],
                                              v_scale=pool.v_scales[layer])

        h, residual = self._run_layers(input_ids, positions, slot_mapping, pool, attend)
        return self._logits(h, residual)

    # ---- the parts of a forward pass (shared by the eager paths and the piecewise runner) -
    def _run_layers(self, input_ids, positions, slot_mapping, kv_pool, attend):
        """Embedding and every layer; ``attend(layer, q)`` is the attention of a layer.
        Returns the last layer's output and the residual stream (before the final norm)."""
        h, residual = self._embed(input_ids), None
        for layer in range(self.dims.num_layers):
            q, residual = self._pre_attention(layer, h, residual, positions, slot_mapping, kv_pool)
            h, residual = self._post_attention(layer, attend(layer, q), residual)
        return h, residual

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weights.embed)

    def _pre_attention(self, layer: int, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                       slot_mapping: torch.Tensor, kv_pool: KVPool) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer up to its attention, token-wise: fused residual add + rmsnorm, qkv GEMM,
        rotary on q and k and the write of k and v to the KV cache at ``slot_mapping``
        (-1: not written). ``residual`` is None for the first layer (``h`` is the embedding).
        Returns ``(q [T, Hq, D], residual [T, H])``."""
        d, lw, impl = self.dims, self.weights.layers[layer], self.impl
        n_tok = h.shape[0]
        if not isinstance(lw.qkv, Fp8Weight):
            # one kernel where the tuning table picked the fused GEMM for the shape (else the
            # unfused path below, inside the op)
            return ops.rms_norm_qkv_rope(
                h, lw.input_norm, d.rms_norm_eps, lw.qkv, residual, positions, self.cos_sin,
                kv_pool.k_caches[layer], kv_pool.v_caches[layer], slot_mapping, d.num_heads, d.num_kv_heads,
                impl=impl, k_scale=kv_pool.k_scales[layer], v_scale=kv_pool.v_scales[layer])
        qkv, residual = self._norm_linear(h, lw.input_norm, lw.qkv, residual)
        q, k, v = qkv.split(self._split, dim=-1)
        q, _ = ops.rope_kv_write(
            q.view(n_tok, d.num_heads, d.head_dim), k.view(n_tok, d.num_kv_heads, d.head_dim),
            v.view(n_tok, d.num_kv_heads, d.head_dim), positions, self.cos_sin,
            kv_pool.k_caches[layer], kv_pool.v_caches[layer], slot_mapping, impl=impl,
            k_scale=kv_pool.k_scales[layer], v_scale=kv_pool.v_scales[layer])
        return q, residual

    def _post_attention(self, layer: int, attn: torch.Tensor,
                        residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer after its attention (``attn [T, Hq, D]``), token-wise: o GEMM, fused
        residual add + rmsnorm, gate_up GEMM, silu_mul, down GEMM. Returns ``(h, residual)``."""
        d, lw, impl = self.dims, self.weights.layers[layer], self.impl
        h = self._linear(attn.reshape(attn.shape[0], d.q_size), lw.o)
        gate_up, residual = self._norm_linear(h, lw.post_norm, lw.gate_up, residual)
        if isinstance(lw.down, Fp8Weight):
            return self._linear(ops.silu_mul(gate_up, impl=impl), lw.down), residual
        return ops.silu_mul_linear(gate_up, lw.down, impl=impl), residual

    def _linear(self, x: torch.Tensor, w: torch.Tensor | Fp8Weight) -> torch.Tensor:
        """``x @ w.T``: the fp8 path for a quantised weight, else `ops.linear` (``F.linear``,
        or the small-M Triton GEMM where the tuning table chose it for the shape)."""
        if isinstance(w, Fp8Weight):
            return fp8_linear(x, w, impl=self.impl)
        return ops.linear(x, w, impl=self.impl)

    def _norm_linear(self, h: torch.Tensor, norm_w: torch.Tensor, w: torch.Tensor | Fp8Weight,
                     residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused residual add + rmsnorm, then ``@ w.T``: returns ``(y, residual)``; one kernel
        where the small-M Triton GEMM is chosen for the shape (`ops.rms_norm_linear`)."""
        eps = self.dims.rms_norm_eps
        if isinstance(w, Fp8Weight):
            x, residual = ops.rms_norm(h, norm_w, eps, residual, impl=self.impl)
            return self._linear(x, w), residual
        return ops.rms_norm_linear(h, norm_w, eps, w, residual, impl=self.impl)

    def _attention(self, layer: int, q: torch.Tensor, kv_pool: KVPool, m: AttnMetadata,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of one layer for a packed iteration: paged prefill attention on the
        ``m.num_context_tokens`` context rows of ``q``, paged decode attention on the
        ``m.num_decode`` rows after them. Returns ``[T, Hq, D]``, written into ``out``
        when given (a static buffer of the piecewise runner)."""
        kc, vc = kv_pool.k_caches[layer], kv_pool.v_caches[layer]
        sc = {"k_scale": kv_pool.k_scales[layer], "v_scale": kv_pool.v_scales[layer]}
        tc, impl = m.num_context_tokens, self.impl
        parts = []
        if tc:
            parts.append(ops.paged_prefill_attention(
                q[:tc], kc, vc, m.ctx_block_tables, m.ctx_cu_q_lens, m.ctx_seq_lens, self.scale, impl=impl, **sc))
        if m.num_decode:
            parts.append(ops.paged_decode_attention(
                q[tc:], kc, vc, m.dec_block_tables, m.dec_seq_lens, self.scale, impl=impl, **sc))
        if out is None:
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out.copy_(parts[0]) if len(parts) == 1 else torch.cat(parts, dim=0, out=out)

    def _logits(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        w = self.weights
        return self._norm_linear(h, w.final_norm, w.lm_head, residual)[0].float()

    __call__ = forward

    # ---- convenience ----------------------------------------------------------------------
    def step(self, context_chunks: Sequence[ContextChunkInput | tuple], decode_seqs: Sequence[DecodeInput | tuple],
             kv_pool: KVPool | None = None) -> torch.Tensor:
        """Build the metadata for one iteration and run it (logits in the documented order)."""
        pool = kv_pool if kv_pool is not None else self.kv_pool
        if pool is None:
            raise ValueError("step: no KV pool (pass kv_pool or call attach_kv_pool)")
        meta = build_attn_metadata(context_chunks, decode_seqs, pool.block_size, self.device)
        return self.forward(meta.input_ids, meta.positions, pool, meta)


# --------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------


ARGMAX_CHUNK = 256


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for ``[S, V]`` logits (the first maximum of a row), in two short
    reductions where V splits into ``ARGMAX_CHUNK``-wide chunks: each chunk's max (and its first
    index), then the first best chunk. One row's argmax over a 128K vocabulary is a single long
    reduction (28 us of a 1.2 ms Llama-3.2-1B decode step on an H200, gpu_bench section 14)."""
    S, V = logits.shape
    c = ARGMAX_CHUNK
    if V % c or V < 8 * c:
        return logits.argmax(dim=-1)
    best, idx = logits.view(S, V // c, c).max(dim=-1)
    j = best.argmax(dim=-1)
    return j * c + idx.gather(1, j[:, None]).squeeze(1)


def sample_tokens(logits: torch.Tensor, temperature: float | torch.Tensor = 0.0, top_p: float | torch.Tensor = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids ``[S]`` (int64) from ``logits [S, V]`` on the logits' device.

    ``temperature`` and ``top_p`` are scalars or per-row tensors ``[S]``; a row with
    temperature 0 is greedy (argmax). Sampling uses the exponential race
    (``argmax(p / E)``, ``E ~ Exp(1)`` from ``generator``), which draws from ``p`` exactly
    and needs no host sync, so it is deterministic given the generator's seed.
    """
    logits = logits.float()
    greedy = greedy_argmax(logits)
    if not isinstance(temperature, torch.Tensor) and float(temperature) <= 0.0:
        return greedy
    n, device = logits.shape[0], logits.device
    temp = torch.as_tensor(temperature, dtype=torch.float32, device=device).expand(n)
    probs = torch.softmax(logits / torch.where(temp > 0, temp, 1.0)[:, None], dim=-1)
    if isinstance(top_p, torch.Tensor) or float(top_p) < 1.0:
        p = torch.as_tensor(top_p, dtype=torch.float32, device=device).expand(n)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= p[:, None]
        drop_sorted[:, 0] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    sampled = (probs / race).argmax(dim=-1)
    return torch.where(temp > 0, sampled, greedy)


class Sampler:
    """Greedy / temperature / top-p sampling with its own seeded device generator."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    def __call__(self, logits: torch.Tensor, temperature: float | torch.Tensor = 0.0,
                 top_p: float | torch.Tensor = 1.0) -> torch.Tensor:
        return sample_tokens(logits, temperature, top_p, self.generator)
