# temporary: timing sweep run once on the device machine to pick defaults; deleted after.
import sys

import torch
from triton.testing import do_bench, do_bench_cudagraph

from servesim.kernels.decode_attention import paged_decode_attention_triton as dec
from servesim.kernels.prefill_attention import paged_prefill_attention_triton as pre
from servesim.kernels.reference import paged_decode_attention_ref as dec_ref

dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
D = 128
mode = sys.argv[1]

if mode == "crash":
    Hq, Hkv, L = 32, 8, 8192
    for B, nb_total in ((1, 32768), (64, 32768), (1, 70000)):
        nblk = L // 16
        kc = torch.randn(nb_total, 16, Hkv, D, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nb_total, device=dev)[: B * nblk].int().view(B, nblk)
        if B == 1:
            bt = torch.arange(nb_total - nblk, nb_total, device=dev).int().view(1, nblk)
        sl = torch.full((B,), L, device=dev, dtype=torch.int32)
        qd = torch.randn(B, Hq, D, device=dev, dtype=dt)
        for splits in (1, 4):
            o = dec(qd, kc, vc, bt, sl, 0.08, splits, use_dot=True, block_n=32)
            torch.cuda.synchronize()
            r = dec_ref(qd[:1], kc, vc, bt[:1], sl[:1], 0.08)
            print(B, nb_total, splits, "err", ((o[:1].float() - r.float()).norm() / r.float().norm()).item(), flush=True)
        del kc, vc

if mode == "decode":
    print("== decode (Hq=32 D=128 bs=16 bf16), CUDA-graph timing: us / GB/s of KV read")
    for Hkv in (32, 4):
        Hq = 32
        for L in (1024, 8192):
            for B in (1, 4, 16, 64):
                if 4 * B * L * Hkv * D > 8e9:
                    continue
                nblk = L // 16
                num_blocks = B * nblk
                kc = torch.randn(num_blocks, 16, Hkv, D, device=dev, dtype=dt)
                vc = torch.randn_like(kc)
                bt = torch.randperm(num_blocks, device=dev).int().view(B, nblk)
                sl = torch.full((B,), L, device=dev, dtype=torch.int32)
                qd = torch.randn(B, Hq, D, device=dev, dtype=dt)
                kv_bytes = 2 * B * L * Hkv * D * 2
                row = []
                cfgs = [(True, 64)] + ([(False, 16), (False, 64)] if Hq // Hkv == 1 else [])
                for use_dot, bn in cfgs:
                    for splits in (1, 4, 16, 32):
                        t = do_bench_cudagraph(lambda: dec(qd, kc, vc, bt, sl, 0.08, splits, use_dot=use_dot, block_n=bn), rep=20)
                        row.append(f"d{int(use_dot)} n{bn} s{splits}: {t*1e3:.1f}us/{kv_bytes/t/1e6:.0f}")
                print(f"G={Hq//Hkv} L={L} B={B}: " + " | ".join(row), flush=True)
                del kc, vc

if mode == "prefill":
    print("== prefill (Hq=32 Hkv=8 D=128 bs=16 bf16): TFLOP/s (causal)")
    Hq, Hkv = 32, 8
    for nseq, qlen, ctx in ((1, 4096, 0), (8, 512, 0), (16, 256, 0), (4, 512, 2048)):
        Tt = nseq * qlen
        L = qlen + ctx
        nblk = L // 16
        kc = torch.randn(nseq * nblk, 16, Hkv, D, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nseq * nblk, device=dev).int().view(nseq, nblk)
        cu = torch.arange(0, Tt + 1, qlen, device=dev, dtype=torch.int32)
        sl = torch.full((nseq,), L, device=dev, dtype=torch.int32)
        qp = torch.randn(Tt, Hq, D, device=dev, dtype=dt)
        flops = 4 * nseq * qlen * (ctx + qlen / 2) * Hq * D
        row = []
        for bm, bn, nw, ns in ((128, 32, 4, 2), (128, 32, 4, 3), (128, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2),
                               (128, 64, 8, 3)):
            t = do_bench(lambda: pre(qp, kc, vc, bt, cu, sl, 0.08, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns))
            row.append(f"{bm}/{bn}/w{nw}/s{ns}: {flops/t/1e9:.0f}")
        print(f"N={nseq} q={qlen} ctx={ctx}: " + " | ".join(row), flush=True)
