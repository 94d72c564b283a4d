# temporary: timing sweep run once on the device machine to pick defaults; deleted after.
import torch
from triton.testing import do_bench

from servesim.kernels.activation import silu_mul_triton
from servesim.kernels.decode_attention import paged_decode_attention_triton as dec
from servesim.kernels.prefill_attention import paged_prefill_attention_triton as pre
from servesim.kernels.rmsnorm import rms_norm_triton
from servesim.kernels.rope import rope_kv_write_triton

dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)


def ms(f):
    return do_bench(f, warmup=10, rep=50)


print("== elementwise (T=4096)")
x = torch.randn(4096, 4096, device=dev, dtype=dt)
r = torch.randn_like(x)
w = torch.randn(4096, device=dev, dtype=dt)
t = ms(lambda: rms_norm_triton(x, w, 1e-6, r))
print(f"rms_norm+res H=4096: {t*1e3:.1f} us  {4*x.numel()*2/t/1e6:.0f} GB/s")
gu = torch.randn(4096, 2 * 14336, device=dev, dtype=dt)
t = ms(lambda: silu_mul_triton(gu))
print(f"silu_mul I=14336: {t*1e3:.1f} us  {1.5*gu.numel()*2/t/1e6:.0f} GB/s")
T, Hq, Hkv, D = 4096, 32, 8, 128
q = torch.randn(T, Hq, D, device=dev, dtype=dt)
k = torch.randn(T, Hkv, D, device=dev, dtype=dt)
v = torch.randn_like(k)
kc = torch.zeros(T // 16 + 1, 16, Hkv, D, device=dev, dtype=dt)
vc = torch.zeros_like(kc)
cs = torch.randn(8192, D, device=dev)
pos = torch.arange(T, device=dev)
slots = torch.randperm(T, device=dev)
t = ms(lambda: rope_kv_write_triton(q, k, v, pos, cs, kc, vc, slots))
byts = (q.numel() * 2 + k.numel() * 3 + v.numel() * 2) * 2
print(f"rope_kv_write T=4096: {t*1e3:.1f} us  {byts/t/1e6:.0f} GB/s")

print("== decode (Hq=32 Hkv=8 D=128 bs=16 bf16): us, GB/s of KV read")
for L in (1024, 4096):
    for B in (1, 8, 64, 256):
        nblk = L // 16
        num_blocks = B * nblk
        kc = torch.randn(num_blocks, 16, Hkv, D, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        bt = torch.randperm(num_blocks, device=dev).int().view(B, nblk)
        sl = torch.full((B,), L, device=dev, dtype=torch.int32)
        qd = torch.randn(B, Hq, D, device=dev, dtype=dt)
        kv_bytes = 2 * B * L * Hkv * D * 2
        row = []
        for use_dot in (False, True):
            for bn in (16, 32, 64):
                for splits in (None, 1):
                    try:
                        t = ms(lambda: dec(qd, kc, vc, bt, sl, 0.08, splits, use_dot=use_dot, block_n=bn))
                        row.append(f"dot={int(use_dot)} bn={bn} s={splits}: {t*1e3:.0f}us {kv_bytes/t/1e6:.0f}")
                    except Exception as e:  # noqa: BLE001
                        row.append(f"dot={int(use_dot)} bn={bn}: ERR {type(e).__name__}")
        print(f"L={L} B={B}: " + " | ".join(row), flush=True)
        del kc, vc

print("== prefill (Hq=32 Hkv=8 D=128 bs=16 bf16): TFLOP/s (causal)")
for nseq, qlen in ((1, 4096), (8, 512), (4, 1024)):
    Tt = nseq * qlen
    nblk = qlen // 16
    kc = torch.randn(nseq * nblk, 16, Hkv, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nseq * nblk, device=dev).int().view(nseq, nblk)
    cu = torch.arange(0, Tt + 1, qlen, device=dev, dtype=torch.int32)
    sl = torch.full((nseq,), qlen, device=dev, dtype=torch.int32)
    qp = torch.randn(Tt, Hq, D, device=dev, dtype=dt)
    flops = 4 * nseq * qlen * qlen / 2 * Hq * D
    row = []
    for bm, bn, nw, ns in ((64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (128, 32, 4, 2), (64, 32, 4, 3),
                           (128, 128, 8, 2), (256, 64, 8, 2)):
        try:
            t = ms(lambda: pre(qp, kc, vc, bt, cu, sl, 0.08, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns))
            row.append(f"{bm}/{bn}/w{nw}/s{ns}: {flops/t/1e9:.0f}")
        except Exception as e:  # noqa: BLE001
            row.append(f"{bm}/{bn}/w{nw}/s{ns}: ERR {type(e).__name__}")
    qs = qp.view(nseq, qlen, Hq, D).transpose(1, 2)
    ks = torch.randn(nseq, Hkv, qlen, D, device=dev, dtype=dt)
    vs = torch.randn_like(ks)
    t = ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
    row.append(f"SDPA(contig): {flops/t/1e9:.0f}")
    print(f"N={nseq} q={qlen}: " + " | ".join(row), flush=True)
