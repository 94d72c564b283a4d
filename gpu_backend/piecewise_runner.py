"""Piecewise CUDA graphs for iterations with context chunks (vLLM-V1 style), with token padding.

The engine decides (``IterationShape.piecewise_tokens``, from the `GraphPadding` of
``runtime.piecewise_graphs``) that an iteration of ``T`` packed tokens with at least one
context chunk runs at the padded token count ``P >= T``. Attention depends on the
iteration's sequences (their number, chunk lengths and KV lengths), so it cannot be
captured once per ``P``; everything else in a layer is token-wise and can. Per padded size
``P`` this runner captures ``L + 1`` graph *pieces* (``L`` layers)::

    piece 0       embedding -> layer 0 pre-attention
    piece l       layer l-1 post-attention -> layer l pre-attention     (0 < l < L)
    piece L       layer L-1 post-attention

(pre-attention = fused residual add + rmsnorm, qkv GEMM, rotary + KV-cache write;
post-attention = o GEMM, fused residual add + rmsnorm, gate_up GEMM, silu_mul, down GEMM:
`LlamaModel._pre_attention` / `_post_attention`, the very functions of the eager forward)
and between pieces ``l`` and ``l + 1`` runs layer ``l``'s attention eagerly on the real
rows only (`LlamaModel._attention`: paged prefill attention on the context rows, paged
decode attention on the decode rows). Per layer the host then launches one replay, the
attention (one prefill kernel; two decode kernels beside decodes) and the copy of its
output into a static buffer: 3-5 launches instead of the eager forward's ~12-14.

The pieces communicate through *static* buffers sized for the largest size ``Pmax``::

    input_ids    [Pmax]          int64
    positions    [Pmax]          int64
    slot_mapping [Pmax]          int64   (-1: padding row, nothing written to the KV cache)
    q            [Pmax, Hq, D]   a piece's last pre-attention output (rotated queries)
    attn         [Pmax, Hq, D]   the eager attention's output (rows 0..T-1 written)
    residual     [Pmax, H]       the residual stream after a piece
    hidden       [Pmax, H]       the last layer's output (written by piece L)

Each piece reads its inputs from and copies its results into these buffers, so the
temporaries inside a piece die with it: every capture draws them from one shared graph
memory pool, largest size captured first so the smaller ones reuse its memory.

``run(input_ids, positions, attn_meta, padded)`` copies the ``T`` real rows into rows
``0..T-1`` of the static buffers, makes rows ``T..P-1`` padding rows (token 0, position 0,
``slot_mapping = -1``), runs the pieces with the attention between them, then gathers the
sampled rows (``attn_meta.sample_indices``) from ``hidden`` / ``residual`` and computes the
fp32 logits eagerly (`LlamaModel._logits`): the logits of `LlamaModel.forward` on the same
inputs, up to the rounding of GEMMs of another row count.

Without CUDA (or with ``use_graphs=False``) nothing is captured: ``run`` calls the very same
pieces eagerly at the padded size, so the padding logic is exercised on a CPU too.
``captured`` says which mode is in use; ``replays`` / ``eager_runs`` count the runs of each.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

from servesim.policies.graph_padding import GraphPadding

from .kv_pool import KVPool
from .model import AttnMetadata, LlamaModel
from .weights import ModelDims


def static_buffer_bytes(dims: ModelDims, max_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of the runner's static buffers for ``max_tokens`` rows (the graphs' memory
    pool, one piece's temporaries at ``max_tokens`` rows, comes on top)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return int(max_tokens) * (3 * 8 + (2 * dims.q_size + 2 * dims.hidden_size) * elem)


class PiecewiseRunner:
    """Piecewise graphs of ``model`` over ``kv_pool`` for the padded token counts ``sizes``
    (see the module docstring). ``use_graphs``: capture CUDA graphs (default: on a CUDA
    device); without, the same pieces run eagerly."""

    def __init__(self, model: LlamaModel, kv_pool: KVPool, sizes: Sequence[int], use_graphs: bool | None = None):
        if not sizes:
            raise ValueError("PiecewiseRunner: no token counts to capture")
        model._check_pool(kv_pool)
        self.model = model
        self.kv_pool = kv_pool
        self.sizes = sorted({int(s) for s in sizes})
        self.padding = GraphPadding(self.sizes)  # the engine's rule: smallest captured size >= n
        if self.sizes[0] <= 0:
            raise ValueError(f"PiecewiseRunner: token counts must be positive, got {self.sizes}")
        self.max_tokens = P = self.sizes[-1]
        self.num_pieces = model.dims.num_layers + 1
        self.device = dev = model.device
        self.use_graphs = (dev.type == "cuda") if use_graphs is None else bool(use_graphs)
        if self.use_graphs and dev.type != "cuda":
            raise ValueError("PiecewiseRunner: CUDA graphs need a CUDA device")
        d, dt = model.dims, model.dtype
        self.input_ids = torch.zeros(P, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(P, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((P,), -1, dtype=torch.int64, device=dev)
        self.q = torch.zeros(P, d.num_heads, d.head_dim, dtype=dt, device=dev)
        self.attn = torch.zeros(P, d.num_heads, d.head_dim, dtype=dt, device=dev)
        self.residual = torch.zeros(P, d.hidden_size, dtype=dt, device=dev)
        self.hidden = torch.zeros(P, d.hidden_size, dtype=dt, device=dev)
        self.static_bytes = static_buffer_bytes(d, P, dt)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # P -> its L + 1 pieces
        self.captured = False
        self.capture_s = 0.0  # wall time of capture(): warm-up of every size and the captures
        self.replays = 0  # runs that replayed captured pieces
        self.eager_runs = 0  # runs that called the pieces eagerly

    # ------------------------------------------------------------------ sizes
    def padded_size(self, n: int) -> int:
        """The captured token count that runs an iteration of ``n`` tokens (ValueError if none)."""
        p = self.padding.padded(n)
        if p == 0:
            raise ValueError(f"PiecewiseRunner: {n} tokens exceed the largest captured size {self.max_tokens}")
        return p

    # ------------------------------------------------------------------ the pieces
    def _set_padding(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        self.input_ids[lo:hi].zero_()
        self.positions[lo:hi].zero_()
        self.slot_mapping[lo:hi].fill_(-1)

    def _piece(self, i: int, p: int) -> None:
        """Piece ``i`` (see the module docstring) on the first ``p`` rows of the static buffers."""
        m = self.model
        if i == 0:
            h, residual = m._embed(self.input_ids[:p]), None
        else:
            h, residual = m._post_attention(i - 1, self.attn[:p], self.residual[:p])
        if i < self.num_pieces - 1:
            q, residual = m._pre_attention(i, h, residual, self.positions[:p], self.slot_mapping[:p], self.kv_pool)
            self.q[:p].copy_(q)
        else:
            self.hidden[:p].copy_(h)
        self.residual[:p].copy_(residual)

    # ------------------------------------------------------------------ capture
    def capture(self) -> bool:
        """Capture the ``L + 1`` pieces of every size (CUDA only; a no-op otherwise).
        Returns ``captured``.

        Every size is first run eagerly on a side stream (Triton compilation, cuBLAS
        handles and workspaces), as torch advises. Every static row is a padding row
        during warm-up and capture, so nothing is written to the KV cache. A failure to
        capture is reported on stderr and leaves the runner in eager mode (iterations then
        run the same pieces eagerly at their padded size)."""
        if not self.use_graphs or self.captured:
            return self.captured
        t0 = time.perf_counter()
        self._set_padding(0, self.max_tokens)
        dev = self.device
        try:
            with torch.no_grad():
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    for p in reversed(self.sizes):
                        for i in range(self.num_pieces):
                            self._piece(i, p)
                torch.cuda.current_stream(dev).wait_stream(side)
                torch.cuda.synchronize(dev)
                pool = torch.cuda.graph_pool_handle()
                for p in reversed(self.sizes):  # largest first: smaller ones reuse its memory
                    pieces = []
                    for i in range(self.num_pieces):
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=pool):
                            self._piece(i, p)
                        pieces.append(g)
                    self.graphs[p] = pieces
                torch.cuda.synchronize(dev)
        except Exception as e:  # noqa: BLE001 - report and run eagerly rather than crash a long run
            print(f"servesim gpu backend: piecewise CUDA-graph capture failed ({type(e).__name__}: {e}); "
                  "iterations with context chunks run their pieces eagerly at their padded size", file=sys.stderr)
            self.graphs.clear()
            self.use_graphs = False
            self.captured = False
            try:
                torch.cuda.synchronize(dev)
            except Exception:  # noqa: BLE001 - the capture error above is the one to report
                pass
            self.capture_s = time.perf_counter() - t0
            return False
        self.captured = True
        self.capture_s = time.perf_counter() - t0
        return True

    # ------------------------------------------------------------------ run
    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: AttnMetadata,
            padded: int | None = None) -> torch.Tensor:
        """fp32 logits ``[S, vocab]`` of one packed iteration (the inputs of
        `LlamaModel.forward`: ``input_ids``, ``positions`` ``[T]`` on the model's device and
        its `AttnMetadata`, whose ``slot_mapping`` and ``sample_indices`` are used), run at
        ``padded`` tokens (a captured size >= T; default ``padded_size(T)``)."""
        m = attn_meta
        T = m.num_tokens
        if input_ids.shape[0] != T or positions.shape[0] != T or m.slot_mapping.shape[0] != T:
            raise ValueError(f"PiecewiseRunner: {input_ids.shape[0]} input ids / {positions.shape[0]} positions / "
                             f"{m.slot_mapping.shape[0]} slots for an iteration of {T} tokens")
        if T == 0:
            raise ValueError("PiecewiseRunner: empty iteration")
        if m.max_seq_len > self.model.max_positions:
            raise ValueError(f"PiecewiseRunner: a sequence reaches {m.max_seq_len} tokens, beyond the rope table's "
                             f"{self.model.max_positions} positions")
        p = self.padded_size(T) if padded is None else int(padded)
        if p not in self.sizes or p < T:
            raise ValueError(f"PiecewiseRunner: cannot run {T} tokens at {p} (captured sizes: {self.sizes})")
        self.input_ids[:T].copy_(input_ids, non_blocking=True)
        self.positions[:T].copy_(positions, non_blocking=True)
        self.slot_mapping[:T].copy_(m.slot_mapping, non_blocking=True)
        self._set_padding(T, p)
        pieces = self.graphs[p] if self.captured else None
        model, q, attn = self.model, self.q[:T], self.attn[:T]
        for i in range(self.num_pieces):
            if pieces is not None:
                pieces[i].replay()
            else:
                self._piece(i, p)
            if i < self.num_pieces - 1:
                model._attention(i, q, self.kv_pool, m, out=attn)
        if pieces is not None:
            self.replays += 1
        else:
            self.eager_runs += 1
        idx = m.sample_indices
        return model._logits(self.hidden[idx], self.residual[idx])
