"""Triton kernels vs their plain-torch references (and the references vs torch / HF).

Without a CUDA device the kernels run in Triton's CPU interpreter (fp32 and fp16; bf16 only
on a GPU). TRITON_INTERPRET must be set before a Triton kernel module is imported.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from servesim.kernels import _common, ops  # noqa: E402
from servesim.kernels.activation import silu_mul_triton  # noqa: E402
from servesim.kernels.decode_attention import (  # noqa: E402
    choose_num_splits,
    paged_decode_attention_triton,
)
from servesim.kernels.prefill_attention import paged_prefill_attention_triton  # noqa: E402
from servesim.kernels.reference import (  # noqa: E402
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    rms_norm_ref,
    rope_kv_write_ref,
    silu_mul_ref,
)
from servesim.kernels.rmsnorm import rms_norm_triton  # noqa: E402
from servesim.kernels.rope import rope_kv_write_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output / workspace the kernels allocate starts as NaN: all must be written."""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "NaN in output (element not written, or bad masking)"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.1g}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


# --------------------------------------------------------------------------- paged KV fixtures


def make_paged_kv(seq_lens, Hkv, D, block_size, dtype, g, extra_blocks=3):
    """Random K/V for sequences of ``seq_lens`` tokens in a NaN-poisoned paged cache.

    Blocks are handed out in a random (non-contiguous) order; every cache slot that no
    sequence owns (spare blocks and the tail of each last block) holds NaN, so a kernel that
    reads past a sequence's length produces NaN. Returns the caches, the block table
    [N, max_blocks] int32 (unused entries hold an out-of-range id, never to be followed) and
    the per-sequence contiguous K and V.
    """
    nblocks = [math.ceil(L / block_size) for L in seq_lens]
    total = sum(nblocks) + extra_blocks
    perm = torch.randperm(total, generator=g).tolist()
    max_blocks = max(max(nblocks), 1) + 1
    k_cache = torch.full((total, block_size, Hkv, D), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    block_tables = torch.full((len(seq_lens), max_blocks), 10**6, dtype=torch.int32)
    ks, vs = [], []
    for n, L in enumerate(seq_lens):
        ids = [perm.pop() for _ in range(nblocks[n])]
        block_tables[n, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = randn(L, Hkv, D, dtype=dtype, g=g)
        v = randn(L, Hkv, D, dtype=dtype, g=g)
        for p in range(L):
            k_cache[ids[p // block_size], p % block_size] = k[p]
            v_cache[ids[p // block_size], p % block_size] = v[p]
        ks.append(k)
        vs.append(v)
    return k_cache, v_cache, block_tables.to(DEVICE), ks, vs


# --------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 16), (5, 100), (3, 257)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, T, H, with_residual):
    g = gen(T * 1000 + H)
    x = randn(T, H, dtype=dtype, g=g, scale=3.0)
    w = randn(H, dtype=dtype, g=g)
    res = randn(T, H, dtype=dtype, g=g) if with_residual else None
    out, h = rms_norm_triton(x, w, 1e-6, res)
    ref_out, ref_h = rms_norm_ref(x, w, 1e-6, res)
    assert_close(out, ref_out, dtype)
    assert torch.equal(h, ref_h)
    if not with_residual:
        assert h is x


def test_rms_norm_strided_rows():
    g = gen(1)
    big = randn(6, 96, dtype=torch.float32, g=g)
    x = big[:, 16:80]  # row stride 96, last dim contiguous
    w = randn(64, dtype=torch.float32, g=g)
    res = randn(6, 64, dtype=torch.float32, g=g)
    out, h = rms_norm_triton(x, w, 1e-5, res)
    ref_out, ref_h = rms_norm_ref(x, w, 1e-5, res)
    assert_close(out, ref_out, torch.float32)
    assert torch.equal(h, ref_h)


def test_rms_norm_reference_matches_hf_llama():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    g = gen(2)
    x = randn(4, 64, dtype=torch.float32, g=g)
    norm = modeling.LlamaRMSNorm(64, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(randn(64, dtype=torch.float32, g=g))
        expected = norm(x)
    out, _ = rms_norm_ref(x, norm.weight.detach(), 1e-6)
    assert rel_err(out, expected) < 1e-6


# --------------------------------------------------------------------------- silu_mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I,block", [(1, 16, None), (7, 300, 128), (3, 1000, None)])
def test_silu_mul_matches_reference(dtype, T, I, block):
    g = gen(T + I)
    gate_up = randn(T, 2 * I, dtype=dtype, g=g, scale=2.0)
    out = silu_mul_triton(gate_up, block=block)
    assert out.shape == (T, I)
    assert_close(out, silu_mul_ref(gate_up), dtype)


def test_silu_mul_reference_is_silu_times_up():
    g = gen(3)
    gate_up = randn(5, 40, dtype=torch.float32, g=g)
    gate, up = gate_up[:, :20], gate_up[:, 20:]
    expected = gate / (1 + torch.exp(-gate)) * up
    assert rel_err(silu_mul_ref(gate_up), expected) < 1e-6


# --------------------------------------------------------------------------- rope_kv_write


def make_cos_sin(max_pos, D, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("D", [16, 24, 64])
def test_rope_kv_write_matches_reference(dtype, Hq, Hkv, D):
    g = gen(Hq * 100 + Hkv * 10 + D)
    T, block_size, num_blocks = 7, 4, 6
    # q/k/v as strided views of one fused projection output, as the model produces them
    qkv = randn(T, (Hq + 2 * Hkv) * D, dtype=dtype, g=g)
    q, k, v = qkv.view(T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=1)
    positions = torch.randint(0, 200, (T,), generator=g).to(DEVICE)
    cos_sin = make_cos_sin(256, D)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[[1, 4]] = -1  # CUDA-graph padding rows: not written
    slots = slots.to(DEVICE)
    k_cache = torch.full((num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()

    q_rot, k_rot = rope_kv_write_triton(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    q_ref, k_ref = rope_kv_write_ref(q, k, v, positions, cos_sin, k_cache_ref, v_cache_ref, slots)
    assert_close(q_rot, q_ref, dtype)
    assert_close(k_rot, k_ref, dtype)
    # written slots hold the same values; every other slot is untouched (still NaN)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    written = written.view(num_blocks, block_size)
    assert k_cache[~written].isnan().all() and v_cache[~written].isnan().all()
    assert_close(k_cache[written], k_cache_ref[written], dtype)
    assert torch.equal(v_cache[written], v_cache_ref[written])
    assert torch.equal(v_cache_ref[written], v[slots >= 0][torch.argsort(slots[slots >= 0])])


def test_rope_reference_matches_hf_llama():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    g = gen(4)
    T, Hq, Hkv, D = 5, 4, 2, 32
    q = randn(T, Hq, D, dtype=torch.float32, g=g)
    k = randn(T, Hkv, D, dtype=torch.float32, g=g)
    v = randn(T, Hkv, D, dtype=torch.float32, g=g)
    positions = torch.tensor([0, 3, 17, 5, 99], device=DEVICE)
    cos_sin = make_cos_sin(128, D)
    cos_half, sin_half = cos_sin[positions].chunk(2, dim=-1)
    cos = torch.cat((cos_half, cos_half), dim=-1)[None]  # HF: [batch, seq, D]
    sin = torch.cat((sin_half, sin_half), dim=-1)[None]
    # HF layout: [batch, heads, seq, D]
    hf_q, hf_k = modeling.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )
    kc = torch.zeros(2, 4, Hkv, D, device=DEVICE)
    vc = torch.zeros_like(kc)
    slots = torch.arange(T, device=DEVICE)
    q_rot, k_rot = rope_kv_write_ref(q, k, v, positions, cos_sin, kc, vc, slots)
    assert rel_err(q_rot, hf_q[0].transpose(0, 1)) < 1e-6
    assert rel_err(k_rot, hf_k[0].transpose(0, 1)) < 1e-6


# --------------------------------------------------------------------------- decode attention


def _decode_case(dtype, Hq, Hkv, D, seq_lens, block_size, seed):
    g = gen(seed)
    k_cache, v_cache, bt, _, _ = make_paged_kv(seq_lens, Hkv, D, block_size, dtype, g)
    q = randn(len(seq_lens), Hq, D, dtype=dtype, g=g)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, bt, sl


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1), (32, 2)])
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("use_dot", [False, True])
def test_paged_decode_matches_reference(dtype, Hq, Hkv, num_splits, use_dot):
    seq_lens = [37, 0, 5, 70]  # not multiples of the block size; a padded (empty) row
    D = 32
    q, kc, vc, bt, sl = _decode_case(dtype, Hq, Hkv, D, seq_lens, 16, seed=Hq + Hkv)
    scale = D**-0.5
    out = paged_decode_attention_triton(q, kc, vc, bt, sl, scale, num_splits, use_dot=use_dot, block_n=16)
    ref = paged_decode_attention_ref(q, kc, vc, bt, sl, scale)
    assert_close(out, ref, dtype)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # seq_len 0 -> zeros, no NaN


@pytest.mark.parametrize("D,block_size", [(40, 8), (128, 16)])
def test_paged_decode_head_dims_and_block_sizes(D, block_size):
    dtype = torch.float16
    q, kc, vc, bt, sl = _decode_case(dtype, 8, 2, D, [1, 29, 64], block_size, seed=D)
    out = paged_decode_attention_triton(q, kc, vc, bt, sl, 0.1, 2)
    assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, sl, 0.1), dtype)


def test_paged_decode_more_splits_than_tokens():
    q, kc, vc, bt, sl = _decode_case(torch.float32, 4, 1, 16, [3, 1, 0], 4, seed=5)
    out = paged_decode_attention_triton(q, kc, vc, bt, sl, 0.25, 8)
    assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, sl, 0.25), torch.float32)


def test_choose_num_splits_depends_on_shapes_only():
    # enough (seq, kv head) programs already, but the longest sequences split 8 ways
    assert choose_num_splits(256, 8, 4096, 132) == 8
    assert choose_num_splits(256, 8, 4096, 132, straggler_splits=1) == 1
    assert choose_num_splits(256, 8, 300, 132) == 4  # >= 64 tokens per split
    assert choose_num_splits(1, 8, 32768, 132) == 32  # capped
    assert choose_num_splits(4, 8, 8192, 132) == 16  # ~4 programs per SM
    assert choose_num_splits(16, 8, 8192, 132) == 8
    assert choose_num_splits(16, 8, 8192, 132, straggler_splits=1) == 4
    assert choose_num_splits(1, 8, 300, 132) == 4  # >= 64 tokens per split (5), as a power of two
    assert choose_num_splits(4, 8, 16, 132) == 1
    seen = set()
    for B in range(1, 300):
        for L in (16, 300, 1000, 4096, 8192, 32768):
            n = choose_num_splits(B, 8, L)
            assert 1 <= n <= 32
            seen.add(n)
    # only powers of two: a handful of kernel variants, all compiled at warm-up
    assert seen <= {1, 2, 4, 8, 16, 32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_step_replays_in_cuda_graph():
    """rope_kv_write + decode captured once, replayed with new lengths, a padded row
    (slot -1, seq_len 0) included: no host sync inside, results match the references."""
    from servesim.kernels.reference import paged_decode_attention_ref as dec_ref

    g = gen(10)
    dtype = torch.bfloat16
    B, Hq, Hkv, D, bs, max_blocks, num_blocks = 4, 8, 2, 64, 16, 8, 40
    cos_sin = make_cos_sin(max_blocks * bs, D)
    kc = randn(num_blocks, bs, Hkv, D, dtype=dtype, g=g)
    vc = randn(num_blocks, bs, Hkv, D, dtype=dtype, g=g)
    q = torch.zeros(B, Hq, D, dtype=dtype, device=DEVICE)
    k = torch.zeros(B, Hkv, D, dtype=dtype, device=DEVICE)
    v = torch.zeros_like(k)
    positions = torch.zeros(B, dtype=torch.int64, device=DEVICE)
    slots = torch.full((B,), -1, dtype=torch.int64, device=DEVICE)
    bt = torch.randperm(num_blocks, generator=g)[: B * max_blocks].view(B, max_blocks).int().to(DEVICE)
    sl = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    scale = D**-0.5

    def step():
        qr, _ = ops.rope_kv_write(q, k, v, positions, cos_sin, kc, vc, slots, impl="triton")
        return ops.paged_decode_attention(qr, kc, vc, bt, sl, scale, impl="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for trial in range(2):
        lens = torch.randint(1, max_blocks * bs, (B,), generator=g)
        lens[trial + 1] = 0  # padded row
        q.copy_(randn(B, Hq, D, dtype=dtype, g=g))
        k.copy_(randn(B, Hkv, D, dtype=dtype, g=g))
        v.copy_(randn(B, Hkv, D, dtype=dtype, g=g))
        pos = (lens - 1).clamp(min=0)
        positions.copy_(pos)
        bt_cpu = bt.cpu().long()
        sl_new = torch.tensor([int(L) for L in lens])
        slot_new = torch.where(
            lens > 0, bt_cpu[torch.arange(B), pos // bs] * bs + pos % bs, torch.full_like(pos, -1)
        )
        slots.copy_(slot_new)
        sl.copy_(sl_new)
        kc_ref, vc_ref = kc.clone(), vc.clone()
        qr_ref, _ = rope_kv_write_ref(q, k, v, positions, cos_sin, kc_ref, vc_ref, slots)
        expected = dec_ref(qr_ref, kc_ref, vc_ref, bt, sl, scale)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(kc, kc_ref, dtype)  # (fp32 rotation may round differently with FMA)
        assert torch.equal(vc, vc_ref)
        assert_close(out, expected, dtype)
        assert torch.equal(out[trial + 1], torch.zeros_like(out[trial + 1]))


# --------------------------------------------------------------------------- prefill attention


def _prefill_case(dtype, Hq, Hkv, D, q_lens, ctx_lens, block_size, seed):
    g = gen(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    k_cache, v_cache, bt, _, _ = make_paged_kv(seq_lens, Hkv, D, block_size, dtype, g)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)
    q = randn(sum(q_lens), Hq, D, dtype=dtype, g=g)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, bt, cu, sl


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1), (6, 2)])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 32)])
def test_paged_prefill_matches_reference(dtype, Hq, Hkv, block_m, block_n):
    # plain prefill, chunk after cached context, a 1-token chunk after a long context
    q_lens = [19, 7, 1, 33]
    ctx_lens = [0, 13, 40, 5]
    D = 32
    q, kc, vc, bt, cu, sl = _prefill_case(dtype, Hq, Hkv, D, q_lens, ctx_lens, 8, seed=Hq * Hkv)
    out = paged_prefill_attention_triton(q, kc, vc, bt, cu, sl, D**-0.5, block_m=block_m, block_n=block_n)
    ref = paged_prefill_attention_ref(q, kc, vc, bt, cu, sl, D**-0.5)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("D,block_size", [(40, 16), (128, 16)])
def test_paged_prefill_head_dims(D, block_size):
    dtype = torch.float16
    q, kc, vc, bt, cu, sl = _prefill_case(dtype, 4, 2, D, [10, 21], [3, 0], block_size, seed=D)
    out = paged_prefill_attention_triton(q, kc, vc, bt, cu, sl, D**-0.5)
    assert_close(out, paged_prefill_attention_ref(q, kc, vc, bt, cu, sl, D**-0.5), dtype)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.tuples(st.integers(0, 24), st.integers(0, 30)), min_size=1, max_size=4),
    group=st.sampled_from([1, 4, 8]),
    block_size=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
)
def test_paged_prefill_random_layouts(chunks, group, block_size, seed):
    q_lens = [n for n, _ in chunks]
    ctx_lens = [c for _, c in chunks]
    if sum(q_lens) == 0:
        q_lens[0] = 1
    q, kc, vc, bt, cu, sl = _prefill_case(torch.float32, group * 2, 2, 16, q_lens, ctx_lens, block_size, seed)
    _common.POISON_OUTPUTS = True  # (fixtures do not wrap hypothesis examples one by one)
    out = paged_prefill_attention_triton(q, kc, vc, bt, cu, sl, 0.25, block_m=16, block_n=16)
    assert_close(out, paged_prefill_attention_ref(q, kc, vc, bt, cu, sl, 0.25), torch.float32)


# --------------------------------------------------------------------------- references vs SDPA


def _sdpa(q, k, v, scale, mask=None, is_causal=False):
    """q: [M, Hq, D], k/v: [L, Hkv, D] -> [M, Hq, D] via torch SDPA (fp32, GQA by repeat)."""
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, is_causal=is_causal, scale=scale)
    return o.transpose(0, 1)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)])
def test_decode_reference_matches_sdpa(Hq, Hkv):
    g = gen(6)
    D, seq_lens = 32, [9, 16, 1]
    k_cache, v_cache, bt, ks, vs = make_paged_kv(seq_lens, Hkv, D, 4, torch.float32, g)
    q = randn(3, Hq, D, dtype=torch.float32, g=g)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, bt, sl, 0.2)
    for b in range(3):
        expected = _sdpa(q[b : b + 1], ks[b], vs[b], 0.2)[0]
        assert rel_err(ref[b], expected) < 1e-5


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)])
def test_prefill_reference_matches_sdpa(Hq, Hkv):
    g = gen(7)
    D = 32
    q_lens, ctx_lens = [12, 5], [0, 9]
    seq_lens = [a + b for a, b in zip(q_lens, ctx_lens)]
    k_cache, v_cache, bt, ks, vs = make_paged_kv(seq_lens, Hkv, D, 4, torch.float32, g)
    q = randn(sum(q_lens), Hq, D, dtype=torch.float32, g=g)
    cu = torch.tensor([0, 12, 17], dtype=torch.int32, device=DEVICE)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, bt, cu, sl, 0.2)
    # sequence 0: whole prompt, plain causal
    assert rel_err(ref[:12], _sdpa(q[:12], ks[0], vs[0], 0.2, is_causal=True)) < 1e-5
    # sequence 1: 5 new tokens after 9 cached ones: bottom-right-aligned causal mask
    mask = torch.ones(5, 14, dtype=torch.bool, device=DEVICE).tril(diagonal=9)
    assert rel_err(ref[12:], _sdpa(q[12:], ks[1], vs[1], 0.2, mask=mask)) < 1e-5


# --------------------------------------------------------------------------- composition & dispatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_prefill_then_decode_equals_full_attention(dtype):
    """rope_kv_write + prefill in two chunks + one decode step == causal SDPA on the
    whole rotated sequence: what chunked context and prefix reuse rely on."""
    g = gen(8)
    Hq, Hkv, D, block_size, L = 8, 2, 32, 8, 29
    cos_sin = make_cos_sin(64, D)
    q_all = randn(L + 1, Hq, D, dtype=dtype, g=g)
    k_all = randn(L + 1, Hkv, D, dtype=dtype, g=g)
    v_all = randn(L + 1, Hkv, D, dtype=dtype, g=g)
    blocks = torch.tensor([5, 2, 7, 0, 3], dtype=torch.int32)
    bt = blocks[None].to(DEVICE)
    kc = torch.full((8, block_size, Hkv, D), float("nan"), dtype=dtype, device=DEVICE)
    vc = kc.clone()
    pos_all = torch.arange(L + 1, device=DEVICE)
    slots_all = (blocks.long()[pos_all.cpu() // block_size] * block_size + pos_all.cpu() % block_size).to(DEVICE)
    scale = D**-0.5
    outs = []
    for lo, hi in [(0, 11), (11, L)]:  # two context chunks
        qr, _ = ops.rope_kv_write(q_all[lo:hi], k_all[lo:hi], v_all[lo:hi], pos_all[lo:hi], cos_sin, kc, vc,
                                  slots_all[lo:hi], impl="triton")
        cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEVICE)
        sl = torch.tensor([hi], dtype=torch.int32, device=DEVICE)
        outs.append(ops.paged_prefill_attention(qr, kc, vc, bt, cu, sl, scale, impl="triton"))
    qr, _ = ops.rope_kv_write(q_all[L:], k_all[L:], v_all[L:], pos_all[L:], cos_sin, kc, vc, slots_all[L:],
                              impl="triton")
    sl = torch.tensor([L + 1], dtype=torch.int32, device=DEVICE)
    outs.append(ops.paged_decode_attention(qr, kc, vc, bt, sl, scale, impl="triton"))
    out = torch.cat(outs)

    # one-shot: rotate everything with the reference, plain causal SDPA
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    q_rot, k_rot = rope_kv_write_ref(q_all, k_all, v_all, pos_all, cos_sin, kc2, vc2, slots_all)
    expected = _sdpa(q_rot, k_rot, v_all, scale, is_causal=True).to(dtype)
    assert_close(out, expected, dtype)


def test_ops_dispatch():
    g = gen(9)
    x = randn(3, 32, dtype=torch.float32, g=g)
    w = randn(32, dtype=torch.float32, g=g)
    via_torch, _ = ops.rms_norm(x, w, 1e-6, impl="torch")
    via_auto, _ = ops.rms_norm(x, w, 1e-6)  # Triton on CUDA; the torch reference on a CPU
    via_triton, _ = ops.rms_norm(x, w, 1e-6, impl="triton")
    assert torch.equal(via_torch, rms_norm_ref(x, w, 1e-6)[0])
    if x.is_cuda:
        assert torch.equal(via_auto, via_triton)
        assert _common.use_triton("auto", x)
    else:  # the interpreter runs only when asked for by name
        assert torch.equal(via_auto, via_torch)
        assert not _common.use_triton("auto", x)
        assert_close(via_triton, via_torch, torch.float32)
    assert not _common.use_triton("torch", x)
    with pytest.raises(ValueError, match="impl"):
        ops.silu_mul(x, impl="cuda")
    gu = randn(2, 8, dtype=torch.float32, g=g)
    assert_close(ops.silu_mul(gu, impl="triton"), ops.silu_mul(gu, impl="torch"), torch.float32)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="about the CPU interpreter")
def test_bf16_on_the_interpreter_is_refused_or_routed_to_torch():
    g = gen(11)
    x = randn(2, 16, dtype=torch.bfloat16, g=g)
    w = randn(16, dtype=torch.bfloat16, g=g)
    assert not _common.use_triton("auto", x)
    assert torch.equal(ops.rms_norm(x, w, 1e-6)[0], rms_norm_ref(x, w, 1e-6)[0])
    q, kc, vc, bt, sl = _decode_case(torch.bfloat16, 4, 2, 16, [5, 3], 4, seed=1)
    with pytest.raises(TypeError, match="bf16"):
        ops.paged_decode_attention(q, kc, vc, bt, sl, 0.25, impl="triton")


def test_ops_signatures_are_the_contract():
    import inspect

    expected = {
        "rms_norm": ["x", "weight", "eps", "residual", "impl"],
        "silu_mul": ["gate_up", "impl"],
        # k_scale / v_scale: an fp8 KV cache's per-tensor scales (S7)
        "rope_kv_write": ["q", "k", "v", "positions", "cos_sin", "k_cache", "v_cache", "slot_mapping", "impl",
                          "k_scale", "v_scale"],
        "paged_decode_attention": ["q", "k_cache", "v_cache", "block_tables", "seq_lens", "scale",
                                   "num_splits", "impl", "k_scale", "v_scale"],
        "paged_prefill_attention": ["q", "k_cache", "v_cache", "block_tables", "cu_q_lens", "seq_lens",
                                    "scale", "impl", "k_scale", "v_scale"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(ops, name)).parameters) == params


# --------------------------------------------------------------------------- decode attention configs (S10)

from servesim.kernels import decode_attention as _da  # noqa: E402


@pytest.fixture
def _no_tuning(monkeypatch):
    """A clean tuning state (no table, the environment variable not read yet), restored after."""
    monkeypatch.setattr(_da, "_TUNING", None)
    monkeypatch.setattr(_da, "_TUNING_LOADED_ENV", False)
    monkeypatch.delenv(_da.TUNING_ENV, raising=False)


DECODE_SEQS = [37, 0, 5, 150, 64, 1, 129]  # not multiples of the block size; an empty row; one token


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("max_splits,min_tokens", [(4, 16), (8, 1), (3, 48), (64, 16)])
def test_paged_decode_configs_match_reference(_no_tuning, dtype, fused, head_major, max_splits, min_tokens):
    """Every config path: per-sequence split counts from each length (short rows use fewer
    splits; splits past a row's length exit), the one-split direct write, the separate
    reduce and the fused last-split merge (more than MERGE_CHUNK splits too), both program
    orders."""
    q, kc, vc, bt, sl = _decode_case(dtype, 8, 2, 32, DECODE_SEQS, 16, seed=max_splits + min_tokens)
    cfg = _da.DecodeConfig(max_splits=max_splits, min_split_tokens=min_tokens, block_n=16, num_warps=2,
                           num_stages=2, fused_reduce=fused, head_major=head_major)
    out = paged_decode_attention_triton(q, kc, vc, bt, sl, 0.2, config=cfg)
    assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, sl, 0.2), dtype)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # seq_len 0 -> zeros
    if fused and max_splits > 1:  # the last split of each (sequence, kv head) reset its counter
        assert int(_da._counters(q.device, 1).abs().sum()) == 0
        again = paged_decode_attention_triton(q, kc, vc, bt, sl, 0.2, config=cfg)
        assert torch.equal(again, out)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(group=st.sampled_from([1, 2, 3, 4, 8]), hkv=st.integers(1, 2), D=st.sampled_from([16, 48, 64]),
       splits=st.integers(2, 40), lens=st.lists(st.integers(0, 130), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float16]), use_dot=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_merge_of_all_heads_matches_reference(_no_tuning, group, hkv, D, splits, lens, dtype, use_dot, seed):
    """The fused reduce (the last split merges every head of its group in one tile, chunk by
    chunk of splits) = the reference for any group (3: a padded head row), head dim (48: a
    padded tile), split bound (past one chunk, and past a row's tokens) and lengths (0: zeros);
    it leaves its counters at 0, and a second launch gives the same bits."""
    q, kc, vc, bt, sl = _decode_case(dtype, group * hkv, hkv, D, lens, 8, seed=seed)
    cfg = _da.DecodeConfig(max_splits=splits, min_split_tokens=1, block_n=16, num_warps=4, fused_reduce=True,
                           head_major=bool(seed % 2), use_dot=use_dot)
    out = paged_decode_attention_triton(q, kc, vc, bt, sl, D ** -0.5, config=cfg)
    assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, sl, D ** -0.5), dtype)
    assert int(_da._counters(q.device, 1).abs().sum()) == 0
    assert torch.equal(paged_decode_attention_triton(q, kc, vc, bt, sl, D ** -0.5, config=cfg), out)


def test_merge_chunk_bounds_the_tile():
    """The fused merge reads MERGE_CHUNK splits a trip unless the group's tile would pass
    MERGE_TILE elements; a power of two, >= 1."""
    for group in (1, 2, 3, 4, 8, 16, 64):
        for bd in (16, 64, 128, 256):
            c = _da.merge_chunk(group, bd)
            assert c >= 1 and c & (c - 1) == 0 and c <= _da.MERGE_CHUNK
            assert c * _common.next_pow2(group) * bd <= _da.MERGE_TILE or c == 1
            assert c == _da.MERGE_CHUNK or 2 * c * _common.next_pow2(group) * bd > _da.MERGE_TILE


_AOT_DECODE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from servesim.kernels import decode_attention as da

fn = da._decode_split_kernel
idx = fn.arg_names.index
out = []
for D, block_n, warps, stages, fused, group, gdc in json.loads(sys.argv[1]):
    sig = dict(q_ptr="*bf16", kc_ptr="*bf16", vc_ptr="*bf16", bt_ptr="*i32", sl_ptr="*i32", m_ptr="*fp32",
               l_ptr="*fp32", acc_ptr="*fp32", cnt_ptr="*i32", out_ptr="*bf16", qk_scale="fp32", v_scale="fp32")
    sig.update({n: "i32" for n in fn.arg_names if n.startswith("s_") or n in ("n_kv_heads", "max_splits",
                                                                                "min_split_tokens")})
    const = dict(HEAD_DIM=D, PAGE=32, GROUP=group, BLOCK_G=16, BLOCK_N=block_n, BLOCK_D=D, USE_DOT=True,
                 DOT_PREC="tf32", FUSED_REDUCE=fused, HEAD_MAJOR=True, CHUNK=da.merge_chunk(group, D) if fused else 1,
                 KV_FP8=False, MATH_F16=False, MERGE_G=triton.next_power_of_2(group), GDC=bool(gdc))
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(idx(n),): v for n, v in const.items()}, attrs={})
    opts = dict(num_warps=warps, **({"num_stages": stages} if stages else {}))
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    out.append([".local" in ptx, ptx.count("griddepcontrol.wait"), ptx.count("griddepcontrol.launch_dependents")])
print(json.dumps(out))
"""


def test_fused_merge_compiles_for_sm90_without_spills():
    """Compiled ahead of time for an H100/H200 (no GPU; a process of its own, without the
    interpreter): the split kernel with the all-heads merge tile, at both models' head dims and
    the tuned tiles, keeps everything in registers (no local memory); with programmatic
    dependent launch (GDC) it has one wait and one launch_dependents, none without."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    variants = [(128, 64, 4, 2, True, 4, 0), (64, 128, 4, 2, True, 4, 0), (128, 128, 4, 2, True, 4, 0),
                (128, 64, 8, 3, True, 8, 0), (128, 64, 4, 2, True, 4, 1), (64, 128, 4, 2, False, 4, 1)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _AOT_DECODE, json.dumps(variants)], capture_output=True, text=True,
                       env=env, cwd=root, timeout=300)
    if p.returncode != 0 and ("ImportError" in p.stderr or "unexpected keyword" in p.stderr):
        pytest.skip(f"this Triton's ahead-of-time API: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [[False, v[-1], v[-1]] for v in variants]


@pytest.mark.parametrize("use_dot", [False, True])
def test_paged_decode_config_group_and_tiles(_no_tuning, use_dot):
    """MQA-like group 8 and tiles wider than the blocks, with and without tl.dot, fused."""
    q, kc, vc, bt, sl = _decode_case(torch.float32, 8, 1, 16, [70, 3, 33], 8, seed=3)
    for block_n in (16, 64):
        cfg = _da.DecodeConfig(max_splits=4, min_split_tokens=8, block_n=block_n, fused_reduce=True, use_dot=use_dot)
        out = paged_decode_attention_triton(q, kc, vc, bt, sl, 0.3, config=cfg)
        assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, sl, 0.3), torch.float32)


def test_decode_config_resolution(_no_tuning):
    """explicit fields > the tuning table's > default_config's; num_splits= keeps its old
    meaning (every sequence split that many ways)."""
    key = _da.tuning_key(torch.float32, 4, 2, 32, 16, 132)
    d = _da.resolve_config(16, 2, 256, 32, 4, 16, torch.float32, 132)
    assert d == _da.default_config(16, 2, 256, 32, 4, 132)
    assert d.fused_reduce is False and d.min_split_tokens == _da.MIN_TOKENS_PER_SPLIT and d.num_stages == 0
    full = dict(max_splits=4, min_split_tokens=128, block_n=32, num_warps=8, num_stages=3, fused_reduce=True,
                head_major=True, use_dot=True)
    _da.set_tuning(dict(version=_da.TUNING_VERSION, entries={key: [dict(batch=1, config=dict(full, max_splits=32)),
                                                                   dict(batch=64, config=full)]}))
    assert _da.resolve_config(64, 2, 256, 32, 4, 16, torch.float32, 132) == _da.DecodeConfig(**full)
    # nearest tuned batch in log2, its split bound scaled to the same number of programs
    assert _da.tuned_config(2, key) == _da.DecodeConfig(**dict(full, max_splits=16))
    assert _da.tuned_config(128, key).max_splits == 2
    assert _da.tuned_config(256, key).max_splits == 1
    # 8 is as near 1 as 64 in log2: ties go to the larger, whose 4 splits at 64 become 32 at 8
    assert _da.tuned_config(8, key) == _da.DecodeConfig(**dict(full, max_splits=32))
    assert _da.tuned_config(8, "float32/g1/kv1/d8/bs16/sm132") is None
    over = _da.resolve_config(64, 2, 256, 32, 4, 16, torch.float32, 132, _da.DecodeConfig(num_warps=2))
    assert over == _da.DecodeConfig(**dict(full, num_warps=2))
    _da.set_tuning(None)
    assert _da.tuned_config(64, key) is None


def test_decode_tuning_table_is_checked_and_loaded(_no_tuning, tmp_path, monkeypatch):
    key = _da.tuning_key(torch.float32, 4, 2, 32, 16, 132)
    with pytest.raises(ValueError, match="version"):
        _da.set_tuning(dict(version=99, entries={}))
    with pytest.raises(ValueError, match="batch"):
        _da.set_tuning(dict(version=_da.TUNING_VERSION, entries={key: [dict(config={})]}))
    with pytest.raises(ValueError, match="unknown keys"):
        _da.set_tuning(dict(version=_da.TUNING_VERSION, entries={key: [dict(batch=1, config=dict(splits=2))]}))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        _da.load_tuning(bad)
    good = tmp_path / "tuning.json"
    good.write_text(json.dumps(dict(version=_da.TUNING_VERSION, entries={key: [dict(
        batch=4, config=dict(max_splits=2, min_split_tokens=16, block_n=16, fused_reduce=True))]})))
    # the environment variable is read at the first lookup
    monkeypatch.setattr(_da, "_TUNING", None)
    monkeypatch.setattr(_da, "_TUNING_LOADED_ENV", False)
    monkeypatch.setenv(_da.TUNING_ENV, str(good))
    cfg = _da.resolve_config(4, 2, 256, 32, 4, 16, torch.float32, 132)
    assert (cfg.max_splits, cfg.min_split_tokens, cfg.block_n, cfg.fused_reduce) == (2, 16, 16, True)
    assert cfg.num_warps == 4  # not in the table: the default's
    # ... and the kernel runs the tuned config (B = 4, this test's shapes) correctly
    q, kc, vc, bt, sl = _decode_case(torch.float32, 8, 2, 32, [100, 17, 1, 64], 16, seed=8)
    out = paged_decode_attention_triton(q, kc, vc, bt, sl, 0.2)
    assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, sl, 0.2), torch.float32)
    assert len(_da.table_configs(key)) == 1
    assert _da.precompile(kc, vc, 8, 0.2) == 2  # the table's config and the default


def test_decode_config_label_and_roundtrip():
    c = _da.DecodeConfig(max_splits=8, min_split_tokens=64, block_n=64, num_warps=4, num_stages=0,
                         fused_reduce=True, head_major=False, use_dot=True)
    assert _da.DecodeConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.label() == "S8/T64/N64/w4/std/fused"
    assert c.compile_key() == _da.DecodeConfig(max_splits=1, min_split_tokens=1, block_n=64, num_warps=4,
                                               num_stages=0, fused_reduce=True, head_major=False,
                                               use_dot=True).compile_key()


def test_decode_tuning_env_none_means_no_table(_no_tuning, monkeypatch):
    monkeypatch.setenv(_da.TUNING_ENV, "none")
    assert _da.get_tuning() is None
    assert _da.resolve_config(4, 2, 256, 32, 4, 16, torch.float32, 132) == _da.default_config(4, 2, 256, 32, 4, 132)
