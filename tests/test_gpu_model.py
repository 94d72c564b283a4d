"""GPU-backend Llama model on CPU (fp32, torch references of the kernels) against HF transformers."""

from __future__ import annotations

import copy
import json
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from servesim.gpu_backend.kv_pool import KVPool  # noqa: E402
from servesim.gpu_backend.model import (AttnMetadata, ContextChunkInput, DecodeInput, LlamaModel,  # noqa: E402
                                        Sampler, build_attn_metadata, sample_tokens)
from servesim.gpu_backend.rope import build_cos_sin_cache  # noqa: E402
from servesim.gpu_backend.weights import (ModelDims, WeightLoadError, hf_tensor_shapes,  # noqa: E402
                                          load_safetensors_weights, random_weights, save_hf_checkpoint)
from servesim.sim.specs import ModelSpec, rope_settings  # noqa: E402
from servesim.sim.types import ConfigError  # noqa: E402

F32 = torch.float32
BLOCK = 4

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    # original context 64 with head_dim 16: the 8 frequencies fall in all three llama3 bands
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "torch_dtype": "float32",
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_state_dict(cfg: dict, seed: int, std: float = 0.1) -> dict[str, torch.Tensor]:
    """Random HF-named tensors; norms random around 1 so a mis-loaded norm shows."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        if len(shape) == 1:
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = std * torch.randn(shape, generator=g)
    return sd


def write_checkpoint(path, cfg: dict, sd: dict, shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    names = list(sd)
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in names[s * per:(s + 1) * per]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * 4 for t in sd.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


def load_hf(path):
    m = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=F32, attn_implementation="eager")
    return m.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny_llama"), TINY, hf_state_dict(TINY, seed=1), shards=2)


@pytest.fixture(scope="module")
def ours(ckpt):
    return LlamaModel.from_pretrained(ckpt, dtype=F32, device="cpu", impl="torch")


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_hf(ckpt)


def shuffled_blocks(num_blocks: int, seed: int) -> list[int]:
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    return ids


def prompt(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(TINY["vocab_size"]) for _ in range(n)]


# ----------------------------------------------------------------------------------------
# rope
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", [None, TINY["rope_scaling"], {"rope_type": "linear", "factor": 2.0}])
def test_rope_table_matches_transformers_exactly(scaling):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = dict(TINY, rope_scaling=copy.deepcopy(scaling), rope_theta=500000.0)
    emb = LlamaRotaryEmbedding(transformers.LlamaConfig(**cfg))
    pos = torch.arange(300)[None]
    cos, sin = emb(torch.zeros(1, dtype=F32), pos)
    theta, sc = rope_settings(cfg)
    table = build_cos_sin_cache(16, 300, theta, sc)
    assert torch.equal(table[:, :8], cos[0, :, :8])
    assert torch.equal(table[:, 8:], sin[0, :, :8])


def test_model_spec_in_transformers5_layout_builds_the_same_rope():
    """Regression (S9): a transformers >= 5 config (``rope_parameters``) built through
    `ModelSpec` gave the GPU model rope_theta 10000 and no scaling."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    classic = dict(TINY, rope_theta=500000.0)
    v5 = {k: v for k, v in classic.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(classic["rope_scaling"], rope_theta=500000.0)
    dims = ModelDims.from_spec(ModelSpec.from_hf_config(v5, "tiny"))
    assert dims.rope_theta == 500000.0 and dims.rope_scaling["rope_type"] == "llama3"
    assert dims == ModelDims.from_spec(ModelSpec.from_hf_config(classic, "tiny"))
    m = LlamaModel(ModelSpec.from_hf_config(v5, "tiny"), random_weights(classic), dtype=F32, device="cpu",
                   impl="torch", max_positions=300)
    emb = LlamaRotaryEmbedding(transformers.LlamaConfig(**v5))
    cos, sin = emb(torch.zeros(1, dtype=F32), torch.arange(300)[None])
    assert torch.equal(m.cos_sin[:, :8], cos[0, :, :8]) and torch.equal(m.cos_sin[:, 8:], sin[0, :, :8])


def test_rope_rejects_unknown_scaling():
    with pytest.raises(ValueError, match="yarn"):
        build_cos_sin_cache(16, 8, 10000.0, {"rope_type": "yarn", "factor": 4.0})


# ----------------------------------------------------------------------------------------
# logits and generation vs transformers
# ----------------------------------------------------------------------------------------


def test_prompt_logits_match_transformers(ours, hf):
    toks = prompt(23, seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor([toks])).logits[0]  # [T, V]
    blocks = shuffled_blocks(32, seed=4)[:6]

    # whole prompt in one chunk: last-token logits
    pool = ours.make_kv_pool(num_blocks=32, block_size=BLOCK)
    out = ours.step([ContextChunkInput(toks, 0, blocks, True)], [])
    assert out.shape == (1, TINY["vocab_size"])
    assert rel_err(out[0], ref[-1]) < 1e-4

    # chunked prefill over the cache (chunks of 5, 7, 11 tokens), each sampling
    pool.kv.zero_()
    start = 0
    for n in (5, 7, 11):
        out = ours.step([ContextChunkInput(toks[start:start + n], start, blocks, True)], [])
        start += n
        assert rel_err(out[0], ref[start - 1]) < 1e-4, start
    # logits are not degenerate
    assert ref[-1].std() > 0.1


def test_greedy_generation_matches_hf_generate(ours, hf):
    toks = prompt(17, seed=5)
    steps = 64
    gen_cfg = transformers.GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                            pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([toks]), generation_config=gen_cfg)[0, len(toks):].tolist()
    assert len(ref) == steps

    num_blocks, max_blocks = 64, 32
    pool = ours.make_kv_pool(num_blocks=num_blocks, block_size=BLOCK)
    blocks = shuffled_blocks(num_blocks, seed=6)[: -(-(len(toks) + steps) // BLOCK)]
    logits = ours.step([ContextChunkInput(toks, 0, blocks, True)], [])
    out = [int(sample_tokens(logits)[0])]
    # decode through the static-shape (graph) path: fixed-width block table
    bt = torch.zeros(1, max_blocks, dtype=torch.int32)
    bt[0, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    for _ in range(steps - 1):
        pos = len(toks) + len(out) - 1
        slot = blocks[pos // BLOCK] * BLOCK + pos % BLOCK
        logits = ours.forward_decode(torch.tensor([out[-1]]), torch.tensor([pos]), bt,
                                     torch.tensor([pos + 1], dtype=torch.int32), torch.tensor([slot]))
        out.append(int(sample_tokens(logits)[0]))
    assert out == ref


# ----------------------------------------------------------------------------------------
# packed batches: mixing requests changes nothing
# ----------------------------------------------------------------------------------------


def test_mixed_batch_equals_each_request_alone(ours):
    num_blocks = 48
    pool = ours.make_kv_pool(num_blocks=num_blocks, block_size=BLOCK)
    free = shuffled_blocks(num_blocks, seed=7)

    def take(n_tokens):
        n = -(-n_tokens // BLOCK)
        got = free[:n]
        del free[:n]
        return got

    a, b, c = prompt(13, 10), prompt(10, 11), prompt(9, 12)
    d1, d2 = prompt(6, 13), prompt(11, 14)
    blk = {"a": take(13), "b": take(10), "c": take(9), "d1": take(8), "d2": take(13)}

    # history: a's first 8 tokens are cached (prefix reuse / earlier chunk); d1, d2 prefilled
    ours.step([ContextChunkInput(a[:8], 0, blk["a"], False)], [])
    t1 = int(ours.step([ContextChunkInput(d1, 0, blk["d1"], True)], []).argmax())
    t2 = int(ours.step([ContextChunkInput(d2, 0, blk["d2"], True)], []).argmax())
    snapshot = pool.kv.clone()

    ctx = [ContextChunkInput(a[8:], 8, blk["a"], True),  # rest of a, over its cached prefix
           ContextChunkInput(b[:6], 0, blk["b"], False),  # first chunk of b: no sample
           ContextChunkInput(c, 0, blk["c"], True)]
    dec = [DecodeInput(t1, len(d1), blk["d1"]), DecodeInput(t2, len(d2), blk["d2"])]
    meta = build_attn_metadata(ctx, dec, BLOCK, "cpu")
    assert meta.sampling_chunks == (0, 2) and meta.num_sampling == 4
    assert meta.sample_indices.tolist() == [4, 5 + 6 + 8, 20, 21]
    batched = ours.forward(meta.input_ids, meta.positions, pool, meta)
    kv_batched = pool.kv.clone()
    # second iteration: b's last chunk with the two decodes
    dec2 = [DecodeInput(int(batched[2].argmax()), len(d1) + 1, blk["d1"]),
            DecodeInput(int(batched[3].argmax()), len(d2) + 1, blk["d2"])]
    batched2 = ours.step([ContextChunkInput(b[6:], 6, blk["b"], True)], dec2)

    pool.kv.copy_(snapshot)
    alone = torch.cat([ours.step([ctx[0]], []), ours.step([ctx[2]], []),
                       ours.step([], [dec[0]]), ours.step([], [dec[1]])])
    assert ours.step([ctx[1]], []).shape == (0, TINY["vocab_size"])
    assert rel_err(batched, alone) < 1e-5
    for r in range(4):
        assert rel_err(batched[r], alone[r]) < 1e-5, r
    assert rel_err(pool.kv, kv_batched) < 1e-5
    alone2 = torch.cat([ours.step([ContextChunkInput(b[6:], 6, blk["b"], True)], []),
                        ours.step([], [dec2[0]]), ours.step([], [dec2[1]])])
    assert rel_err(batched2, alone2) < 1e-5


def test_forward_decode_matches_forward_with_padding_rows(ours):
    pool = ours.make_kv_pool(num_blocks=16, block_size=BLOCK)
    p1, p2 = prompt(7, 20), prompt(5, 21)
    b1, b2 = [3, 9], [12, 0]
    ours.step([ContextChunkInput(p1, 0, b1, False), ContextChunkInput(p2, 0, b2, False)], [])
    snapshot = pool.kv.clone()
    ref = ours.step([], [DecodeInput(11, 7, b1), DecodeInput(22, 5, b2)])
    pool.kv.copy_(snapshot)
    # graph-style call: batch padded to 4, padding rows write nothing (slot -1)
    bt = torch.zeros(4, 8, dtype=torch.int32)
    bt[0, :2], bt[1, :2] = torch.tensor(b1), torch.tensor(b2)
    got = ours.forward_decode(torch.tensor([11, 22, 0, 0]), torch.tensor([7, 5, 0, 0]), bt,
                              torch.tensor([8, 6, 1, 1], dtype=torch.int32),
                              torch.tensor([9 * BLOCK + 3, 0 * BLOCK + 1, -1, -1]))
    assert rel_err(got[:2], ref) < 1e-6
    # only the two real tokens were written
    changed = (pool.kv != snapshot).flatten(4).any(-1).any(0).any(0)  # [blocks, block_size]
    assert changed.nonzero().tolist() == [[0, 1], [9, 3]]


def test_metadata_layout_and_errors():
    meta = build_attn_metadata([([5, 6, 7], 2, [4, 1], True), ([8], 0, [2], False)],
                               [(9, 6, [0, 3])], block_size=4)
    assert isinstance(meta, AttnMetadata)
    assert meta.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert meta.positions.tolist() == [2, 3, 4, 0, 6]
    assert meta.slot_mapping.tolist() == [4 * 4 + 2, 4 * 4 + 3, 1 * 4 + 0, 2 * 4 + 0, 3 * 4 + 2]
    assert meta.ctx_cu_q_lens.tolist() == [0, 3, 4] and meta.ctx_seq_lens.tolist() == [5, 1]
    assert meta.ctx_block_tables.tolist() == [[4, 1], [2, 0]]
    assert meta.dec_block_tables.tolist() == [[0, 3]] and meta.dec_seq_lens.tolist() == [7]
    assert meta.sample_indices.tolist() == [2, 4]
    assert meta.ctx_block_tables.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64
    with pytest.raises(ValueError, match="needs 2 blocks"):
        build_attn_metadata([([1, 2, 3], 3, [0], True)], [], block_size=4)
    m = LlamaModel(TINY, random_weights(TINY), dtype=F32, device="cpu", impl="torch", max_positions=8)
    pool = m.make_kv_pool(4, BLOCK)
    late = build_attn_metadata([], [(1, 8, [0, 1, 2])], block_size=BLOCK)
    with pytest.raises(ValueError, match="rope table"):
        m.forward(late.input_ids, late.positions, pool, late)


# ----------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------


def test_tied_embeddings(tmp_path):
    cfg = dict(TINY, tie_word_embeddings=True)
    sd = hf_state_dict(cfg, seed=2)
    assert "lm_head.weight" not in sd
    path = write_checkpoint(tmp_path / "tied", cfg, sd)
    m = LlamaModel.from_pretrained(path, dtype=F32, device="cpu", impl="torch")
    assert m.weights.tied
    toks = prompt(9, seed=8)
    m.make_kv_pool(num_blocks=8, block_size=BLOCK)
    out = m.step([ContextChunkInput(toks, 0, [5, 2, 7], True)], [])
    with torch.no_grad():
        ref = load_hf(path)(torch.tensor([toks])).logits[0, -1]
    assert rel_err(out[0], ref) < 1e-4


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    sd = hf_state_dict(TINY, seed=3)
    del sd["model.layers.1.mlp.up_proj.weight"]
    path = write_checkpoint(tmp_path / "missing", TINY, sd)
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_safetensors_weights(TINY, path)

    sd = hf_state_dict(TINY, seed=3)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    path = write_checkpoint(tmp_path / "misshaped", TINY, sd, shards=2)
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(16, 64\)"):
        load_safetensors_weights(TINY, path)


def test_random_weights_are_deterministic_and_roundtrip(tmp_path):
    w1 = random_weights(TINY, seed=4)
    w2 = random_weights(TINY, seed=4)
    w3 = random_weights(TINY, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(w1.tensors(), w2.tensors()))
    assert not torch.equal(w1.embed, w3.embed)
    assert abs(float(w1.layers[0].qkv.std()) - 0.02) < 0.002
    assert torch.equal(w1.final_norm, torch.ones(64))
    # save in HF naming (sharded) and load back: fused tensors identical
    path = save_hf_checkpoint(w1, TINY, tmp_path / "rand", num_shards=3)
    w4 = load_safetensors_weights(json.loads((path / "config.json").read_text()), path)
    assert all(torch.equal(a, b) for a, b in zip(w1.tensors(), w4.tensors()))
    # a model over random weights gives non-degenerate logits
    m = LlamaModel(TINY, w1, dtype=F32, device="cpu", impl="torch")
    m.make_kv_pool(8, BLOCK)
    logits = m.step([ContextChunkInput(prompt(12, 9), 0, [0, 1, 2], True)], [])
    assert torch.isfinite(logits).all() and float(logits.std()) > 1e-3


def test_model_dims_from_spec():
    d = ModelDims.from_spec(TINY)
    assert (d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim, d.q_size, d.kv_size) == (2, 4, 2, 16, 64, 32)
    assert d.rope_scaling["rope_type"] == "llama3"
    # transformers>=5 layout: rope settings inside rope_parameters
    new = {k: v for k, v in TINY.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = dict(TINY["rope_scaling"], rope_theta=10000.0)
    assert ModelDims.from_spec(new) == d
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ModelDims.from_spec({k: v for k, v in TINY.items() if k != "num_attention_heads"})


@pytest.mark.parametrize("name,what", [("qwen2-7b", r"biases \(qkv_bias\)"), ("qwen3-8b", "qk_norm"),
                                       ("mistral-7b-v0.1", "sliding-window attention")])
def test_model_dims_refuse_what_the_backend_lacks(name, what):
    from pathlib import Path

    from servesim.sim.specs import load_model

    spec = load_model(str(Path(__file__).parent / "data" / "models" / f"{name}.json"))
    with pytest.raises(ValueError, match=what):
        ModelDims.from_spec(spec)
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        ModelDims.from_spec(dict(TINY, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match=r"biases \(qkv_bias, o_bias\)"):
        LlamaModel(dict(TINY, attention_bias=True), dtype=F32, device="cpu")


# ----------------------------------------------------------------------------------------
# KV pool and sampler
# ----------------------------------------------------------------------------------------


def test_kv_pool_block_ops():
    pool = KVPool(2, 6, BLOCK, 2, 16, F32, "cpu")
    assert pool.k_cache(1).shape == (6, BLOCK, 2, 16) and pool.k_cache(1).is_contiguous()
    pool.kv.normal_(generator=torch.Generator().manual_seed(0))
    before = pool.kv.clone()
    pool.copy_blocks([1, 2], [4, 1])  # overlapping: sources read first
    assert torch.equal(pool.kv[:, :, 4], before[:, :, 1]) and torch.equal(pool.kv[:, :, 1], before[:, :, 2])
    host = pool.to_host([4, 0])
    assert host.shape == (2, 2, 2, BLOCK, 2, 16) and host.device.type == "cpu"
    pool.from_host([5, 3], host)
    assert torch.equal(pool.kv[:, :, 5], pool.kv[:, :, 4]) and torch.equal(pool.kv[:, :, 3], before[:, :, 0])
    with pytest.raises(IndexError, match="out of range"):
        pool.copy_blocks([6], [0])
    per = KVPool.bytes_per_block(2, BLOCK, 2, 16, torch.float16)
    assert per == 2 * 2 * BLOCK * 2 * 16 * 2
    assert KVPool.from_memory_budget(10 * per + 5, 2, BLOCK, 2, 16, torch.float16, "cpu").num_blocks == 10
    with pytest.raises(ValueError, match="one KV block"):
        KVPool.from_memory_budget(per - 1, 2, BLOCK, 2, 16, torch.float16, "cpu")


def test_sampler():
    logits = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_tokens(logits), logits.argmax(-1))
    s1, s2 = Sampler(seed=3), Sampler(seed=3)
    a, b = s1(logits, temperature=1.0), s2(logits, temperature=1.0)
    assert torch.equal(a, b) and a.dtype == torch.int64
    # tiny top_p keeps only the argmax; per-row temperature 0 is greedy
    assert torch.equal(s1(logits, temperature=1.0, top_p=1e-6), logits.argmax(-1))
    temp = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    got = s1(logits, temperature=temp)
    assert torch.equal(got[temp == 0], logits.argmax(-1)[temp == 0])
    # the exponential race samples from softmax: frequencies of a 3-way distribution
    probs = torch.tensor([0.5, 0.3, 0.2])
    draws = Sampler(seed=1)(probs.log().expand(20000, 3).contiguous(), temperature=1.0)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.02)
    # top_p=0.6 keeps {0.5, 0.3} renormalised
    draws = Sampler(seed=2)(probs.log().expand(20000, 3).contiguous(), temperature=1.0, top_p=0.6)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0]), atol=0.02)


# ----------------------------------------------------------------------------------------
# on a CUDA GPU (Triton kernels): skipped without one
# ----------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_pair(ckpt):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ours32 = LlamaModel.from_pretrained(ckpt, dtype=F32, device="cuda")
    hf32 = load_hf(ckpt).cuda()
    return ours32, hf32


@pytest.mark.gpu
@cuda
def test_gpu_fp32_logits_and_greedy_match_hf(gpu_pair):
    m, hf_m = gpu_pair
    toks = prompt(23, seed=3)
    with torch.no_grad():
        ref = hf_m(torch.tensor([toks], device="cuda")).logits[0]
    m.make_kv_pool(num_blocks=64, block_size=BLOCK)
    blocks = shuffled_blocks(64, seed=4)[:24]
    out = m.step([ContextChunkInput(toks, 0, blocks, True)], [])
    assert rel_err(out[0], ref[-1]) < 1e-4
    steps = 64
    gen_cfg = transformers.GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                            pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        want = hf_m.generate(torch.tensor([toks], device="cuda"), generation_config=gen_cfg)[0, len(toks):].tolist()
    got = [int(out[0].argmax())]
    for _ in range(steps - 1):
        pos = len(toks) + len(got) - 1
        got.append(int(m.step([], [DecodeInput(got[-1], pos, blocks)])[0].argmax()))
    assert got == want


@pytest.mark.gpu
@cuda
def test_gpu_bf16_close_to_hf(ckpt):
    m = LlamaModel.from_pretrained(ckpt, dtype=torch.bfloat16, device="cuda")
    hf_m = transformers.LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).cuda().eval()
    toks = prompt(40, seed=9)
    with torch.no_grad():
        ref = hf_m(torch.tensor([toks], device="cuda")).logits[0].float()
    m.make_kv_pool(num_blocks=32, block_size=16)
    out = m.step([ContextChunkInput(toks[:25], 0, [7, 3, 30], True)], [])
    out2 = m.step([ContextChunkInput(toks[25:], 25, [7, 3, 30], True)], [])
    assert rel_err(out[0], ref[24]) < 3e-2 and rel_err(out2[0], ref[-1]) < 3e-2


@pytest.mark.gpu
@cuda
def test_gpu_mixed_batch_and_cuda_graph_decode(gpu_pair):
    m, _ = gpu_pair
    pool = m.make_kv_pool(num_blocks=64, block_size=BLOCK)
    free = shuffled_blocks(64, seed=11)
    reqs = [(prompt(n, 30 + i), free[8 * i: 8 * i + 8]) for i, n in enumerate((13, 7, 20, 9))]
    first = m.step([ContextChunkInput(p, 0, b, True) for p, b in reqs], [])
    for i, (p, b) in enumerate(reqs):  # batched prefill == alone (KV is rewritten identically)
        assert rel_err(first[i], m.step([ContextChunkInput(p, 0, b, True)], [])[0]) < 1e-5
    snapshot = pool.kv.clone()
    nxt = first.argmax(-1).tolist()
    eager = m.step([], [DecodeInput(t, len(p), b) for t, (p, b) in zip(nxt, reqs)])

    # capture forward_decode at batch 8 (4 padding rows), replay, compare
    pool.kv.copy_(snapshot)
    B, MB = 8, 16
    ids, pos = torch.zeros(B, dtype=torch.int64, device="cuda"), torch.zeros(B, dtype=torch.int64, device="cuda")
    bt = torch.zeros(B, MB, dtype=torch.int32, device="cuda")
    sl = torch.ones(B, dtype=torch.int32, device="cuda")
    slots = torch.full((B,), -1, dtype=torch.int64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m.forward_decode(ids, pos, bt, sl, slots)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = m.forward_decode(ids, pos, bt, sl, slots)
    for i, (t, (p, b)) in enumerate(zip(nxt, reqs)):
        ids[i], pos[i], sl[i] = t, len(p), len(p) + 1
        bt[i, : len(b)] = torch.tensor(b, dtype=torch.int32)
        slots[i] = b[len(p) // BLOCK] * BLOCK + len(p) % BLOCK
    graph.replay()
    assert rel_err(static_out[:4], eager) < 1e-5
