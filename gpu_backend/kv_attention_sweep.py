"""The paged decode attention kernel alone per KV-cache dtype, for `sim calibrate --backend
gpu` (gpu_backend/profiler.py): the rows sim/kv_attention.py fits the cost model's
``kv_dequant_elements_per_s`` from (``kv_dtype, batch, ctx, us, config, source``)."""

from __future__ import annotations


from servesim.sim.specs import ModelSpec

# batch x context: small to large KV (the 8B's fp8 cache 33 MB .. 2.1 GB), as gpu_kv_fp8.py's kernel table
SIZES = ((16, 1024), (16, 4096), (64, 1024), (64, 4096), (256, 1024), (256, 4096))
# The model's own KV dtype at short and long contexts, at the decode graphs' padded batches where
# long-prompt serving spends its decode time (the Mooncake run of experiments/fidelity_long.yaml:
# 1-32, benchmarks/results/long_context_h200.md): the kernel's split bound is tuned per batch (at
# 1-4k contexts), so at 8-16k its per-token time differs by batch from what the grid's decode rows
# (<= 2k a request from batch 9) saw (2 splits at batch 24: the longest sequences' programs set
# the time). sim/kv_attention.py fit_long: the short (1-2k) and long (8-16k) slopes per batch.
# 32 kernels of <= 3 ms each (the largest, batch 64 at 16k: 6.4 GB of KV): seconds of device time.
LONG_SIZES = tuple((b, c) for b in (1, 8, 16, 24, 32, 40, 48, 64) for c in (1024, 2048, 8192, 16384))
KV_DTYPES = ("bf16", "fp8")
BLOCK = 32  # tokens per KV block: the serving runs'
FP8_SCALE = 4.0 / 448  # N(0, 1) values: ~ +-4 sigma -> +-448
TOL = 2e-2


def kv_attention_sweep(model: ModelSpec, kv_dtypes=KV_DTYPES, sizes=SIZES, tp: int = 1, device=None,
                       reps: int = 10, windows: int = 3, block: int = BLOCK) -> list[dict]:
    """One layer's decode attention (the installed tuning's config for its cache dtype) at
    each batch x context (lengths uniform in +-50% of it, seeded), bf16 queries; the fp8 cache
    holds e4m3 of the same values. Each output checked against the torch reference first
    (ValueError past ``TOL``). CUDA: ``reps`` back-to-back calls over enough layers' caches
    that the KV comes from HBM, between two events behind a spin kernel (gemm_sweep's
    method), the least of ``windows``; elsewhere the host's clock (tests)."""
    import torch

    from servesim.kernels import decode_attention as da
    from servesim.kernels._common import num_sms
    from servesim.kernels.reference import kv_quantize, paged_decode_attention_ref

    from .profiler import L2_BYTES, back_to_back_seconds

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    qdt = torch.bfloat16 if cuda else torch.float32
    hq, hkv, D = model.num_heads // tp, model.num_kv_heads // tp, model.head_dim
    scale = D ** -0.5
    bad = [k for k in kv_dtypes if k not in KV_DTYPES]
    if bad:
        raise ValueError(f"kv_attention_sweep: kv dtypes {bad} not measurable (choose from {KV_DTYPES})")
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for B, ctx in sizes:
        lens = torch.randint(max(1, ctx // 2), ctx + ctx // 2 + 1, (B,), generator=gen)
        width = -(-int(lens.max()) // block)
        nblk = B * width
        q = torch.randn(B, hq, D, generator=gen).to(dev, qdt)
        bt = torch.arange(nblk, dtype=torch.int32).view(B, width).to(dev)
        sl = lens.to(dev, torch.int32)
        kv_bytes = nblk * block * hkv * D * 2 * 2
        layers = max(2, -(-2 * L2_BYTES // kv_bytes)) if cuda else 1
        if cuda:  # drawn on the device: the long sizes' caches are GBs (seconds each on the host)
            dgen = torch.Generator(device=dev).manual_seed(B * 100003 + ctx)
            base = [torch.randn(nblk, block, hkv, D, generator=dgen, device=dev, dtype=qdt) for _ in range(2)]
        else:
            base = [torch.randn(nblk, block, hkv, D, generator=gen).to(dev, qdt) for _ in range(2)]
        for kvd in kv_dtypes:
            fp8 = kvd == "fp8"
            cdt = torch.float8_e4m3fn if fp8 else qdt
            ks = FP8_SCALE if fp8 else 1.0
            kc, vc = ((kv_quantize(x, cdt, ks) if fp8 else x) for x in base)
            caches = [(kc, vc)] + [(kc.clone(), vc.clone()) for _ in range(layers - 1)]
            cfg = da.resolve_config(B, hkv, width * block, D, hq // hkv, block, qdt, num_sms(dev), None, cdt)

            def call(i, cfg=cfg, ks=ks, caches=caches):
                k, v = caches[i % len(caches)]
                return da.paged_decode_attention_triton(q, k, v, bt, sl, scale, config=cfg, k_scale=ks, v_scale=ks)

            ref = paged_decode_attention_ref(q, kc, vc, bt, sl, scale, None, ks, ks)
            got = call(0)
            err = float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
            if not err <= TOL:
                raise ValueError(f"kv_attention_sweep: {kvd} B={B} ctx={ctx} {cfg.label()}: rel. error {err:.2e} "
                                 f"vs the torch reference (> {TOL:.0e})")
            s = back_to_back_seconds(call, reps, windows, cuda)
            out.append({"kv_dtype": kvd, "batch": B, "ctx": ctx, "us": s * 1e6, "config": cfg.label(),
                        "source": "sim calibrate --backend gpu (gpu_backend/kv_attention_sweep.py)",
                        "kv_sum": int(lens.sum()), "kv_max": int(lens.max())})
            del caches, kc, vc
        del base
        if cuda:
            torch.cuda.empty_cache()
    return out


def sweep_lengths(sizes, num_heads: int, head_dim: int) -> list[tuple[int, int]]:
    """(sum, longest) of the sequence lengths a CUDA sweep (`kv_attention_sweep`) drew at each of
    ``sizes`` (batch, ctx), ``num_heads`` query heads of ``head_dim`` a GPU: its seeded generator
    replayed (the lengths, then the queries, per size; a CUDA sweep draws the caches on the
    device). For tables written before the sweep recorded them (``kv_sum``, ``kv_max``)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for B, ctx in sizes:
        lens = torch.randint(max(1, ctx // 2), ctx + ctx // 2 + 1, (B,), generator=gen)
        torch.randn(B, num_heads, head_dim, generator=gen)
        out.append((int(lens.sum()), int(lens.max())))
    return out
