"""The fp8 KV cache of the GPU backend (S7): e4m3 keys and values with per-tensor scales,
written by the RoPE + KV-write kernel and read (dequantised) by the paged decode and prefill
attention kernels.

* the Triton kernels against their torch references on the same fp8 cache (Triton's CPU
  interpreter runs e4m3 loads and stores; its fp32 -> e4m3 rounding faults are the ones
  test_fp8.py names, admitted here too; on a GPU the bytes must be equal);
* the fp8 references against the unquantised (fp32) ones: the error e4m3 allows;
* the pool: fp8 block moves copy bytes, scales are checked;
* the model and a ``kv_cache.dtype: fp8`` run through the GPU backend's runner on a CPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fp8 import _interpreter_rounding  # noqa: E402

from servesim.gpu_backend.kv_pool import KVPool  # noqa: E402
from servesim.gpu_backend.model import LlamaModel  # noqa: E402
from servesim.gpu_backend.rope import build_cos_sin_cache  # noqa: E402
from servesim.gpu_backend.weights import random_weights  # noqa: E402
from servesim.kernels import ops  # noqa: E402
from servesim.kernels.reference import (  # noqa: E402
    kv_dequantize,
    kv_quantize,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    rope_kv_write_ref,
)
from servesim.sim.specs import ModelSpec  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F8 = torch.float8_e4m3fn
HQ, HKV, D, BS = 4, 2, 32, 16
SCALES = st.sampled_from([1.0, 0.05, 0.37, 2.0])


def _table(rng: torch.Generator, n_seq: int, per: int, num_blocks: int) -> torch.Tensor:
    return torch.randperm(num_blocks, generator=rng)[: n_seq * per].view(n_seq, per).to(torch.int32)


def _fp8_cache(rng, num_blocks, mag, ks, vs):
    """Random keys / values of magnitude ``mag`` in an fp8 cache of scales ks / vs, and the
    fp32 cache of the same (unquantised) values."""
    k = torch.randn(num_blocks, BS, HKV, D, generator=rng) * mag
    v = torch.randn(num_blocks, BS, HKV, D, generator=rng) * mag
    return (kv_quantize(k, F8, ks), kv_quantize(v, F8, vs)), (k, v)


# ------------------------------------------------------------------------------- the write
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run; CUDA: test_on_cuda_fp8_write_is_exact")
@settings(max_examples=10, deadline=None)
@given(st.integers(1, 7), SCALES, SCALES, st.sampled_from([torch.float32, torch.float16]),
       st.integers(0, 2**31 - 1))
def test_rope_kv_write_kernel_matches_reference_fp8(T, ks, vs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, HQ, D, generator=g).to(dtype)
    k = (torch.randn(T, HKV, D, generator=g) * 3).to(dtype)
    v = (torch.randn(T, HKV, D, generator=g) * 3).to(dtype)
    k[0, 0, :4] = 1e4  # saturates: clamped to +-448 x scale, never inf / nan
    pos = torch.randint(0, 200, (T,), generator=g)
    slots = torch.randperm(4 * BS, generator=g)[:T]
    slots[-1] = -1  # padding: not written
    cs = build_cos_sin_cache(D, 256, 10000.0, None, device="cpu")
    caches = [torch.zeros(4, BS, HKV, D, dtype=F8) for _ in range(4)]
    qa, ka = ops.rope_kv_write(q, k, v, pos, cs, caches[0], caches[1], slots, impl="triton", k_scale=ks, v_scale=vs)
    kc, vc = caches[0], caches[1]
    qb, kb = rope_kv_write_ref(q, k, v, pos, cs, caches[2], caches[3], slots, ks, vs)
    torch.testing.assert_close(qa, qb, rtol=1e-3, atol=1e-3)
    for got, want in ((kc, caches[2]), (vc, caches[3])):
        same = got.float() == want.float()
        assert bool((same | _interpreter_rounding(got, want)).all())
        assert torch.isfinite(got.float()).all()
    assert float(kc.float().abs().max()) <= 448.0
    written = torch.zeros(4 * BS, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert not kc.view(4 * BS, -1)[~written].float().any()  # the padding token wrote nothing
    if T > 1:  # the 1e4 key saturates at 448 (x k_scale)
        assert float(kc[slots[0] // BS, slots[0] % BS, 0].float().abs().max()) == 448.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter's e4m3 rounding differs)")
def test_on_cuda_fp8_write_is_exact():
    g = torch.Generator().manual_seed(0)
    T = 33
    q, k, v = (torch.randn(T, h, D, generator=g).to(torch.bfloat16) * 4 for h in (HQ, HKV, HKV))
    pos, slots = torch.arange(T), torch.randperm(4 * BS, generator=g)[:T]
    cs = build_cos_sin_cache(D, 256, 10000.0, None, device="cpu")
    a = [torch.zeros(4, BS, HKV, D, dtype=F8, device="cuda") for _ in range(2)]
    b = [torch.zeros(4, BS, HKV, D, dtype=F8) for _ in range(2)]
    ops.rope_kv_write(*(t.cuda() for t in (q, k, v, pos, cs)), *a, slots.cuda(), impl="triton", k_scale=0.3,
                      v_scale=1.7)
    rope_kv_write_ref(q, k, v, pos, cs, *b, slots, 0.3, 1.7)
    for x, y in zip(a, b):
        assert torch.equal(x.cpu().view(torch.uint8), y.view(torch.uint8))


# ------------------------------------------------------------------------------- the reads
@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 70), min_size=1, max_size=4), SCALES, SCALES, st.floats(0.1, 30.0),
       st.integers(0, 2**31 - 1))
def test_decode_kernel_matches_reference_on_fp8_cache(lens, ks, vs, mag, seed):
    g = torch.Generator().manual_seed(seed)
    B, per = len(lens), 5
    (kc, vc), _ = _fp8_cache(g, B * per + 2, mag, ks, vs)
    bt = _table(g, B, per, B * per + 2)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(B, HQ, D, generator=g)
    want = paged_decode_attention_ref(q, kc, vc, bt, sl, D ** -0.5, None, ks, vs)
    for splits in (1, 3):
        got = ops.paged_decode_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), bt.to(DEV), sl.to(DEV), D ** -0.5,
                                         num_splits=splits, impl="triton", k_scale=ks, v_scale=vs)
        torch.testing.assert_close(got.cpu(), want, rtol=2e-4, atol=2e-4 * mag * vs)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=3), SCALES, SCALES, st.sampled_from(["f16", "q", None]),
       st.sampled_from([None, 32, 128]), st.integers(0, 2**31 - 1))
def test_decode_kernel_fp8_cache_under_16_bit_queries(lens, ks, vs, kv_math, block_n, seed):
    """fp16 queries over an fp8 cache (the bf16 model's case; the interpreter has no bf16):
    the dots in fp16 (``kv_math="f16"``) or in q's dtype, the default byte-sized tiles or
    others, all equal to the fp32 reference of the same cache within fp16 rounding."""
    from servesim.kernels.decode_attention import DecodeConfig, paged_decode_attention_triton

    g = torch.Generator().manual_seed(seed)
    B, per = len(lens), 20
    (kc, vc), _ = _fp8_cache(g, B * per + 2, 16 * ks, ks, vs)  # ~ +-16 sigma in e4m3 units: normals
    bt = _table(g, B, per, B * per + 2)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = (torch.randn(B, HQ, D, generator=g) * ks).to(torch.float16)
    want = paged_decode_attention_ref(q.float(), kc, vc, bt, sl, D ** -0.5, None, ks, vs)
    cfg = DecodeConfig(kv_math=kv_math, block_n=block_n)
    for splits in (1, 3):
        got = paged_decode_attention_triton(q.to(DEV), kc.to(DEV), vc.to(DEV), bt.to(DEV), sl.to(DEV), D ** -0.5,
                                            num_splits=splits, k_scale=ks, v_scale=vs, config=cfg)
        assert got.dtype == torch.float16
        scale_v = float(kv_dequantize(vc, vs).abs().max())
        torch.testing.assert_close(got.cpu().float(), want, rtol=5e-3, atol=5e-3 * scale_v)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.sampled_from([64, 128, 256]),
       st.integers(1, 512), st.sampled_from([1, 2, 4, 8]), st.integers(16, 65536))
def test_fp8_cache_configs_are_sized_in_bytes_and_tuned_apart(dtype, head_dim, batch, group, max_len):
    """An fp8 cache's default tile and split bound hold twice the tokens of a 2-byte cache's
    (the same bytes); its tuning key differs from q's dtype's, so a table tuned for bf16
    caches is not applied to fp8 ones, nor the reverse."""
    from dataclasses import replace

    from servesim.kernels import decode_attention as da

    ref = da.default_config(batch, 8, max_len, head_dim, group, 132, dtype, dtype)
    f8 = da.default_config(batch, 8, max_len, head_dim, group, 132, dtype, F8)
    assert f8.block_n == 2 * ref.block_n and f8.min_split_tokens == 2 * ref.min_split_tokens
    assert f8.max_splits <= ref.max_splits and ref.kv_math is None
    assert f8.kv_math == ("q" if dtype == torch.float32 else "f16")
    k16 = da.tuning_key(dtype, group, 8, head_dim, 16, 132)
    k8 = da.tuning_key(dtype, group, 8, head_dim, 16, 132, F8)
    assert k16 == da.tuning_key(dtype, group, 8, head_dim, 16, 132, dtype) and k8 != k16
    tuned = replace(f8, num_warps=8, block_n=256, max_splits=1, kv_math="q")
    old = da.get_tuning()
    try:
        da.set_tuning({"version": da.TUNING_VERSION, "entries": {k8: [{"batch": batch, "config": tuned.to_dict()}]}})
        assert da.resolve_config(batch, 8, max_len, head_dim, group, 16, dtype, 132, None, F8) == tuned
        assert da.resolve_config(batch, 8, max_len, head_dim, group, 16, dtype, 132, None, dtype) == ref
    finally:
        da.set_tuning(old)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=3), SCALES, SCALES,
       st.integers(0, 2**31 - 1))
def test_prefill_kernel_matches_reference_on_fp8_cache(chunks, ks, vs, seed):
    g = torch.Generator().manual_seed(seed)
    N, per = len(chunks), 6
    (kc, vc), _ = _fp8_cache(g, N * per + 1, 2.0, ks, vs)
    bt = _table(g, N, per, N * per + 1)
    qlens = [c for c, _ in chunks]
    sl = torch.tensor([c + p for c, p in chunks], dtype=torch.int32)
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor(qlens), 0)), dtype=torch.int32)
    q = torch.randn(sum(qlens), HQ, D, generator=g)
    want = paged_prefill_attention_ref(q, kc, vc, bt, cu, sl, D ** -0.5, ks, vs)
    got = ops.paged_prefill_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), bt.to(DEV), cu.to(DEV), sl.to(DEV),
                                      D ** -0.5, impl="triton", k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-4, atol=2e-4 * 2.0 * vs)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=4), st.floats(0.05, 50.0), st.integers(0, 2**31 - 1))
def test_fp8_attention_is_within_e4m3_error_of_fp32(lens, mag, seed):
    """The dequantised cache is the fp32 one within e4m3's rounding (relative 2^-4 for
    normals, with a scale that puts the values in e4m3's normal range), so the attention
    output is within a few per cent of the unquantised output's magnitude."""
    g = torch.Generator().manual_seed(seed)
    B, per = len(lens), 4
    ks = vs = mag / 64  # values ~ +-64 x 4 sigma in e4m3 units: inside its range, far from subnormals
    (kc8, vc8), (kc, vc) = _fp8_cache(g, B * per, mag, ks, vs)
    back = kv_dequantize(kc8, ks)
    assert bool(((back - kc).abs() <= kc.abs() * 2 ** -4 + ks * 2 ** -9).all())
    bt = _table(g, B, per, B * per)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(B, HQ, D, generator=g) / mag  # scores O(1): the softmax neither flat nor one-hot
    ref = paged_decode_attention_ref(q, kc, vc, bt, sl, D ** -0.5)
    got = paged_decode_attention_ref(q, kc8, vc8, bt, sl, D ** -0.5, None, ks, vs)
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    assert err < 0.08, err


def test_scales_are_checked():
    kc = torch.zeros(2, BS, HKV, D)
    q = torch.zeros(1, HQ, D)
    bt, sl = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="only an fp8 cache"):
        ops.paged_decode_attention(q, kc, kc, bt, sl, 1.0, impl="torch", k_scale=0.5)
    with pytest.raises(ValueError, match="positive"):
        ops.paged_decode_attention(q, kc.to(F8), kc.to(F8), bt, sl, 1.0, impl="torch", v_scale=0.0)


# ------------------------------------------------------------------------------- the pool
def test_fp8_pool_moves_bytes_and_checks_scales():
    p = KVPool(2, 6, BS, HKV, D, F8, "cpu", k_scales=[0.5, 1.0], v_scales=2.0)
    assert p.k_scales == [0.5, 1.0] and p.v_scales == [2.0, 2.0] and p.is_fp8
    assert p.nbytes == 2 * 2 * 6 * BS * HKV * D  # one byte an element
    assert KVPool.bytes_per_block(2, BS, HKV, D, F8) * 6 == p.nbytes
    g = torch.Generator().manual_seed(3)
    p.kv.copy_((torch.randn(p.kv.shape, generator=g) * 10).to(F8))
    before = p.kv.view(torch.uint8).clone()
    p.copy_blocks([1, 2], [4, 5])
    assert torch.equal(p.kv.view(torch.uint8)[:, :, 4:6], before[:, :, 1:3])
    host = p.to_host([0, 3])
    assert host.dtype == F8
    p.kv.zero_()
    p.from_host([0, 3], host)
    assert torch.equal(p.kv.view(torch.uint8)[:, :, [0, 3]], before[:, :, [0, 3]])
    with pytest.raises(ValueError, match="k_scales"):
        KVPool(2, 1, BS, HKV, D, F8, "cpu", k_scales=[1.0])
    with pytest.raises(ValueError, match="fp8 pool only"):
        KVPool(2, 1, BS, HKV, D, torch.float32, "cpu", v_scales=0.5)


# ------------------------------------------------------------------------------- the model
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512)


def test_model_with_fp8_kv_against_the_unquantised_one():
    """Prefill + a few decode steps with the KV cache in e4m3 (scale 1) vs fp32: the logits
    within a few per cent (random weights; stated, not a promise for a checkpoint)."""
    spec = ModelSpec.from_hf_config(TINY, name="tiny")
    w = random_weights(TINY, seed=5, std=0.1)
    m32 = LlamaModel(spec, w, dtype=torch.float32, device="cpu", impl="torch")
    m8 = LlamaModel(spec.with_precision(kv_dtype="fp8"), w, dtype=torch.float32, device="cpu", impl="torch")
    assert m8.kv_cache_dtype == F8 and m32.kv_cache_dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (3, 20), generator=g).tolist()
    fed = torch.randint(0, 256, (4, 3), generator=g).tolist()  # the decode steps' input tokens, both models
    out = {}
    for name, m in (("fp32", m32), ("fp8", m8)):
        pool = m.make_kv_pool(3 * 4, BS)
        assert pool.dtype == m.kv_cache_dtype
        tables = [list(range(i * 4, (i + 1) * 4)) for i in range(3)]
        lg = [m.step([(p, 0, t, True) for p, t in zip(prompts, tables)], [], pool)]
        for j in range(4):
            lg.append(m.step([], [(fed[j][i], 20 + j, tables[i]) for i in range(3)], pool))
        out[name] = lg
    for a, b in zip(out["fp32"], out["fp8"]):
        rel = float((b - a).norm() / a.norm())
        assert rel < 0.05, rel


def test_gpu_backend_runs_an_fp8_kv_cache_on_cpu(tmp_path):
    """``kv_cache.dtype: fp8`` through the GPU backend's runner (torch references on a CPU):
    every request finishes with its tokens; an int8 KV cache is refused by name. On a CPU
    whatever the machine has: ``device="cpu"`` (with a CUDA device the runner would take it,
    and refuse the experiment's h100-sxm spec on any other GPU)."""
    from servesim.gpu_backend.runner import simulate_gpu
    from servesim.sim.config import load_experiment
    from servesim.sim.errors import ConfigError
    from servesim.sim.runner import resolve

    cfg = dict(TINY, architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, rope_theta=10000.0)
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    (tmp_path / "e.yaml").write_text(
        "name: kv8\nmodel: tiny.json\nhardware: h100-sxm\nkv_cache: {pool_tokens: 2048, tokens_per_block: 16, "
        "dtype: fp8}\nworkload:\n  synthetic:\n    num_requests: 6\n    arrival: {kind: offline}\n"
        "    prompt_len: 24\n    output_len: 8\nscheduler: {max_batch_size: 4, max_num_tokens: 64}\n"
        "output: {plots: false}\n")
    exp = load_experiment(tmp_path / "e.yaml", [])
    setup = resolve(exp.variants[0].config, exp.base_dir)
    assert setup.model.kv_dtype == "fp8"
    res = simulate_gpu(setup, check_invariants=True, dtype=torch.float32, device="cpu")
    assert res.gpu_stats["device"] == "cpu"
    assert res.summary["num_finished"] == 6
    assert all(len(t) == 8 for t in res.tokens.values())
    exp = load_experiment(tmp_path / "e.yaml", ["kv_cache.dtype=int8"])
    with pytest.raises(ConfigError, match="int8 KV cache"):
        simulate_gpu(resolve(exp.variants[0].config, exp.base_dir), dtype=torch.float32, device="cpu")


def test_calibrated_kv_scales_through_the_gpu_backend_on_cpu(tmp_path):
    """``kv_cache.scales: calibrated``: the runner prefills its seeded calibration prompts
    and the run's fp8 pool holds those per-layer scales (amax x 2 / 448: what
    `calibrated_kv_scales` gives for the same model), unit scales 1.0; the setting is checked
    (a bad value, a bf16 cache, tensor parallelism: errors at kv_cache.scales)."""
    from servesim.gpu_backend.runner import calibrated_kv_scales, model_dims, simulate_gpu
    from servesim.sim.config import load_experiment
    from servesim.sim.errors import ConfigError
    from servesim.sim.runner import resolve

    cfg = dict(TINY, architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, rope_theta=10000.0)
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    (tmp_path / "e.yaml").write_text(
        "name: kv8c\nmodel: tiny.json\nhardware: h100-sxm\nseed: 3\nkv_cache: {pool_tokens: 1024, "
        "tokens_per_block: 16, dtype: fp8, scales: calibrated}\nworkload:\n  synthetic:\n    num_requests: 3\n"
        "    arrival: {kind: offline}\n    prompt_len: 20\n    output_len: 4\nscheduler: {max_batch_size: 4, "
        "max_num_tokens: 64}\noutput: {plots: false}\n")

    def setup_of(*over):
        exp = load_experiment(tmp_path / "e.yaml", list(over))
        return resolve(exp.variants[0].config, exp.base_dir)

    setup = setup_of()
    res = simulate_gpu(setup, check_invariants=True, dtype=torch.float32, device="cpu")
    assert res.summary["num_finished"] == 3 and all(len(t) == 4 for t in res.tokens.values())
    m = LlamaModel(model_dims(setup), None, dtype=torch.float32, device="cpu", seed=3)
    ks, vs = calibrated_kv_scales(m, 3, 16)
    assert res.gpu_stats["kv_scales"] == {"k": ks, "v": vs}
    assert all(x != 1.0 for x in ks + vs)  # a small random model's keys and values are far from e4m3's 448
    unit = simulate_gpu(setup_of("kv_cache.scales=unit"), dtype=torch.float32, device="cpu")
    assert unit.gpu_stats["kv_scales"] == {"k": [1.0] * len(ks), "v": [1.0] * len(vs)}
    for over, words in ((["kv_cache.scales=amax"], "must be one of unit, calibrated"),
                        (["kv_cache.dtype=bf16"], "calibrated KV scales apply to an fp8 KV cache")):
        with pytest.raises(ConfigError, match=words) as e:
            setup_of(*over)
        assert "kv_cache.scales" in str(e.value)
    with pytest.raises(ConfigError, match="measured on one GPU") as e:
        simulate_gpu(setup_of("cluster.tensor_parallel=2", "kv_cache.max_tokens=1024"), dtype=torch.float32,
                     device="cpu")
    assert e.value.problems[0][0] == "kv_cache.scales"


def test_gpu_kv_fp8_benchmark_smoke(tmp_path):
    """benchmarks/gpu_kv_fp8.py --smoke on a CPU: every section runs and writes its table."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import gpu_kv_fp8
    finally:
        sys.path.remove(str(bench))
    assert gpu_kv_fp8.main(["--smoke", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_kv_fp8.md").read_text()
    assert "| 4 | 64 |" in md and "sim roofline" in md and "top-1 agreement" in md
    rows = (tmp_path / "gpu_kv_fp8.csv").read_text().splitlines()
    assert sum(r.startswith("decode,") for r in rows) == 2 and sum(r.startswith("quant,") for r in rows) == 4
    # packed for the device tool: the table, the csv and one archive holding the tuning table + the calibration
    import tarfile

    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted([*gpu_kv_fp8.KEEP, gpu_kv_fp8.PACK]), files
    with tarfile.open(tmp_path / gpu_kv_fp8.PACK) as tf:
        names = tf.getnames()
    assert any(n.startswith("tuning/") and n.endswith(".json") for n in names) and "decode_attention_kv.csv" in names


@settings(max_examples=25, deadline=None)
@given(st.floats(1e-4, 1e3), st.floats(1.0, 8.0), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_observed_scales_put_the_calibration_values_in_e4m3_range(mag, headroom, layers, seed):
    """Scales from a pool's amax: every calibration value quantises unsaturated, at most
    ``448 / headroom`` in e4m3 units, and its round trip is within e4m3's relative 2^-4 for
    values in its normal range (at every magnitude: what scale 1.0 cannot do for small ones)."""
    g = torch.Generator().manual_seed(seed)
    pool = KVPool(layers, 3, BS, HKV, D, torch.float32, "cpu")
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g) * mag)
    pool.kv[:, :, 2] = 0.0  # block 2 left out of the calibration
    ks, vs = pool.observed_scales([0, 1], headroom=headroom)
    assert len(ks) == len(vs) == layers
    for layer in range(layers):
        for x, s in ((pool.k_cache(layer)[:2], ks[layer]), (pool.v_cache(layer)[:2], vs[layer])):
            q = kv_quantize(x, F8, s)
            assert float(q.float().abs().max()) <= 448.0 / headroom * (1 + 2 ** -3)
            back = kv_dequantize(q, s)
            normal = x.abs() >= s * 2 ** -6
            assert bool(((back - x).abs()[normal] <= x.abs()[normal] * 2 ** -4).all())
    with pytest.raises(ValueError, match="headroom"):
        pool.observed_scales(headroom=0.5)
    with pytest.raises(ValueError, match="fp8 one"):
        KVPool(1, 1, BS, HKV, D, F8, "cpu").observed_scales()


def test_calibrated_kv_scales_beat_unit_scales_on_a_small_random_model():
    """A random model of small weights (std 0.002: keys and values ~1e-2, e4m3's subnormals at scale 1):
    the logits with calibrated per-layer scales closer to the unquantised ones than with
    scales 1.0, and within a few per cent (random weights: not a real model's figure)."""
    spec = ModelSpec.from_hf_config(TINY, name="tiny")
    w = random_weights(TINY, seed=5, std=0.002)
    m32 = LlamaModel(spec, w, dtype=torch.float32, device="cpu", impl="torch")
    m8 = LlamaModel(spec.with_precision(kv_dtype="fp8"), w, dtype=torch.float32, device="cpu", impl="torch")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (3, 20), generator=g).tolist()
    ks, vs = m32.calibrate_kv_scales(prompts[:2], BS)  # calibration prompts != the evaluated ones (all 3)
    assert all(0 < s < 0.5 for s in ks + vs)
    tables = [list(range(i * 4, (i + 1) * 4)) for i in range(3)]

    def logits(m, **sc):
        pool = KVPool(spec.num_layers, 12, BS, spec.num_kv_heads, spec.head_dim, m.kv_cache_dtype, "cpu", **sc)
        return m.step([(p, 0, t, True) for p, t in zip(prompts, tables)], [], pool)

    ref = logits(m32)
    err = {name: float((logits(m8, **sc) - ref).norm() / ref.norm())
           for name, sc in (("unit", {}), ("calibrated", {"k_scales": ks, "v_scales": vs}))}
    assert err["calibrated"] < err["unit"] and err["calibrated"] < 0.05, err


def test_kv_attention_sweep_measures_each_dtype_and_fits(tmp_path):
    """sim calibrate's decode attention sweep on a CPU (the interpreter): a checked row per KV
    dtype and size, a table sim/kv_attention.py reads back and fits."""
    from servesim.gpu_backend.kv_attention_sweep import kv_attention_sweep
    from servesim.sim import kv_attention

    spec = ModelSpec.from_hf_config(TINY, name="tiny")
    sizes = ((1, 40), (3, 80))
    rows = kv_attention_sweep(spec, ("bf16", "fp8"), sizes=sizes, reps=1, windows=1, block=16)
    assert [(r["kv_dtype"], r["batch"], r["ctx"]) for r in rows] == [
        (d, b, c) for b, c in sizes for d in ("bf16", "fp8")]
    assert all(r["us"] > 0 and r["config"].startswith("S") for r in rows)
    kv_attention.write_table(tmp_path / "k.csv", rows)
    back = kv_attention.read_table(tmp_path / "k.csv")
    assert [(r["kv_dtype"], r["batch"], r["ctx"]) for r in back] == [(r["kv_dtype"], r["batch"], r["ctx"]) for r in rows]
    with pytest.raises(ValueError, match="not measurable"):
        kv_attention_sweep(spec, ("int4",), sizes=sizes)
