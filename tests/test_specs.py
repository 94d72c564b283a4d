"""Model/hardware specs and the KV-pool memory budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from servesim.sim.memory import (
    FIXED_RESERVE_BYTES,
    default_activation_reserve_bytes,
    kv_bytes_per_block,
    kv_pool_blocks,
)
from servesim.sim.specs import (
    HARDWARE_DIR,
    MODELS_DIR,
    HardwareSpec,
    ModelSpec,
    bundled_hardware,
    bundled_models,
    load_hardware,
    load_model,
    rope_settings,
)
from servesim.sim.types import ConfigError

# Published parameter totals.
KNOWN_PARAMS = {
    "llama-3.2-1b": 1.24e9,
    "llama-3.1-8b": 8.03e9,
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.02e9,
    "llama-2-70b": 68.98e9,
    "llama-3.1-70b": 70.6e9,
}

QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 152064,
}

MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}


# --- models ----------------------------------------------------------------------------


def test_bundled_models_present():
    assert set(KNOWN_PARAMS) <= set(bundled_models())


@pytest.mark.parametrize("name,expected", sorted(KNOWN_PARAMS.items()))
def test_param_counts_match_published(name, expected):
    m = load_model(name)
    assert abs(m.params - expected) / expected < 0.005
    assert m.weight_bytes == 2 * m.params


def test_exact_param_counts():
    assert load_model("llama-3.1-8b").params == 8_030_261_248
    assert load_model("llama-2-7b").params == 6_738_415_616
    assert load_model("llama-3.2-1b").params == 1_235_814_400  # tied embeddings
    assert load_model("llama-2-70b").params == 68_976_648_192


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_param_counts_match_transformers(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((MODELS_DIR / f"{name}.json").read_text())
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == load_model(name).params


def test_derived_sizes_llama31_8b():
    m = load_model("llama-3.1-8b")
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (4096, 32, 32, 8, 128)
    assert m.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert m.rope_theta == 500000.0 and m.rope_scaling["rope_type"] == "llama3"
    assert m.rms_norm_eps == 1e-5 and m.max_position_embeddings == 131072
    f = m.linear_flops_per_token
    assert f["qkv"] == 2 * 4096 * (4096 + 2 * 1024)
    assert f["o"] == 2 * 4096 * 4096
    assert f["gate_up"] == 2 * 4096 * 2 * 14336
    assert f["down"] == 2 * 14336 * 4096
    assert f["lm_head"] == 2 * 4096 * 128256
    # Linear FLOPs per token = 2 x (params - embedding table).
    assert m.flops_per_token == 2 * (m.params - m.embedding_params - 32 * 2 * 4096 - 4096)


def test_llama32_1b_head_dim_and_tie():
    m = load_model("llama-3.2-1b")
    assert m.head_dim == 64 and m.tie_word_embeddings and m.lm_head_params == 0


def test_llama2_defaults():
    m = load_model("llama-2-7b")
    assert m.num_kv_heads == 32 and m.rope_theta == 10000.0 and m.rope_scaling is None
    assert m.head_dim == 128 and m.max_position_embeddings == 4096


def test_qwen2_and_mistral():
    q = ModelSpec.from_hf_config(QWEN2_7B, "qwen2-7b")
    assert q.qkv_bias and not q.o_bias and q.sliding_window is None
    assert abs(q.params - 7.62e9) / 7.62e9 < 0.005
    mi = ModelSpec.from_hf_config(MISTRAL_7B_V01, "mistral-7b")
    assert mi.sliding_window == 4096
    assert abs(mi.params - 7.24e9) / 7.24e9 < 0.005


def _v5_layout(cfg: dict) -> dict:
    """A classic config.json in the transformers >= 5 layout: the RoPE settings inside
    ``rope_parameters`` (with ``rope_theta``), no top-level ``rope_theta`` / ``rope_scaling``."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    out["rope_parameters"] = dict(cfg.get("rope_scaling") or {"rope_type": "default"}, rope_theta=cfg["rope_theta"])
    return out


def test_transformers5_rope_parameters_layout():
    """Regression (S9): a transformers >= 5 config (``rope_parameters``) read as rope_theta
    10000 and no scaling."""
    classic = json.loads((MODELS_DIR / "llama-3.1-8b.json").read_text())
    v5 = _v5_layout(classic)
    m = ModelSpec.from_hf_config(v5, "llama-3.1-8b")
    assert m.rope_theta == 500000.0
    assert m.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert m == ModelSpec.from_hf_config(classic, "llama-3.1-8b")
    # default RoPE in the new layout: no scaling, the theta it names
    q = ModelSpec.from_hf_config(_v5_layout(QWEN2_7B), "qwen2-7b")
    assert q.rope_theta == 1e6 and q.rope_scaling is None


# Real config.json files of other families (public Hugging Face values), beside the bundled ones.
HF_CONFIGS_DIR = Path(__file__).parent / "data" / "models"
HF_PARAMS = {"mistral-7b-v0.1": 7_241_732_096, "qwen2-7b": 7_615_616_512, "qwen3-8b": 8_190_735_360}
ALL_CONFIGS = sorted(MODELS_DIR.glob("*.json")) + sorted(HF_CONFIGS_DIR.glob("*.json"))
# keys a config.json may leave out (transformers then applies its per-family default)
OPTIONAL_KEYS = ("head_dim", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "sliding_window", "rope_theta", "hidden_act")


def _check_against_transformers(m: ModelSpec, hf) -> None:
    """Every field of `m` that transformers also derives, equal to its value."""
    assert m.model_type == hf.model_type
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
    # Qwen2's config has no head_dim: its attention takes hidden_size // num_attention_heads
    assert m.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert (m.intermediate_size, m.vocab_size) == (hf.intermediate_size, hf.vocab_size)
    assert m.tie_word_embeddings == hf.tie_word_embeddings
    assert m.rms_norm_eps == hf.rms_norm_eps
    assert m.max_position_embeddings == hf.max_position_embeddings
    rp = dict(hf.rope_parameters)
    assert m.rope_theta == rp.pop("rope_theta")
    assert m.rope_scaling == (None if rp == {"rope_type": "default"} else rp)
    sw = getattr(hf, "sliding_window", None)
    assert m.sliding_window == (sw if sw is not None and sw < hf.max_position_embeddings else None)


@pytest.mark.parametrize("drop", [False, True], ids=["as-published", "optional-keys-dropped"])
@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.stem)
def test_configs_match_transformers(path, drop, tmp_path):
    """Every bundled config and real configs of other families (Mistral, Qwen2, Qwen3) read
    as transformers reads them -- also with the optional keys left out (its per-family
    defaults), in its own >= 5 layout (`to_dict`), and after `to_hf_config`."""
    transformers = pytest.importorskip("transformers")
    cfg = json.loads(path.read_text())
    if drop:
        cfg = {k: v for k, v in cfg.items() if k not in OPTIONAL_KEYS}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    if hf.num_attention_heads % hf.num_key_value_heads:  # Qwen2's default of 32 KV heads, 28 heads
        with pytest.raises(ConfigError, match="num_key_value_heads: 32 does not divide"):
            ModelSpec.from_hf_config(cfg, path.stem)
        return
    m = ModelSpec.from_hf_config(cfg, path.stem)
    for hf in (hf, transformers.AutoConfig.for_model(**cfg)):
        _check_against_transformers(m, hf)
    new_layout = hf.to_dict()
    assert "rope_parameters" in new_layout and "rope_scaling" not in new_layout
    assert ModelSpec.from_hf_config(new_layout, path.stem) == m
    assert ModelSpec.from_hf_config(m.to_hf_config(), path.stem) == m


@pytest.mark.parametrize("name", sorted(HF_PARAMS))
def test_other_families_param_counts(name):
    """Biases (Qwen2's q/k/v) and Qwen3's per-head q/k norms are counted like transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((HF_CONFIGS_DIR / f"{name}.json").read_text())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    m = load_model(str(HF_CONFIGS_DIR / f"{name}.json"))
    assert m.params == sum(p.numel() for p in hf.parameters()) == HF_PARAMS[name]


@pytest.mark.parametrize("model_type", ["gemma2", "phi3", "deepseek_v3", "qwen2_moe"])
def test_other_families_are_refused(model_type):
    cfg = {**json.loads((HF_CONFIGS_DIR / "mistral-7b-v0.1.json").read_text()), "model_type": model_type}
    with pytest.raises(ConfigError) as e:
        ModelSpec.from_hf_config(cfg, "x", source="x.json")
    assert e.value.problems[0][0] == "x.json: model_type" and model_type in str(e.value)


def test_quantized_config_of_an_unmodelled_method_is_refused():
    cfg = json.loads((HF_CONFIGS_DIR / "qwen3-8b.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ConfigError) as e:
        ModelSpec.from_hf_config(cfg, "x", source="x.json")
    assert [loc for loc, _ in e.value.problems] == ["x.json: quantization_config.quant_method"]
    assert "bitsandbytes" in str(e.value) and "not supported" in str(e.value)
    # fp8 with 128x128 blocks (Qwen3-FP8's) is read (tests/test_quantization.py has the rest)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    assert ModelSpec.from_hf_config(cfg, "x", source="x.json").quant.label == "fp8-block"


@pytest.mark.parametrize("edit,key", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor"),
    ({"rope_scaling": "llama3"}, "rope_scaling"),
    ({"rope_scaling": None, "rope_parameters": [1]}, "rope_parameters"),
    ({"rope_theta": -1}, "rope_theta"),
    ({"rope_scaling": None, "rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, "rope_parameters"),
])
def test_bad_rope_settings_name_the_key(edit, key):
    cfg = {**json.loads((MODELS_DIR / "llama-3.1-8b.json").read_text()), **edit}
    with pytest.raises(ConfigError) as e:
        ModelSpec.from_hf_config(cfg, "x", source="x.json")
    assert f"x.json: {key}" in [loc for loc, _ in e.value.problems], e.value.problems


def test_rope_settings_layouts():
    base = {"max_position_embeddings": 4096}
    assert rope_settings(base) == (10000.0, None)
    assert rope_settings({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2}}) == (
        5e5, {"type": "linear", "factor": 2, "rope_type": "linear"})
    # llama3 without original_max_position_embeddings: transformers takes max_position_embeddings
    p = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 5e5}
    theta, sc = rope_settings({**base, "rope_parameters": p})
    assert theta == 5e5 and sc["original_max_position_embeddings"] == 4096 and "rope_theta" not in sc
    # rope_parameters' theta wins over a top-level one; rope_scaling over rope_parameters (transformers' order)
    default7 = {"rope_type": "default", "rope_theta": 7.0}
    assert rope_settings({**base, "rope_theta": 1.0, "rope_parameters": default7}) == (7.0, None)
    assert rope_settings({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                          "rope_parameters": p})[1] == {"rope_type": "linear", "factor": 2.0}


def test_load_model_case_insensitive_and_hf_ids():
    assert load_model("Llama-3.1-8B").name == "llama-3.1-8b"
    assert load_model("meta-llama/Llama-3.1-8B").params == load_model("llama-3.1-8b").params
    assert load_model("meta-llama/Meta-Llama-3.1-8B").name == "llama-3.1-8b"


def test_load_model_from_path_and_dir(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    shutil.copy(MODELS_DIR / "llama-3.1-8b.json", d / "config.json")
    by_dir = load_model("my-model", base_dir=tmp_path)
    by_file = load_model(str(d / "config.json"))
    assert by_dir.name == by_file.name == "my-model"
    assert by_dir == by_file
    assert by_dir.params == load_model("llama-3.1-8b").params


def test_unknown_model_lists_bundled():
    with pytest.raises(ConfigError) as e:
        load_model("gpt-17", location="exp.yaml: model")
    msg = str(e.value)
    assert "exp.yaml: model" in msg and "llama-3.1-8b" in msg


def test_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_model_type_names_file_and_key(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**MISTRAL_7B_V01, "model_type": "qwen2_moe"}))
    with pytest.raises(ConfigError) as e:
        load_model(str(p))
    assert f"{p}: model_type" in str(e.value) and "qwen2_moe" in str(e.value)


def test_missing_key_names_file_and_key(tmp_path):
    cfg = dict(MISTRAL_7B_V01)
    del cfg["num_hidden_layers"]
    p = tmp_path / "x.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_model(str(p))
    assert f"{p}: num_hidden_layers" in str(e.value)


def test_bad_values_reported_together():
    cfg = {**MISTRAL_7B_V01, "hidden_size": -1, "vocab_size": "big", "hidden_act": "gelu"}
    with pytest.raises(ConfigError) as e:
        ModelSpec.from_hf_config(cfg, "x", source="x.json")
    locs = {loc for loc, _ in e.value.problems}
    assert {"x.json: hidden_size", "x.json: vocab_size", "x.json: hidden_act"} <= locs


def test_invalid_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "llama",\n oops}')
    with pytest.raises(ConfigError, match="line 2"):
        load_model(str(p))


def test_tp_checks():
    m = load_model("llama-3.1-70b")
    assert m.kv_heads_per_gpu(4) == 2 and m.kv_heads_per_gpu(16) == 1
    m.check_tp(8)
    with pytest.raises(ConfigError):
        m.check_tp(3)


# --- hardware --------------------------------------------------------------------------


def test_bundled_hardware_loads():
    assert set(bundled_hardware()) == {"a100-80gb-sxm", "h100-pcie", "h100-sxm", "h200-sxm"}
    h = load_hardware("H100-SXM")
    assert h.name == "h100-sxm"
    assert h.achievable_bf16_flops == 790e12 and h.achievable_fp8_flops == 1400e12
    assert h.achievable_hbm_bytes_per_s == 3.0e12 and h.hbm_capacity_bytes == 80e9
    a = load_hardware("a100-80gb-sxm")
    assert a.peak_fp8_flops is None and a.achievable_bf16_flops < a.peak_bf16_flops
    h2 = load_hardware("h200-sxm")
    assert h2.hbm_capacity_bytes == 141e9 and h2.achievable_hbm_bytes_per_s > h.achievable_hbm_bytes_per_s


def _h100_dict():
    import yaml

    return yaml.safe_load((HARDWARE_DIR / "h100-sxm.yaml").read_text())


def test_hardware_user_copy(tmp_path):
    import yaml

    d = _h100_dict()
    d["name"] = "my-gpu"
    d["achievable_bf16_flops"] = "700e12"  # YAML 1.1 reads this as a string
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(d))
    h = load_hardware("gpu.yaml", base_dir=tmp_path)
    assert h.name == "my-gpu" and h.achievable_bf16_flops == 700e12


@pytest.mark.parametrize(
    "edit,key",
    [
        ({"hbm_bytes_per_s": -1}, "hbm_bytes_per_s"),
        ({"flops": 1.0}, "flops"),
        ({"achievable_hbm_bytes_per_s": None}, "achievable_hbm_bytes_per_s"),
        ({"achievable_bf16_flops": 2000e12}, ""),  # above the peak
    ],
)
def test_hardware_errors_name_file_and_key(tmp_path, edit, key):
    import yaml

    d = _h100_dict()
    d.update(edit)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as e:
        load_hardware(str(p))
    assert str(p) in str(e.value)
    if key:
        assert f"{p}: {key}" in str(e.value)


def test_hardware_missing_key(tmp_path):
    import yaml

    d = _h100_dict()
    del d["max_power_w"]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="max_power_w: missing key"):
        load_hardware(str(p))


def test_hardware_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\n  peak: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_hardware(str(p))


def test_hardware_from_dict_not_mapping():
    with pytest.raises(ConfigError):
        HardwareSpec.from_dict([1, 2], source="x.yaml")


# --- memory ----------------------------------------------------------------------------


def test_kv_pool_blocks_formula():
    m, h = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    reserve = 2e9
    blocks = kv_pool_blocks(m, h, 32, 0.9, reserve)
    expected = int(0.9 * (80e9 - m.weight_bytes - reserve) // (32 * 131072))
    assert blocks == expected
    assert kv_bytes_per_block(m, 32) == 32 * m.kv_bytes_per_token


def test_kv_pool_blocks_cap_and_tp():
    m, h = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    assert kv_pool_blocks(m, h, 32, 0.9, 1e9, max_tokens=1000) == 32  # ceil(1000/32)
    b1 = kv_pool_blocks(m, h, 32, 0.9, 1e9)
    b2 = kv_pool_blocks(m, h, 32, 0.9, 1e9, tp=2)
    assert b2 > 2 * b1  # half the KV per token per GPU and half the weights


def test_weights_do_not_fit():
    m, h = load_model("llama-2-70b"), load_hardware("h100-sxm")
    with pytest.raises(ConfigError) as e:
        kv_pool_blocks(m, h, 32, 0.9, 1e9, location="exp.yaml: variants[0]")
    msg = str(e.value)
    assert msg.startswith("exp.yaml: variants[0]: model llama-2-70b needs 138.0 GB of weights per GPU")
    assert "h100-sxm has 80.0 GB" in msg
    assert kv_pool_blocks(m, h, 32, 0.9, 1e9, tp=2) > 0


def test_no_room_for_kv():
    m, h = load_model("llama-3.1-70b"), load_hardware("h100-sxm")
    with pytest.raises(ConfigError, match="no room for the KV cache"):
        kv_pool_blocks(m, h, 32, 0.9, 20e9, tp=2)


def test_kv_pool_bad_args():
    m, h = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    with pytest.raises(ConfigError):
        kv_pool_blocks(m, h, 0, 0.9, 0)
    with pytest.raises(ConfigError):
        kv_pool_blocks(m, h, 32, 1.5, 0)


def test_default_activation_reserve():
    m = load_model("llama-3.1-8b")
    r1 = default_activation_reserve_bytes(m, 2048, max_batch_size=256)
    r2 = default_activation_reserve_bytes(m, 8192, max_batch_size=256)
    assert FIXED_RESERVE_BYTES < r1 < r2 < 8e9
    per_token = 2 * (2 * 4096 + 2 * 4096 + 2 * 1024 + 3 * 14336)
    assert r2 - r1 == 6144 * per_token
    assert default_activation_reserve_bytes(m, 8192, 2, max_batch_size=256) < r2
    assert default_activation_reserve_bytes(m, 8192) == r2  # default: 256 rows of logits
    assert default_activation_reserve_bytes(m, 8192, max_batch_size=1024) - r2 == 768 * 128256 * 8
