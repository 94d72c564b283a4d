"""CUDA-graph runner for generation-only iterations, with batch padding.

The engine decides (through `policies.graph_padding.GraphPadding`) that a generation-only
iteration of ``n`` requests runs as the graph captured for the smallest size ``P >= n``.
This runner owns, per replica, one set of *static* input buffers sized for the largest
captured batch ``Bmax``::

    input_ids    [Bmax]             int64
    positions    [Bmax]             int64
    slot_mapping [Bmax]             int64   (-1: padding row, nothing written)
    block_tables [Bmax, max_blocks] int32
    seq_lens     [Bmax]             int32   (= position + 1; padding rows: 1)

and one graph per padded size ``P`` capturing ``model.forward_decode`` on the first ``P``
rows of those buffers, writing its fp32 logits into a shared static ``[Bmax, vocab]``
buffer (so captured graphs do not each keep their own logits alive: the temporaries of
every capture go back to one shared graph memory pool, largest size captured first).

``run(input_ids, positions, block_tables, seq_lens, slot_mapping)`` with ``n`` real rows
copies them into rows ``0..n-1`` of the static buffers, turns rows ``n..P-1`` into padding
rows (token 0 at position 0, ``slot_mapping = -1`` so nothing is written to the KV cache,
``seq_len = 1`` over block 0 so attention reads one valid row), replays graph ``P`` and
returns logits ``[n, vocab]`` (a view of the static buffer: valid until the next run).

Without CUDA (or with ``use_graphs=False``) nothing is captured: ``run`` applies the very
same padding and calls ``forward_decode`` eagerly at the padded size, so the padding logic
is exercised on a CPU too. ``captured`` says which mode is in use.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from servesim.policies.graph_padding import GraphPadding

from .kv_pool import KVPool
from .model import LlamaModel


class GraphRunner:
    def __init__(self, model: LlamaModel, kv_pool: KVPool, sizes: Sequence[int], max_blocks: int,
                 use_graphs: bool | None = None):
        if not sizes:
            raise ValueError("GraphRunner: no batch sizes to capture")
        self.model = model
        self.kv_pool = kv_pool
        self.sizes = sorted({int(s) for s in sizes})
        self.padding = GraphPadding(self.sizes)  # the engine's rule: smallest captured size >= n
        if self.sizes[0] <= 0:
            raise ValueError(f"GraphRunner: batch sizes must be positive, got {self.sizes}")
        self.max_batch = self.sizes[-1]
        self.max_blocks = int(max_blocks)
        if self.max_blocks <= 0:
            raise ValueError("GraphRunner: max_blocks must be positive")
        self.device = model.device
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else bool(use_graphs)
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("GraphRunner: CUDA graphs need a CUDA device")
        dev, B = self.device, self.max_batch
        self.input_ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((B,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(B, self.max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.logits: torch.Tensor | None = None  # [Bmax, vocab] fp32, allocated at capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.captured = False
        self.replays = 0  # runs that replayed a captured graph
        self.eager_runs = 0  # runs that fell back to eager forward_decode

    # ------------------------------------------------------------------ sizes
    def padded_size(self, n: int) -> int:
        """The captured size that runs a batch of ``n`` (ValueError if none)."""
        p = self.padding.padded(n)
        if p == 0:
            raise ValueError(f"GraphRunner: batch of {n} exceeds the largest captured size {self.max_batch}")
        return p

    # ------------------------------------------------------------------ capture
    def _set_padding(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        self.input_ids[lo:hi].zero_()
        self.positions[lo:hi].zero_()
        self.slot_mapping[lo:hi].fill_(-1)
        self.seq_lens[lo:hi].fill_(1)
        self.block_tables[lo:hi].zero_()

    def _forward(self, p: int) -> torch.Tensor:
        return self.model.forward_decode(self.input_ids[:p], self.positions[:p], self.block_tables[:p],
                                         self.seq_lens[:p], self.slot_mapping[:p], self.kv_pool)

    def capture(self) -> bool:
        """Capture one graph per size (CUDA only; a no-op otherwise). Returns ``captured``.

        Every static row is a padding row during capture and warm-up, so nothing is
        written to the KV cache. A failure to capture is reported on stderr and leaves
        the runner in eager mode (the run then measures eager decode steps)."""
        if not self.use_graphs or self.captured:
            return self.captured
        self._set_padding(0, self.max_batch)
        vocab = self.model.dims.vocab_size
        self.logits = torch.zeros(self.max_batch, vocab, dtype=torch.float32, device=self.device)
        try:
            # warm-up on a side stream (Triton compilation, cuBLAS handles), as torch advises
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for p in reversed(self.sizes):
                    self._forward(p)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            pool = torch.cuda.graph_pool_handle()
            for p in reversed(self.sizes):  # largest first: smaller ones reuse its memory
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = self._forward(p)
                    self.logits[:p].copy_(out)
                    del out
                self.graphs[p] = g
            torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - report and run eagerly rather than crash a long run
            print(f"servesim gpu backend: CUDA-graph capture failed ({type(e).__name__}: {e}); "
                  "generation-only iterations run eagerly at their padded size", file=sys.stderr)
            self.graphs.clear()
            self.use_graphs = False
            self.captured = False
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001 - the capture error above is the one to report
                pass
            return False
        self.captured = True
        return True

    # ------------------------------------------------------------------ run
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab]`` of a generation-only batch of ``n = len(input_ids)`` rows
        (tensors on the model's device; ``block_tables [n, w]`` with ``w <= max_blocks``)."""
        n = int(input_ids.shape[0])
        p = self.padded_size(n)
        w = int(block_tables.shape[1])
        if w > self.max_blocks:
            raise ValueError(f"GraphRunner: a request holds {w} blocks, more than the {self.max_blocks} "
                             "the static block table was sized for")
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        # columns beyond w keep stale (valid) block ids; a row never reads past its seq_len
        self.block_tables[:n, :w].copy_(block_tables, non_blocking=True)
        self._set_padding(n, p)
        if self.captured:
            self.graphs[p].replay()
            self.replays += 1
            return self.logits[:n]
        self.eager_runs += 1
        return self._forward(p)[:n]
