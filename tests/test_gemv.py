"""The small-M Triton GEMM (kernels/gemv.py) vs its torch references, its tuning-table lookup,
and the model's fused decode path (rmsnorm / silu_mul in the GEMM's prologue) vs the unfused
one. Without a CUDA device the kernel runs in Triton's CPU interpreter (fp32 / fp16)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fp8 import _interpreter_rounding  # noqa: E402

from servesim.kernels import _common, ops  # noqa: E402
from servesim.kernels import decode_attention as da  # noqa: E402
from servesim.kernels.gemv import (  # noqa: E402
    GEMV_ENTRIES, GemvConfig, RopeKV, candidates, check_entries, gemv_key, gemv_triton, tuned_config)
from servesim.kernels.reference import (  # noqa: E402
    linear_ref, rms_norm_linear_ref, rms_norm_qkv_rope_ref, silu_mul_linear_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
CONFIGS = [
    GemvConfig(block_n=16, block_k=32, split_k=1, num_warps=4, use_dot=False),
    GemvConfig(block_n=8, block_k=64, split_k=3, num_warps=4, use_dot=False),
    GemvConfig(block_n=16, block_k=32, split_k=1, num_warps=4, use_dot=True),
    GemvConfig(block_n=32, block_k=16, split_k=4, num_warps=4, num_stages=2, use_dot=True),
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _poison_and_restore_table(monkeypatch):
    """Outputs and workspaces NaN-filled (the kernel must write every element); the installed
    tuning table restored after each test."""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    prev = da.get_tuning()
    yield
    da.set_tuning(prev)


def inputs(M, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype=dtype, device=DEV)

    return dict(x=r(M, K), res=r(M, K), nw=(torch.rand(K, generator=g) + 0.5).to(dtype=dtype, device=DEV),
                w=r(N, K, scale=K ** -0.5), gu=r(M, 2 * K))


def check_all(c, cfg, dtype, eps=1e-5):
    tol = TOL[dtype]
    y, h = gemv_triton(c["x"], c["w"], cfg)
    assert h is None and rel(y, linear_ref(c["x"], c["w"])) < tol
    for res in (c["res"], None):
        y, h = gemv_triton(c["x"], c["w"], cfg, prologue="rms", norm_weight=c["nw"], eps=eps, residual=res)
        yr, hr = rms_norm_linear_ref(c["x"], c["nw"], eps, c["w"], res)
        assert rel(y, yr) < tol
        assert torch.equal(h, hr)  # the residual stream: the same rounding as rms_norm's
    y, _ = gemv_triton(c["gu"], c["w"], cfg, prologue="silu")
    assert rel(y, silu_mul_linear_ref(c["gu"], c["w"])) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 8, 17])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
def test_gemv_matches_reference(dtype, M, cfg):
    if not cfg.use_dot and M > 4:
        pytest.skip("the broadcast product is for M <= 4")
    check_all(inputs(M, 40, 96, dtype, seed=M), cfg, dtype)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 20), N=st.integers(1, 70), K=st.integers(1, 160), split=st.integers(1, 6),
       bn=st.sampled_from([8, 16, 32]), bk=st.sampled_from([16, 32, 64]), dot=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gemv_random_shapes_split_k_deterministic(M, N, K, split, bn, bk, dot, seed):
    """Any shape, tile and split count: the reference's result; split-K is bit-identical from
    call to call (the last split sums the partials in split order) and leaves its counters
    at 0 for the next launch."""
    _common.POISON_OUTPUTS = True
    dot = dot or M > 4
    cfg = GemvConfig(block_n=bn, block_k=bk, split_k=split, num_warps=4, use_dot=dot)
    c = inputs(M, N, K, torch.float32, seed)
    y1, _ = gemv_triton(c["gu"], c["w"], cfg, prologue="silu")
    y2, _ = gemv_triton(c["gu"], c["w"], cfg, prologue="silu")
    assert rel(y1, silu_mul_linear_ref(c["gu"], c["w"])) < 1e-5
    assert torch.equal(y1, y2)
    assert int(da._counters(torch.device(DEV), 1).abs().sum()) == 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 12), N=st.integers(1, 50), K=st.integers(1, 130), split=st.integers(1, 5),
       bn=st.sampled_from([8, 16, 32]), bk=st.sampled_from([16, 32, 64]), dot=st.booleans(),
       prologue=st.sampled_from(["none", "rms", "silu"]), seed=st.integers(0, 2**16))
def test_gemv_preload_is_bit_identical(M, N, K, split, bn, bk, dot, prologue, seed):
    """The first weight tile loaded before everything else (programmatic dependent launch's
    preload, kernels/_common.py `PDL`) gives bit for bit the same result, residual stream included:
    the peeled tile's products are added first, in the loop's order."""
    dot = dot or M > 4
    cfg = GemvConfig(block_n=bn, block_k=bk, split_k=split, num_warps=4, use_dot=dot)
    c = inputs(M, N, K, torch.float32, seed)
    x = c["gu"] if prologue == "silu" else c["x"]
    kw = dict(norm_weight=c["nw"], residual=c["res"]) if prologue == "rms" else {}
    y0, h0 = gemv_triton(x, c["w"], cfg, prologue=prologue, preload=False, **kw)
    y1, h1 = gemv_triton(x, c["w"], cfg, prologue=prologue, preload=True, **kw)
    assert torch.equal(y0, y1)
    assert (h0 is None and h1 is None) or torch.equal(h0, h1)


def test_programmatic_launch_is_off_on_cpu_and_restored():
    """`programmatic_launch` turns `PDL` on inside its block only, and CPU tensors never get the
    GDC launch keywords (the interpreter has no grid dependency control)."""
    x = torch.zeros(1)
    assert not _common.PDL
    with _common.programmatic_launch(True):
        assert _common.PDL and _common.pdl_kwargs(x) == {}
        with _common.programmatic_launch(False):
            assert not _common.PDL
        assert _common.PDL
    assert not _common.PDL


def test_gemv_zero_rows():
    c = inputs(1, 8, 32, torch.float32)
    y, h = gemv_triton(c["x"][:0], c["w"], CONFIGS[0], prologue="rms", norm_weight=c["nw"], residual=c["res"][:0])
    assert y.shape == (0, 8) and h.shape == (0, 32)


def test_candidates_cover_the_decode_shapes():
    """Every candidate of a real shape is a valid config, the broadcast product only at M <= 4,
    several compile keys per M but a bounded number."""
    for m in (1, 2, 4, 8, 16, 32, 64):
        cs = candidates(m, 2048, 8192, 132)
        assert cs and all(GemvConfig.from_dict(c.to_dict()) == c for c in cs)
        assert all(c.use_dot for c in cs) or m <= 4
        assert 2 <= len({c.compile_key() for c in cs}) <= 12  # (each a Triton compilation on the device)
        assert any(c.split_k > 1 for c in cs) and any(c.split_k == 1 for c in cs)


def _table(entries: dict) -> dict:
    return dict(version=da.TUNING_VERSION, device="test", sms=132, entries={}, **{GEMV_ENTRIES: entries})


def test_tuned_config_lookup():
    cpu = torch.device("cpu")
    key = gemv_key(torch.float16, "rms", 64, 32, 132)
    a, b = CONFIGS[0], CONFIGS[3]
    da.set_tuning(_table({key: [{"m": 4, "config": a.to_dict()}, {"m": 16, "config": b.to_dict()},
                                {"m": 32, "config": None}]}))
    look = [tuned_config(m, 64, 32, torch.float16, cpu, "rms") for m in (1, 4, 5, 16, 17, 32, 33)]
    assert look == [a, a, b, b, None, None, None]  # the smallest tuned M >= m; null: cuBLAS; past: cuBLAS
    assert tuned_config(4, 64, 32, torch.float16, cpu, "none") is None  # another prologue: no entry
    assert tuned_config(4, 64, 32, torch.float32, cpu, "rms") is None  # another dtype
    da.set_tuning(None)
    assert tuned_config(4, 64, 32, torch.float16, cpu, "rms") is None  # the memo follows the table


@pytest.mark.parametrize("bad", [[{"config": None}], [{"m": 1, "config": {"block_n": 0}}],
                                 [{"m": 1, "config": {"tile": 3}}]])
def test_bad_gemv_entries_are_named(bad):
    with pytest.raises(ValueError, match="gemv_entries"):
        check_entries({"k": bad})


def test_ops_fall_back_to_the_unfused_path():
    """impl='torch' (and a table without the shape) gives F.linear after the unfused op."""
    c = inputs(2, 24, 32, torch.float32)
    y, h = ops.rms_norm_linear(c["x"], c["nw"], 1e-5, c["w"], c["res"], impl="torch")
    yr, hr = rms_norm_linear_ref(c["x"], c["nw"], 1e-5, c["w"], c["res"])
    assert rel(y, yr) < 1e-5 and torch.equal(h, hr)
    assert rel(ops.silu_mul_linear(c["gu"], c["w"], impl="torch"), silu_mul_linear_ref(c["gu"], c["w"])) < 1e-5
    assert rel(ops.linear(c["x"], c["w"], impl="triton"), linear_ref(c["x"], c["w"])) < 1e-5  # no entry: F.linear


# ---------------------------------------------------------------------------------- qkv + rope + KV write
F8 = torch.float8_e4m3fn


def qkv_case(M, hq, hkv, D, H, dtype, fp8, res, seed, bs=4, blocks=6):
    """Inputs of a layer's attention input: x, residual, norm weight, the fused qkv weight,
    positions, the cos/sin table, two identical pairs of paged caches (random contents, fp8 or
    the model's dtype) and distinct slots (some -1: padding rows)."""
    from servesim.gpu_backend.rope import build_cos_sin_cache

    g = torch.Generator().manual_seed(seed)

    def r(*sh, scale=1.0):
        return (torch.randn(*sh, generator=g) * scale).to(dtype=dtype, device=DEV)

    N = (hq + 2 * hkv) * D
    cdt = F8 if fp8 else dtype
    kc = (torch.randn(blocks, bs, hkv, D, generator=g)).to(cdt).to(DEV)
    vc = (torch.randn(blocks, bs, hkv, D, generator=g)).to(cdt).to(DEV)
    slots = torch.randperm(blocks * bs, generator=g)[:M].long()
    slots[torch.rand(M, generator=g) < 0.3] = -1
    return dict(x=r(M, H), res=r(M, H) if res else None, nw=(torch.rand(H, generator=g) + 0.5).to(dtype).to(DEV),
                w=r(N, H, scale=H ** -0.5), pos=torch.randint(0, 40, (M,), generator=g).to(DEV),
                cs=build_cos_sin_cache(D, 40, device=DEV), kc=kc, vc=vc, kc2=kc.clone(), vc2=vc.clone(),
                slots=slots.to(DEV), ks=0.05 if fp8 else 1.0, vs=0.03 if fp8 else 1.0)


def check_qkv(c, q, h, hq, hkv, dtype):
    qr, hr = rms_norm_qkv_rope_ref(c["x"], c["nw"], 1e-5, c["w"], c["res"], c["pos"], c["cs"], c["kc2"], c["vc2"],
                                   c["slots"], hq, hkv, c["ks"], c["vs"])
    tol = TOL[dtype]
    assert q.shape == qr.shape and q.dtype == qr.dtype and rel(q, qr) < tol
    assert torch.equal(h, hr)
    for a, b in ((c["kc"], c["kc2"]), (c["vc"], c["vc2"])):
        if a.dtype == F8:
            # within one e4m3 step (another accumulation order may cross a rounding boundary), or
            # the CPU interpreter's lost round-up carry (test_fp8._interpreter_rounding)
            assert bool(_interpreter_rounding(a, b).all())
        else:
            assert rel(a, b) < tol
    free = torch.ones(c["kc"].shape[:2], dtype=torch.bool, device=DEV).flatten()
    free[c["slots"][c["slots"] >= 0]] = False  # the slots not written keep their bits
    for a, b in ((c["kc"], c["kc2"]), (c["vc"], c["vc2"])):
        assert torch.equal(a.flatten(0, 1)[free].float(), b.flatten(0, 1)[free].float())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 9), hq=st.integers(1, 5), hkv=st.integers(1, 3), D=st.sampled_from([4, 8, 16, 32]),
       H=st.integers(1, 72), split=st.integers(1, 4), bn=st.sampled_from([2, 8, 16, 32]),
       bk=st.sampled_from([16, 32]), dot=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       fp8=st.booleans(), res=st.booleans(), preload=st.booleans(), seed=st.integers(0, 2**16))
def test_qkv_rope_epilogue_matches_reference(M, hq, hkv, D, H, split, bn, bk, dot, dtype, fp8, res, preload, seed):
    """The qkv GEMM with the rmsnorm prologue and the rotary + KV-write epilogue = the unfused
    reference (rmsnorm, qkv, rope_kv_write) for any heads, head dim, rows, tile (column pairs
    across heads and the q | k | v boundaries), split count, dtype, cache (fp8: its scales) and
    padding rows (slot -1: nothing written, every other slot's bits kept), with or without the
    first weight tile preloaded (programmatic dependent launch's order)."""
    _common.POISON_OUTPUTS = True
    dot = dot or M > 4
    cfg = GemvConfig(block_n=bn, block_k=bk, split_k=split, num_warps=4, use_dot=dot)
    c = qkv_case(M, hq, hkv, D, H, dtype, fp8, res, seed)
    rope = RopeKV(c["pos"], c["cs"], c["kc"], c["vc"], c["slots"], hq, hkv, c["ks"], c["vs"])
    q, h = gemv_triton(c["x"], c["w"], cfg, prologue="rms", norm_weight=c["nw"], eps=1e-5, residual=c["res"],
                       rope=rope, preload=preload)
    check_qkv(c, q, h, hq, hkv, dtype)
    assert int(da._counters(torch.device(DEV), 1).abs().sum()) == 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rms_norm_qkv_rope_op_unfused_path(impl):
    """Without a table entry (or with impl='torch') the op is the unfused path -- rmsnorm +
    qkv, then rope_kv_write on the projection's views -- with the reference's result; with a
    config, the fused kernel's."""
    da.set_tuning(_table({}))
    for cfg in (None, GemvConfig(block_n=16, block_k=16, split_k=2, use_dot=False)):
        if cfg is not None and impl == "torch":
            continue
        c = qkv_case(3, 4, 2, 16, 48, torch.float32, False, True, seed=5)
        q, h = ops.rms_norm_qkv_rope(c["x"], c["nw"], 1e-5, c["w"], c["res"], c["pos"], c["cs"], c["kc"], c["vc"],
                                     c["slots"], 4, 2, impl=impl, config=cfg)
        check_qkv(c, q, h, 4, 2, torch.float32)


# ---------------------------------------------------------------------------------- model level
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96, vocab_size=80,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False)


def test_model_fused_decode_matches_unfused():
    """A tiny random model's decode logits with every linear on the small-M GEMM (rmsnorm and
    silu_mul fused into its prologue, split-K for some) = the unfused Triton path's (the norm
    and activation kernels, F.linear) = the torch path's."""
    from servesim.gpu_backend.model import LlamaModel

    dt = torch.float32
    m = LlamaModel(TINY, None, dtype=dt, device=DEV, impl="triton", seed=3)
    d = m.dims
    B, bs = 3, 4
    pool = m.make_kv_pool(num_blocks=12, block_size=bs)
    g = torch.Generator().manual_seed(0)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g).to(pool.kv))
    lens = torch.tensor([5, 9, 2], dtype=torch.int32)
    bt = torch.tensor([[1, 2, 0], [3, 4, 5], [6, 0, 0]], dtype=torch.int32)
    pos = (lens - 1).long()
    slots = torch.stack([bt[i, p // bs].long() * bs + p % bs for i, p in enumerate(pos)])
    ids = torch.tensor([7, 11, 13])
    args = [t.to(DEV) for t in (ids, pos, bt, lens, slots)]
    snapshot = pool.kv.clone()

    def run(model):
        pool.kv.copy_(snapshot)
        out = model.forward_decode(*args, kv_pool=pool)
        return out, pool.kv.clone()

    da.set_tuning(_table({}))
    unfused, kv_unfused = run(m)
    shapes = {"rms": [(d.q_size + 2 * d.kv_size, d.hidden_size), (2 * d.intermediate_size, d.hidden_size),
                      (d.vocab_size, d.hidden_size)],
              "none": [(d.hidden_size, d.q_size)], "silu": [(d.hidden_size, d.intermediate_size)]}
    picks = [GemvConfig(block_n=16, block_k=32, split_k=2, use_dot=False),
             GemvConfig(block_n=16, block_k=16, split_k=1, use_dot=True)]
    sms = _common.num_sms(torch.device(DEV))
    for cfg, rope in ((picks[0], False), (picks[1], False), (picks[0], True), (picks[1], True)):
        if rope:  # qkv + rotary + KV write in one kernel
            shapes[ops.QKV_ROPE] = [(d.q_size + 2 * d.kv_size, d.hidden_size)]
        entries = {gemv_key(dt, p, n, k, sms): [{"m": 4, "config": cfg.to_dict()}] for p, ns in shapes.items()
                   for n, k in ns}
        da.set_tuning(_table(entries))
        assert tuned_config(B, d.vocab_size, d.hidden_size, dt, torch.device(DEV), "rms") == cfg
        calls = []
        import servesim.kernels.gemv as gm
        orig = gm.gemv_triton

        def spy(*a, **kw):
            calls.append(kw.get("prologue", "none") + ("+rope" if kw.get("rope") is not None else ""))
            return orig(*a, **kw)

        gm.gemv_triton = spy
        try:
            fused, kv_fused = run(m)
        finally:
            gm.gemv_triton = orig
        # per layer: qkv (rms), o (none), gate_up (rms), down (silu); then lm_head (rms)
        assert calls == ["rms+rope" if rope else "rms", "none", "rms", "silu"] * d.num_layers + ["rms"]
        assert rel(fused, unfused) < 1e-5
        assert rel(kv_fused, kv_unfused) < 1e-6
    torch_model = LlamaModel(TINY, m.weights, dtype=dt, device=DEV, impl="torch")
    ref, _ = run(torch_model)
    assert rel(fused, ref) < 1e-5


# ---------------------------------------------------------------------------------- compiled for sm90
_AOT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from servesim.kernels import gemv as gm

fn = gm._gemv_kernel
ptrs = ["x_ptr", "r_ptr", "nw_ptr", "w_ptr", "y_ptr", "h_ptr"]
idx = fn.arg_names.index
out = []
for prologue, use_dot, bm, bn, bk, warps, stages, rope, pdl in json.loads(sys.argv[1]):
    sig = {n: "*bf16" for n in ptrs}
    sig.update(ws_ptr="*fp32", cnt_ptr="*i32", M="i32", N="i32", K="i32", tiles_per_split="i32", n_splits="i32",
               s_xm="i32", s_rm="i32", s_wn="i32", s_ym="i32", s_hm="i32", eps="fp32",
               pos_ptr="*i64", cs_ptr="*fp32", slot_ptr="*i64", kc_ptr="*bf16", vc_ptr="*bf16",
               inv_k_scale="fp32", inv_v_scale="fp32")
    sig.update({n: "i32" for n in ("s_cs", "s_kc_b", "s_kc_o", "s_kc_h", "s_vc_b", "s_vc_o", "s_vc_h", "page",
                                   "n_qh", "n_kvh")})
    const = dict(PROLOGUE=prologue, HAS_RES=prologue == 1, USE_DOT=use_dot, DOT_PREC="tf32", BLOCK_M=bm,
                 BLOCK_N=bn, BLOCK_K=bk, ROPE=bool(rope), HEAD_DIM=128 if rope else 2, KV_FP8=False,
                 PRELOAD=bool(pdl), GDC=bool(pdl))
    sig.update({n: "constexpr" for n in const})
    # the divisibility a real launch gets: 16-aligned pointers, strides and N, K multiples of 16
    attrs = {(idx(n),): [["tt.divisibility", 16]]
             for n in ptrs + ["ws_ptr", "cnt_ptr", "N", "K", "s_xm", "s_rm", "s_wn", "s_ym", "s_hm"]}
    src = ASTSource(fn=fn, signature=sig, constexprs={(idx(n),): v for n, v in const.items()}, attrs=attrs)
    opts = dict(num_warps=warps, **({"num_stages": stages} if stages else {}))
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    out.append(dict(wide=len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.b32|cp\.async\.cg\.shared\.global", ptx)),
                    narrow=len(re.findall(r"ld\.global(?:\.\w+)*\.b16\b", ptx)), local=".local" in ptx,
                    wait=len(re.findall(r"griddepcontrol\.wait", ptx)),
                    launch=len(re.findall(r"griddepcontrol\.launch_dependents", ptx))))
print(json.dumps(out))
"""


def test_weight_loads_are_vectorised_on_sm90():
    """Compiled ahead of time for an H100/H200 (Triton's bundled ptxas, no GPU; in a process
    of its own, without the interpreter), the weight stream is 16-byte loads (or cp.async into
    shared memory for tl.dot), never 2-byte ones -- what a mask at a run-time bound does to
    the loads, and to the bandwidth -- and nothing spills."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    variants = [(0, False, 1, 8, 512, 4, 0, 0), (1, True, 16, 64, 128, 4, 3, 0), (2, False, 2, 16, 256, 4, 0, 0),
                (1, False, 1, 8, 512, 4, 3, 0), (2, False, 1, 8, 1024, 8, 0, 0), (0, True, 16, 32, 256, 4, 3, 0),
                (1, False, 1, 16, 512, 4, 0, 1), (1, True, 16, 64, 128, 4, 3, 1)]  # the last two: qkv + rope
    # the same with programmatic dependent launch (the first weight tile preloaded, GDC's wait)
    variants = [(*v, 0) for v in variants] + [(*v, 1) for v in variants]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _AOT, json.dumps(variants)], capture_output=True, text=True,
                       env=env, cwd=root, timeout=300)
    if p.returncode != 0 and ("ImportError" in p.stderr or "unexpected keyword" in p.stderr):
        pytest.skip(f"this Triton's ahead-of-time API: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-2000:]
    for v, r in zip(variants, json.loads(p.stdout.strip().splitlines()[-1])):
        assert r["wide"] >= 4 and r["narrow"] <= 2 and not r["local"], (v, r)
        # PDL: one wait and one launch_dependents; none without
        assert (r["wait"], r["launch"]) == ((1, 1) if v[-1] else (0, 0)), (v, r)


# ---------------------------------------------------------------------------------- greedy argmax
@settings(max_examples=60, deadline=None)
@given(S=st.integers(1, 5), chunks=st.integers(1, 40), levels=st.integers(1, 6), seed=st.integers(0, 2**16),
       wide=st.booleans())
def test_greedy_argmax_is_argmax_first_maximum(S, chunks, levels, seed, wide):
    """The two-pass greedy argmax = ``argmax`` (its first maximum) on any logits, ties included
    (few distinct values: many ties within and across chunks); vocabularies that do not split
    into chunks take the plain argmax."""
    from servesim.gpu_backend.model import ARGMAX_CHUNK, greedy_argmax

    V = chunks * ARGMAX_CHUNK + (0 if wide else 7)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (S, V), generator=g).float()
    assert torch.equal(greedy_argmax(x), x.argmax(dim=-1))
    y = torch.randn(S, V, generator=g)
    assert torch.equal(greedy_argmax(y), y.argmax(dim=-1))
