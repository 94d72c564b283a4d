"""Model and hardware specifications.

* :class:`ModelSpec` describes a dense Llama-family decoder (Llama, Mistral, Qwen2, Qwen3)
  as read from a Hugging Face ``config.json`` -- the one parser of that file. The simulator
  prices it; the GPU backend builds the real model from the very same object
  (`servesim.gpu_backend.weights.ModelDims` is a view of it), so every field it needs
  (RoPE settings, norm epsilon, biases) lives here. Both config layouts are read: the
  classic one (``rope_theta``, ``rope_scaling``) and transformers >= 5's
  (``rope_parameters``).
* :class:`HardwareSpec` describes one accelerator, read from a small YAML file a user
  can copy and edit (``sim/data/hardware/*.yaml``).

Both loaders accept a bundled name (case-insensitive, e.g. ``llama-3.1-8b`` or
``H100-SXM``) or a path, and raise :class:`~servesim.sim.types.ConfigError` naming the
file and the key for anything they cannot use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import load_json, load_yaml, validation_problems
from .types import ConfigError

DATA_DIR = Path(__file__).resolve().parent / "data"
MODELS_DIR = DATA_DIR / "models"
HARDWARE_DIR = DATA_DIR / "hardware"

# Bytes per element of the serving dtype. Checkpoints stored in fp32 are still served in
# bf16, so the serving dtype is a run setting (default bf16), not the checkpoint's.
DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4}

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")  # every decoder layer's MLP a routed mixture of experts
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# transformers' defaults for keys a config.json may leave out, per model_type; applying
# them is what `AutoConfig.from_pretrained` would do, not a guess of ours. head_dim None:
# hidden_size // num_attention_heads. num_key_value_heads and sliding_window: the default
# when the key is absent, while null means num_attention_heads / no window.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "head_dim": None,
              "num_key_value_heads": None, "sliding_window": None},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "head_dim": None,
                "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": None,
              "num_key_value_heads": 32, "sliding_window": 4096},
    "qwen3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": 128,
              "num_key_value_heads": 32, "sliding_window": 4096},
    # MoE families: the experts' keys are read by _moe_settings (transformers' defaults:
    # MixtralConfig 8 experts, top-2; Qwen3MoeConfig 128 experts, top-8, 768 wide)
    "mixtral": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "head_dim": None,
                "num_key_value_heads": 8, "sliding_window": None},
    "qwen3_moe": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": None,
                  "num_key_value_heads": 4, "sliding_window": 4096},
}
_MOE_DEFAULTS = {"mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
                 "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768}}

# ---------------------------------------------------------------------------------------
# RoPE settings
# ---------------------------------------------------------------------------------------

DEFAULT_ROPE_THETA = 10000.0  # transformers' default_theta of the supported model_types but:
_DEFAULT_THETA = {"mixtral": 1e6}
# RoPE types whose scaling needs the pre-training context (transformers falls back to
# max_position_embeddings), and the keys a type needs (checked when the config names it)
_ROPE_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    """The RoPE type of a ``rope_scaling`` dict (``default`` for None)."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def rope_settings(cfg: Mapping[str, Any], source: str = "config.json",
                  problems: list[tuple[str, str]] | None = None,
                  default_theta: float = DEFAULT_ROPE_THETA) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` of an HF config dict, the way transformers (>= 5)
    reads them: ``rope_scaling`` (classic layout) or else ``rope_parameters`` (new layout)
    holds the scaling; its ``rope_theta`` wins over a top-level one; ``llama3`` / ``yarn``
    / ``longrope`` scaling without ``original_max_position_embeddings`` takes
    ``max_position_embeddings``. ``rope_scaling`` comes back without ``rope_theta``, with
    ``rope_type`` set, and None for plain RoPE. Problems go to `problems` (raised as a
    ConfigError when it is None)."""
    own = problems is None
    problems = [] if own else problems
    params: Any = None
    where = "rope_scaling"
    for key in ("rope_scaling", "rope_parameters"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, Mapping):
            problems.append((f"{source}: {key}", f"expected an object or null, got {v!r}"))
        elif v and params is None:
            params, where = dict(v), key
    params = params or {}
    if params and any(isinstance(v, Mapping) for v in params.values()):
        problems.append((f"{source}: {where}", "RoPE settings per layer type are not supported (one set for "
                         "every layer)"))
        params = {}
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = cfg.get("rope_theta")
    if theta is None:
        theta = default_theta
    elif isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        problems.append((f"{source}: rope_theta", f"expected a positive number, got {theta!r}"))
        theta = DEFAULT_ROPE_THETA
    if cfg.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    kind = rope_type(params)
    params.setdefault("rope_type", kind)
    if kind in _ROPE_ORIGINAL_MAX:
        if cfg.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        elif cfg.get("max_position_embeddings") is not None:
            params.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    for k in _ROPE_KEYS.get(kind, ()):
        v = params.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            problems.append((f"{source}: {where}.{k}",
                             f"RoPE scaling of type {kind!r} needs a positive number, got {v!r}"))
    if own and problems:
        raise ConfigError(problems)
    plain = kind == "default" and set(params) <= {"rope_type", "type"}
    return float(theta), None if plain else params


# ---------------------------------------------------------------------------------------
# Precisions (quantization)
# ---------------------------------------------------------------------------------------

# Weight formats of the decoder layers' linears (qkv, o, gate_up, down). Embeddings,
# norms and lm_head stay in the serving dtype (bf16) in every scheme servesim models, as
# in vLLM's and TensorRT-LLM's fp8 / SmoothQuant / AWQ / GPTQ paths.
WEIGHT_PRECISIONS = ("bf16", "fp8", "int8", "int4")
# what a precision's GEMM multiplies in: W8A8 schemes quantise the activations too (fp8:
# e4m3 with dynamic per-token scales; int8: SmoothQuant W8A8, per-token); int4 is
# weight-only (W4A16: dequantised to bf16 inside the GEMM, bf16 math)
MATMUL_PRECISION = {"bf16": "bf16", "fp8": "fp8", "int8": "int8", "int4": "bf16"}
_WEIGHT_BITS = {"bf16": 16, "fp8": 8, "int8": 8, "int4": 4}
# the scale layouts each format may have (the first is its default)
_SCALES = {"bf16": ("none",), "fp8": ("tensor", "channel", "block"), "int8": ("channel", "tensor"),
           "int4": ("group", "channel")}
DEFAULT_GROUP_SIZE = 128  # int4 groups along the input dimension; fp8 block edge
# KV-cache element formats (one fp32 scale per layer and tensor: negligible bytes). int4
# KV is refused: 4-bit keys need per-group scales and kernels servesim does not model.
KV_DTYPES = ("bf16", "fp8", "int8")
_KV_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "fp8_e4m3": "fp8", "fp8-e4m3": "fp8",
               "float8_e4m3fn": "fp8", "int8": "int8"}


@dataclass(frozen=True)
class Quantization:
    """How the decoder layers' linear weights are stored and multiplied.

    ``weights``: bf16 | fp8 (e4m3) | int8 (SmoothQuant W8A8) | int4 (AWQ/GPTQ-style
    weight-only). ``scales``: none (bf16) | tensor | channel (one per output channel) |
    group (int4: one per ``group_size`` inputs and output channel) | block (fp8:
    ``group_size`` x ``group_size`` tiles). ``zero_point``: int4 with zero points (AWQ).
    ``source``: ``checkpoint`` when read from a config.json's ``quantization_config`` (the
    weights on disk are quantised), ``run`` when the run quantises a bf16 checkpoint."""

    weights: str = "bf16"
    scales: str = "none"
    group_size: int = 0
    zero_point: bool = False
    source: str = field(default="run", compare=False)

    @property
    def is_bf16(self) -> bool:
        return self.weights == "bf16"

    @property
    def matmul(self) -> str:
        """The precision the GEMM's tensor cores run: fp8, int8, or bf16 (bf16 and int4)."""
        return MATMUL_PRECISION[self.weights]

    @property
    def quantizes_activations(self) -> bool:
        """W8A8: each linear's input is quantised (a pass over the activations) first."""
        return self.weights in ("fp8", "int8")

    @property
    def label(self) -> str:
        """A short name that `parse_precision` reads back: bf16, fp8, fp8-channel,
        fp8-block, int8, int8-tensor, int4-g128, int4-g128-zp, int4-channel, ..."""
        if self.is_bf16:
            return "bf16"
        s = self.weights
        if self.scales != _SCALES[self.weights][0]:
            s += f"-{self.scales}"
        if self.scales == "group" or (self.scales == "block" and self.group_size != DEFAULT_GROUP_SIZE):
            s += f"-g{self.group_size}"
        if self.zero_point:
            s += "-zp"
        return s

    def weight_bytes(self, k: int, n: int, dtype_bytes: int = 2) -> int:
        """Bytes of a [k in, n out] weight in this format, scales included."""
        if self.is_bf16:
            return k * n * dtype_bytes
        return (k * n * _WEIGHT_BITS[self.weights] + 7) // 8 + self.scale_bytes(k, n)

    def scale_bytes(self, k: int, n: int) -> int:
        """Bytes of the scales (and zero points) of a [k, n] weight: fp32 per tensor,
        channel or block; fp16 per group (+ a packed 4-bit zero per group with zero points)."""
        if self.scales == "tensor":
            return 4
        if self.scales == "channel":
            return 4 * n
        g = self.group_size
        if self.scales == "block":
            return 4 * (-(-k // g)) * (-(-n // g))
        if self.scales == "group":
            groups = -(-k // g) * n
            return 2 * groups + ((groups + 1) // 2 if self.zero_point else 0)
        return 0


BF16 = Quantization()


def parse_precision(value: Any, location: str = "model_precision") -> Quantization:
    """A `Quantization` from a run setting: a name (``bf16``, ``fp8``, ``fp8-channel``,
    ``fp8-block``, ``int8``, ``int4``, ``int4-g64``, ``int4-g128-zp``, ...) or a mapping
    ``{weights, scales, group_size, zero_point}``. ConfigError at `location` otherwise."""
    if isinstance(value, Quantization):
        return value
    if isinstance(value, str):
        parts = value.strip().lower().replace("_", "-").split("-")
        if parts and parts[0] == "bfloat16":
            parts[0] = "bf16"
        if parts and parts[0] in ("w4a16", "awq", "gptq"):
            parts[0] = "int4"
        spec: dict[str, Any] = {"weights": parts[0] if parts else ""}
        for p in parts[1:]:
            if p in ("tensor", "channel", "group", "block"):
                spec["scales"] = p
            elif p == "zp":
                spec["zero_point"] = True
            elif p.startswith("g") and p[1:].isdigit():
                spec["group_size"] = int(p[1:])
            elif p == "e4m3" and spec["weights"] == "fp8":
                pass
            else:
                raise ConfigError(f"unknown precision {value!r} (expected one of bf16, fp8, fp8-channel, fp8-block, "
                                  "int8, int4, int4-g<N>, int4-g<N>-zp; or {weights, scales, group_size, "
                                  "zero_point})", location)
        value = spec
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a precision name (bf16, fp8, int8, int4, ...) or a mapping, got {value!r}",
                          location)
    unknown = sorted(set(value) - {"weights", "scales", "group_size", "zero_point"})
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(map(str, unknown))} (expected weights, scales, group_size, "
                          "zero_point)", location)
    w = value.get("weights", "bf16")
    if w not in WEIGHT_PRECISIONS:
        raise ConfigError(f"unknown weight precision {w!r} (expected one of {', '.join(WEIGHT_PRECISIONS)})",
                          f"{location}.weights" if not isinstance(w, str) or "weights" in value else location)
    scales = value.get("scales") or _SCALES[w][0]
    if scales not in _SCALES[w]:
        raise ConfigError(f"{w} weights take scales {' / '.join(_SCALES[w])}, not {scales!r}", f"{location}.scales")
    g = value.get("group_size")
    if scales in ("group", "block"):
        g = DEFAULT_GROUP_SIZE if g is None else g
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConfigError(f"group_size must be a positive integer, got {g!r}", f"{location}.group_size")
    elif g not in (None, 0):
        raise ConfigError(f"group_size applies to int4 group scales or fp8 block scales, not {w} {scales} scales",
                          f"{location}.group_size")
    else:
        g = 0
    zp = value.get("zero_point", False)
    if not isinstance(zp, bool):
        raise ConfigError(f"zero_point: expected true or false, got {zp!r}", f"{location}.zero_point")
    if zp and w != "int4":
        raise ConfigError(f"zero points apply to int4 weights, not {w}", f"{location}.zero_point")
    return Quantization(w, scales, g, zp)


def parse_kv_dtype(value: Any, location: str = "kv_cache.dtype") -> str:
    """bf16 | fp8 | int8 from a setting (ConfigError naming `location` otherwise; int4 is
    refused with its reason)."""
    v = value.strip().lower() if isinstance(value, str) else value
    if v in ("int4", "fp4", "nvfp4"):
        raise ConfigError(f"{v} KV caches are not supported: 4-bit keys and values need per-group scales and "
                          "attention kernels servesim does not model (use fp8 or int8)", location)
    if v not in _KV_ALIASES:
        raise ConfigError(f"unknown KV-cache dtype {value!r} (expected one of {', '.join(KV_DTYPES)}, or auto)",
                          location)
    return _KV_ALIASES[v]


def _kv_elem_bytes(kv_dtype: str, dtype_bytes: int) -> int:
    return dtype_bytes if kv_dtype == "bf16" else 1


def quantization_from_hf(qc: Any, source: str, hidden: int, inter: int,
                         problems: list[tuple[str, str]]) -> tuple[Quantization, str | None]:
    """The (weights, KV dtype or None) of a config.json's ``quantization_config``: the
    methods servesim models (fp8, fbgemm_fp8, awq / gptq with 4 bits, compressed-tensors
    W8A8 int8 / fp8 and W4A16, modelopt FP8). Anything else, or a config that does not fit
    the model (a group size that does not divide the layers' input sizes), goes to
    `problems`, located at the key."""
    loc = f"{source}: quantization_config"
    if not isinstance(qc, Mapping):
        problems.append((loc, f"expected an object, got {qc!r}"))
        return BF16, None
    method = qc.get("quant_method")
    supported = "fp8, fbgemm_fp8, awq, gptq, compressed-tensors, modelopt"
    q: Quantization | None = None
    kv: str | None = None

    def fail(key: str, msg: str) -> tuple[Quantization, None]:
        problems.append((f"{loc}.{key}" if key else loc, msg))
        return BF16, None

    if method == "fp8":
        block = qc.get("weight_block_size")
        if block is None:
            q = Quantization("fp8", "tensor", 0)
        elif (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and isinstance(block[0], int)
              and not isinstance(block[0], bool) and block[0] > 0):
            q = Quantization("fp8", "block", block[0])
        else:
            return fail("weight_block_size", f"expected two equal positive integers, got {block!r}")
        if qc.get("activation_scheme", "dynamic") not in ("dynamic", "static"):
            return fail("activation_scheme", f"expected dynamic or static, got {qc.get('activation_scheme')!r}")
    elif method == "fbgemm_fp8":
        q = Quantization("fp8", "channel", 0)
    elif method in ("awq", "gptq"):
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            return fail("bits", f"{method} with {bits!r} bits is not supported (4-bit weights only)")
        g = qc.get("group_size", qc.get("q_group_size", DEFAULT_GROUP_SIZE))
        if isinstance(g, bool) or not isinstance(g, int) or (g < 1 and g != -1):
            return fail("group_size", f"expected a positive integer or -1 (per channel), got {g!r}")
        zp = bool(qc.get("zero_point", True)) if method == "awq" else not bool(qc.get("sym", True))
        q = Quantization("int4", "channel", 0, zp) if g == -1 else Quantization("int4", "group", g, zp)
        if zp and g == -1:
            q = Quantization("int4", "channel", 0, False)
    elif method == "compressed-tensors":
        groups = qc.get("config_groups")
        if not isinstance(groups, Mapping) or not groups:
            return fail("config_groups", "expected an object of quantization groups")
        schemes = list(groups.items())
        if any(s != schemes[0][1] for _, s in schemes[1:]):
            return fail("config_groups", "groups with different schemes are not modelled (one scheme for every linear)")
        gname, scheme = schemes[0]
        if not isinstance(scheme, Mapping):
            return fail(f"config_groups.{gname}", "expected an object")
        w, a = scheme.get("weights") or {}, scheme.get("input_activations") or None
        key = f"config_groups.{gname}.weights"
        bits, typ, strat = w.get("num_bits"), w.get("type"), w.get("strategy")
        if (bits, typ) == (8, "float"):
            if a is None or (a.get("num_bits"), a.get("type")) != (8, "float"):
                return fail(f"config_groups.{gname}.input_activations", "fp8 weights with activations that are "
                            "not fp8 (weight-only fp8) are not modelled")
            scales = {"tensor": "tensor", "channel": "channel", "block": "block"}.get(strat)
            if scales is None:
                return fail(f"{key}.strategy", f"fp8 weights with strategy {strat!r}: expected tensor, channel or "
                            "block")
            bs = w.get("block_structure") or [DEFAULT_GROUP_SIZE, DEFAULT_GROUP_SIZE]
            q = Quantization("fp8", scales, bs[0] if scales == "block" else 0)
        elif (bits, typ) == (8, "int"):
            if a is None or (a.get("num_bits"), a.get("type")) != (8, "int"):
                return fail(f"config_groups.{gname}.input_activations", "int8 weights need int8 activations "
                            "(W8A8, SmoothQuant-style); weight-only int8 is not modelled")
            if strat not in ("channel", "tensor"):
                return fail(f"{key}.strategy", f"int8 weights with strategy {strat!r}: expected channel or tensor")
            q = Quantization("int8", strat, 0)
        elif (bits, typ) == (4, "int"):
            if a is not None:
                return fail(f"config_groups.{gname}.input_activations", "4-bit weights with quantised activations "
                            "(W4A8) are not modelled (W4A16 only)")
            if strat == "group":
                g = w.get("group_size")
                if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                    return fail(f"{key}.group_size", f"expected a positive integer, got {g!r}")
                q = Quantization("int4", "group", g, not w.get("symmetric", True))
            elif strat == "channel":
                q = Quantization("int4", "channel", 0)
            else:
                return fail(f"{key}.strategy", f"int4 weights with strategy {strat!r}: expected group or channel")
        else:
            return fail(key, f"{bits}-bit {typ} weights are not modelled (fp8, int8 W8A8 and int4 W4A16 are)")
        ignore = [i for i in qc.get("ignore") or [] if "lm_head" not in str(i)]
        if ignore:
            return fail("ignore", f"layers left unquantised ({', '.join(map(str, ignore[:3]))}) are not modelled "
                        "(every decoder linear is priced in one precision; lm_head stays bf16)")
        kvs = qc.get("kv_cache_scheme")
        if kvs:
            kv_key = (kvs.get("num_bits"), kvs.get("type")) if isinstance(kvs, Mapping) else None
            kv = {(8, "float"): "fp8", (8, "int"): "int8"}.get(kv_key)
            if kv is None:
                return fail("kv_cache_scheme", f"a KV cache of {kvs!r} is not modelled (8-bit float or int)")
    elif method == "modelopt":
        algo = qc.get("quant_algo")
        if algo != "FP8":
            return fail("quant_algo", f"modelopt {algo!r} is not modelled (FP8 only)")
        q = Quantization("fp8", "tensor", 0)
        kva = qc.get("kv_cache_quant_algo")
        if kva is not None:
            kv = {"FP8": "fp8", "INT8": "int8"}.get(kva)
            if kv is None:
                return fail("kv_cache_quant_algo", f"{kva!r} is not modelled (FP8 or INT8)")
    else:
        return fail("quant_method" if isinstance(qc, Mapping) and "quant_method" in qc else "",
                    f"quantized checkpoints of method {method!r} are not supported (supported: {supported})")
    if q.scales in ("group", "block"):
        bad = [f"{name} {size}" for name, size in (("hidden_size", hidden), ("intermediate_size", inter))
               if size % q.group_size]
        if bad:
            key = "weight_block_size" if method == "fp8" else "group_size"
            return fail(key if method in ("fp8", "awq", "gptq") else "config_groups",
                        f"group size {q.group_size} does not divide the model's {' and '.join(bad)}: this "
                        "quantization_config is not of this model")
    return replace(q, source="checkpoint"), kv


def quantization_to_hf(q: Quantization, kv_dtype: str = "bf16") -> dict | None:
    """A ``quantization_config`` that `quantization_from_hf` reads back to `q` (None for bf16)."""
    if q.is_bf16 and kv_dtype == "bf16":
        return None
    if q.weights == "fp8" and q.scales == "tensor" and kv_dtype == "bf16":
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if q.weights == "fp8" and q.scales == "block" and kv_dtype == "bf16":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [q.group_size] * 2}
    if q.weights == "int4" and kv_dtype == "bf16":
        g = q.group_size if q.scales == "group" else -1
        if q.zero_point:
            return {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm"}
        return {"quant_method": "gptq", "bits": 4, "group_size": g, "sym": True, "desc_act": False}
    if q.is_bf16:
        raise ValueError("a quantised KV cache without quantised weights has no quantization_config")
    w = {"num_bits": 8 if q.weights != "int4" else 4, "type": "float" if q.weights == "fp8" else "int",
         "strategy": q.scales, "symmetric": not q.zero_point, "dynamic": False}
    if q.scales == "group":
        w["group_size"] = q.group_size
    if q.scales == "block":
        w["block_structure"] = [q.group_size, q.group_size]
    scheme: dict[str, Any] = {"targets": ["Linear"], "weights": w}
    if q.quantizes_activations:
        scheme["input_activations"] = {"num_bits": 8, "type": w["type"], "strategy": "token", "dynamic": True}
    out: dict[str, Any] = {"quant_method": "compressed-tensors", "config_groups": {"group_0": scheme},
                           "ignore": ["lm_head"]}
    if kv_dtype != "bf16":
        out["kv_cache_scheme"] = {"num_bits": 8, "type": "float" if kv_dtype == "fp8" else "int",
                                  "strategy": "tensor", "dynamic": False}
    return out


def _moe_settings(cfg: Mapping[str, Any], mt: str, source: str, inter: int, get_int,
                  problems: list[tuple[str, str]]) -> tuple[int, int, int]:
    """(num_experts, num_experts_per_tok, expert width) of an MoE config (0, 0, 0 for a
    dense model_type): Mixtral's ``num_local_experts`` (its experts are
    ``intermediate_size`` wide), Qwen3-MoE's ``num_experts`` and ``moe_intermediate_size``
    (every layer sparse: ``decoder_sparse_step`` 1, no ``mlp_only_layers``)."""
    if mt not in MOE_MODEL_TYPES:
        return 0, 0, 0
    d = _MOE_DEFAULTS[mt]
    if mt == "mixtral":
        experts, width = get_int("num_local_experts", d["num_local_experts"]), inter
        ekey = "num_local_experts"
    else:
        experts, width = get_int("num_experts", d["num_experts"]), get_int("moe_intermediate_size",
                                                                           d["moe_intermediate_size"])
        ekey = "num_experts"
        step = cfg.get("decoder_sparse_step", 1)
        if step != 1:
            problems.append((f"{source}: decoder_sparse_step", f"{step!r}: only every layer sparse (1) is modelled "
                             "(dense and MoE layers mixed are not)"))
        if cfg.get("mlp_only_layers"):
            problems.append((f"{source}: mlp_only_layers", "dense MLP layers among the MoE ones are not modelled "
                             "(expected [] or null)"))
    top_k = get_int("num_experts_per_tok", d["num_experts_per_tok"])
    if top_k > experts:
        problems.append((f"{source}: num_experts_per_tok", f"{top_k} experts per token, but {ekey} is {experts}"))
    return experts, top_k, width


def _bundled(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if directory.is_dir():
        for p in sorted(directory.iterdir()):
            if p.suffix in suffixes:
                out[p.stem.lower()] = p
    return out


def bundled_models() -> list[str]:
    """Names of the model configs shipped in ``sim/data/models``."""
    return sorted(_bundled(MODELS_DIR, (".json",)))


def bundled_hardware() -> list[str]:
    """Names of the hardware files shipped in ``sim/data/hardware``."""
    return sorted(_bundled(HARDWARE_DIR, (".yaml", ".yml")))


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-family decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU MLP), dense or
    with a mixture of experts in every layer's MLP (Mixtral, Qwen3-MoE: ``num_experts`` > 0,
    each token routed to ``num_experts_per_tok`` of them, each expert a SwiGLU MLP of
    ``moe_intermediate_size``; ``intermediate_size`` is then the config's own key, unused by
    the layers).

    ``rope_scaling`` is normalised (see `rope_settings`): None for plain RoPE, else a dict
    with ``rope_type`` and without ``rope_theta``."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama with attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama with mlp_bias)
    sliding_window: int | None = None  # Mistral v0.1 style local attention (not priced)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    # precisions: the decoder linears' weight format (embeddings, norms, lm_head stay in
    # the dtype of dtype_bytes) and the KV cache's element format
    quant: Quantization = BF16
    kv_dtype: str = "bf16"
    # mixture of experts (0: a dense MLP)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0

    # --- derived sizes -------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def mlp_intermediate_size(self) -> int:
        """Width of one MLP a token goes through: the dense MLP's, or one expert's."""
        return self.moe_intermediate_size if self.is_moe else self.intermediate_size

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP or every expert and the router,
        two RMSNorm weights)."""
        d, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.mlp_intermediate_size
        n = d * (q + 2 * kv) + q * d  # q, k, v, o
        n += 3 * d * i * max(self.num_experts, 1)  # gate, up, down (of every expert)
        n += d * self.num_experts  # the router
        n += 2 * d  # input and post-attention RMSNorm
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += d
        if self.mlp_bias:
            n += 2 * i + d
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Parameters of the output projection; 0 when tied to the embeddings."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """Exact parameter count (embeddings, layers, final norm, untied lm_head)."""
        return (
            self.embedding_params
            + self.num_layers * self.layer_params
            + self.hidden_size  # final norm
            + self.lm_head_params
        )

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights: the decoder linears in `quant`'s format (scales
        included), everything else in the serving dtype."""
        if self.quant.is_bf16:
            return self.params * self.dtype_bytes
        shapes = self.linear_shapes(1)
        e = max(self.num_experts, 1)  # the router stays in the serving dtype
        lin = [(shapes[k], 1 if k in ("qkv", "o") else e) for k in ("qkv", "o", "gate_up", "down")]
        elems = sum(k * n * c for (k, n), c in lin)
        q = sum(self.quant.weight_bytes(k, n) * c for (k, n), c in lin)
        return (self.params - self.num_layers * elems) * self.dtype_bytes + self.num_layers * q

    @property
    def kv_elem_bytes(self) -> int:
        """Bytes of one KV-cache element (bf16: the serving dtype's; fp8 / int8: 1)."""
        return _kv_elem_bytes(self.kv_dtype, self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies over all layers (K and V), one GPU."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_elem_bytes

    @property
    def precision_label(self) -> str:
        """``weights/KV``, e.g. ``bf16``, ``fp8``, ``int4-g128/kv-fp8``."""
        return self.quant.label + ("" if self.kv_dtype == "bf16" else f"/kv-{self.kv_dtype}")

    def with_precision(self, quant: Quantization | None = None, kv_dtype: str | None = None) -> ModelSpec:
        """This model with other weight / KV-cache precisions (None: unchanged)."""
        return replace(self, quant=self.quant if quant is None else quant,
                       kv_dtype=self.kv_dtype if kv_dtype is None else kv_dtype)

    def linear_shapes(self, tp: int = 1) -> dict[str, tuple[int, int]]:
        """(in, out) features of each per-layer linear on one of `tp` GPUs (Megatron
        split: qkv and gate_up column-parallel, o and down row-parallel); ``lm_head`` is
        vocab-parallel. KV heads are replicated when tp exceeds them. An MoE model's
        gate_up and down are one expert's (split over tp, as without expert parallelism)."""
        self.check_tp(tp)
        d = self.hidden_size
        qg = self.num_heads // tp * self.head_dim
        kvg = self.kv_heads_per_gpu(tp) * self.head_dim
        ig = self.mlp_intermediate_size // tp
        return {
            "qkv": (d, qg + 2 * kvg),
            "o": (qg, d),
            "gate_up": (d, 2 * ig),
            "down": (ig, d),
            "lm_head": (d, -(-self.vocab_size // tp)),
        }

    @property
    def linear_flops_per_token(self) -> dict[str, int]:
        """FLOPs (2 per multiply-add) per token of each linear: the four per-layer ones
        (one layer; an MoE model's gate_up and down those of the ``num_experts_per_tok``
        experts a token goes to) and ``lm_head`` (applied to sampled tokens only)."""
        k = self.num_experts_per_tok if self.is_moe else 1
        return {n: 2 * a * b * (k if n in ("gate_up", "down") else 1) for n, (a, b) in self.linear_shapes(1).items()}

    @property
    def router_flops_per_token(self) -> int:
        """FLOPs per token of one layer's router (0 for a dense model)."""
        return 2 * self.hidden_size * self.num_experts

    @property
    def flops_per_token(self) -> int:
        """Linear-layer FLOPs of a full forward for one token (attention excluded)."""
        f = self.linear_flops_per_token
        return (self.num_layers * (f["qkv"] + f["o"] + f["gate_up"] + f["down"] + self.router_flops_per_token)
                + f["lm_head"])

    def kv_heads_per_gpu(self, tp: int = 1) -> int:
        """KV heads each GPU holds: split when tp divides them, else replicated (1)."""
        return max(1, self.num_kv_heads // tp)

    def check_tp(self, tp: int, location: str = "") -> None:
        """Raise ConfigError unless the model splits evenly over `tp` GPUs."""
        problems = []
        if not isinstance(tp, int) or tp < 1:
            problems.append(f"tensor parallel size must be a positive integer, got {tp!r}")
        else:
            if self.num_heads % tp:
                problems.append(f"model {self.name} has {self.num_heads} attention heads, not divisible by tp={tp}")
            if self.num_kv_heads % tp and tp % self.num_kv_heads:
                problems.append(
                    f"model {self.name} has {self.num_kv_heads} KV heads: tp={tp} must divide them or be a multiple of them"
                )
            key = "moe_intermediate_size" if self.is_moe else "intermediate_size"
            if self.mlp_intermediate_size % tp:
                problems.append(f"model {self.name} has {key} {self.mlp_intermediate_size}, not divisible by tp={tp}")
        if problems:
            raise ConfigError([(location, p) for p in problems])

    # --- construction ----------------------------------------------------------------
    @classmethod
    def from_hf_config(
        cls, cfg: dict, name: str, source: str = "config.json", dtype_bytes: int = 2
    ) -> ModelSpec:
        """Build from a Hugging Face ``config.json`` dict (model_type llama, mistral, qwen2
        or qwen3; classic or transformers >= 5 layout). `source` names the file in error
        messages. `dtype_bytes` is the serving dtype (2: bf16/fp16), independent of the
        checkpoint's ``torch_dtype``. Anything that would make the numbers wrong (another
        family, a quantized checkpoint, another activation) is a ConfigError."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"expected a JSON object, got {type(cfg).__name__}", source)
        mt = cfg.get("model_type")
        if mt is None:
            raise ConfigError(
                f"missing key (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})", f"{source}: model_type"
            )
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
                f"{source}: model_type",
            )
        defaults = _HF_DEFAULTS[mt]
        problems: list[tuple[str, str]] = []

        def get_int(key: str, default: Any = ...) -> int:
            v = cfg.get(key)
            if v is None:
                if default is ...:
                    problems.append((f"{source}: {key}", "missing key (expected a positive integer)"))
                    return 1
                return default
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                problems.append((f"{source}: {key}", f"expected a positive integer, got {v!r}"))
                return 1
            return v

        def get_float(key: str) -> float:
            v = cfg.get(key)
            if v is None:
                return float(defaults[key])
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                problems.append((f"{source}: {key}", f"expected a positive number, got {v!r}"))
                return 1.0
            return float(v)

        def get_bool(key: str, default: bool) -> bool:
            v = cfg.get(key)
            if v is None:
                return default
            if not isinstance(v, bool):
                problems.append((f"{source}: {key}", f"expected true or false, got {v!r}"))
                return default
            return v

        hidden = get_int("hidden_size")
        layers = get_int("num_hidden_layers")
        heads = get_int("num_attention_heads")
        inter = get_int("intermediate_size")
        vocab = get_int("vocab_size")
        def if_absent(key: str) -> Any:  # transformers' default for an absent key (null: none)
            return defaults[key] if key not in cfg else None

        kv_heads = get_int("num_key_value_heads", if_absent("num_key_value_heads") or heads)
        head_dim = get_int("head_dim", defaults["head_dim"])
        if head_dim is None:
            if hidden % heads:
                problems.append(
                    (f"{source}: head_dim", f"missing, and hidden_size {hidden} is not divisible by num_attention_heads {heads}")
                )
            head_dim = max(1, hidden // heads)
        if heads % kv_heads:
            problems.append(
                (f"{source}: num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}")
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            problems.append((f"{source}: hidden_act", f"only 'silu' (SwiGLU) is supported, got {act!r}"))
        max_pos = get_int("max_position_embeddings", defaults["max_position_embeddings"])
        rope_theta, rope_scaling = rope_settings(cfg, source, problems, _DEFAULT_THETA.get(mt, DEFAULT_ROPE_THETA))
        eps = get_float("rms_norm_eps")
        tie = get_bool("tie_word_embeddings", False)
        qk_norm = mt in ("qwen3", "qwen3_moe")
        if mt == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif mt in ("mistral", "mixtral"):
            qkv_bias = o_bias = mlp_bias = False
        else:
            qkv_bias = o_bias = get_bool("attention_bias", False)
            mlp_bias = get_bool("mlp_bias", False) if mt == "llama" else False
        if mt in ("qwen2", "qwen3", "qwen3_moe"):
            use = get_bool("use_sliding_window", False)
            sw = get_int("sliding_window", if_absent("sliding_window")) if use else None
        elif mt in ("mistral", "mixtral"):
            sw = get_int("sliding_window", if_absent("sliding_window"))
        else:
            sw = None
        if sw is not None and sw >= max_pos:
            sw = None  # a window as long as the context changes nothing
        experts, top_k, expert_inter = _moe_settings(cfg, mt, source, inter, get_int, problems)
        quant, kv_dtype = BF16, None
        if cfg.get("quantization_config") is not None:
            quant, kv_dtype = quantization_from_hf(cfg["quantization_config"], source, hidden,
                                                   expert_inter or inter, problems)
            if quant.scales in ("group", "block") and (heads * head_dim) % quant.group_size:
                problems.append((f"{source}: quantization_config", f"group size {quant.group_size} does not divide "
                                 f"the o projection's {heads * head_dim} inputs: not a quantization of this model"))
        if problems:
            raise ConfigError(problems)
        return cls(
            name=name,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=inter,
            vocab_size=vocab,
            tie_word_embeddings=tie,
            dtype_bytes=dtype_bytes,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=eps,
            max_position_embeddings=max_pos,
            model_type=mt,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=sw,
            qk_norm=qk_norm,
            quant=quant,
            kv_dtype=kv_dtype or "bf16",
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=expert_inter,
        )

    def to_hf_config(self) -> dict:
        """A Hugging Face ``config.json`` dict of this model (classic RoPE layout);
        `from_hf_config` reads it back to an equal spec."""
        cfg: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        }
        if self.model_type in ("llama", "qwen3", "qwen3_moe"):
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"model {self.name}: {self.model_type} has biases on q/k/v and o alike")
            cfg["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        if self.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            cfg["use_sliding_window"] = self.sliding_window is not None
        if self.model_type != "llama":
            cfg["sliding_window"] = self.sliding_window
        if self.model_type == "mixtral":
            cfg.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        elif self.model_type == "qwen3_moe":
            cfg.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       moe_intermediate_size=self.moe_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[])
        if self.quant.source == "checkpoint":  # a run's own quantization is no property of the files
            cfg["quantization_config"] = quantization_to_hf(self.quant, self.kv_dtype)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None, dtype_bytes: int = 2) -> ModelSpec:
        path = Path(path)
        cfg = load_json(path, "model config")
        if name is None:
            name = path.parent.name if path.name == "config.json" else path.stem
        return cls.from_hf_config(cfg, name=name, source=str(path), dtype_bytes=dtype_bytes)


def _resolve(
    name_or_path: str | Path,
    base_dir: str | Path | None,
    bundled: dict[str, Path],
    kind: str,
    location: str,
) -> tuple[Path, bool]:
    """(file, is_bundled) for a bundled name or a path relative to base_dir."""
    if not isinstance(name_or_path, (str, Path)) or str(name_or_path).strip() == "":
        raise ConfigError(f"expected a bundled {kind} name or a path, got {name_or_path!r}", location)
    s = str(name_or_path).strip()
    p = Path(s).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    if p.exists():
        return p, False
    key = s.lower()
    if key in bundled:
        return bundled[key], True
    # Hugging Face style ids: "meta-llama/Llama-3.1-8B", "Meta-Llama-3.1-8B".
    short = key.rsplit("/", 1)[-1]
    for cand in (short, short.removeprefix("meta-")):
        if cand in bundled:
            return bundled[cand], True
    raise ConfigError(
        f"unknown {kind} {s!r}: not a bundled name ({', '.join(sorted(bundled))}) and no such path ({p})",
        location,
    )


def load_model(
    name_or_path: str | Path,
    base_dir: str | Path | None = None,
    location: str = "",
    dtype_bytes: int = 2,
) -> ModelSpec:
    """A bundled model by name (case-insensitive, e.g. ``llama-3.1-8b``), or a path to a
    config.json, or to a directory holding one; relative paths start at `base_dir`.
    `location` (e.g. ``exp.yaml: model``) prefixes resolution errors."""
    bundled = _bundled(MODELS_DIR, (".json",))
    path, _ = _resolve(name_or_path, base_dir, bundled, "model", location)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ConfigError(f"directory {path} holds no config.json", location)
        return ModelSpec.from_file(cfg, name=path.name, dtype_bytes=dtype_bytes)
    return ModelSpec.from_file(path, dtype_bytes=dtype_bytes)


# ---------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------

_Pos = Field(gt=0)


class HardwareSpec(BaseModel):
    """One accelerator. Datasheet peaks plus *achievable* rates (what a good kernel
    reaches); the roofline cost model uses the achievable ones. Units: FLOP/s, bytes,
    bytes/s, watts. Link rates are per direction."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every float finite

    name: str = Field(min_length=1)
    peak_bf16_flops: float = _Pos
    peak_fp8_flops: float | None = Field(default=None, gt=0)  # None: no FP8 tensor cores
    hbm_bytes_per_s: float = _Pos
    hbm_capacity_bytes: float = _Pos
    # GPU-to-GPU link per GPU and direction; null: none (a PCIe card: collectives go over PCIe)
    nvlink_bytes_per_s: float | None = Field(gt=0)
    pcie_bytes_per_s: float = _Pos
    host_memory_bytes: float = _Pos
    achievable_bf16_flops: float = _Pos
    achievable_fp8_flops: float | None = Field(default=None, gt=0)
    peak_int8_ops: float | None = Field(default=None, gt=0)  # None: no int8 tensor cores (W8A8 refused)
    achievable_int8_ops: float | None = Field(default=None, gt=0)
    achievable_hbm_bytes_per_s: float = _Pos
    idle_power_w: float = _Pos
    max_power_w: float = _Pos
    # streaming multiprocessors: a kernel with fewer programs than this leaves SMs idle
    # (the cost model's longest-program bound on prefill attention); None: not modelled
    num_sms: int | None = Field(default=None, gt=0)
    # substrings of the CUDA device name this spec describes (the GPU backend refuses to run
    # or calibrate a spec on another GPU); empty: not checked
    device_names: list[str] = Field(default_factory=list)
    # GPUs of one server, joined by nvlink_bytes_per_s (or PCIe): a tensor-parallel group
    # lies within one; pipeline stages may span servers over network_bytes_per_s
    gpus_per_node: int = Field(default=8, gt=0, le=1024)
    # network (InfiniBand / RoCE) bytes/s per GPU and direction between servers; null: a
    # replica must fit in one server
    network_bytes_per_s: float | None = Field(default=None, gt=0)

    @property
    def link_bytes_per_s(self) -> float:
        """Bytes/s per GPU and direction between GPUs of one server: NVLink, else PCIe."""
        return self.nvlink_bytes_per_s if self.nvlink_bytes_per_s is not None else self.pcie_bytes_per_s

    @model_validator(mode="after")
    def _consistent(self) -> HardwareSpec:
        if self.achievable_bf16_flops > self.peak_bf16_flops:
            raise ValueError("achievable_bf16_flops exceeds peak_bf16_flops")
        if self.achievable_hbm_bytes_per_s > self.hbm_bytes_per_s:
            raise ValueError("achievable_hbm_bytes_per_s exceeds hbm_bytes_per_s")
        if (self.peak_fp8_flops is None) != (self.achievable_fp8_flops is None):
            raise ValueError("give both peak_fp8_flops and achievable_fp8_flops, or neither")
        if self.peak_fp8_flops is not None and self.achievable_fp8_flops > self.peak_fp8_flops:
            raise ValueError("achievable_fp8_flops exceeds peak_fp8_flops")
        if (self.peak_int8_ops is None) != (self.achievable_int8_ops is None):
            raise ValueError("give both peak_int8_ops and achievable_int8_ops, or neither")
        if self.peak_int8_ops is not None and self.achievable_int8_ops > self.peak_int8_ops:
            raise ValueError("achievable_int8_ops exceeds peak_int8_ops")
        if self.idle_power_w > self.max_power_w:
            raise ValueError("idle_power_w exceeds max_power_w")
        return self

    def matmul_rate(self, precision: str, achievable: bool = True) -> float | None:
        """Tensor-core rate (FLOP/s or int8 OP/s) of a GEMM in `precision` (bf16, fp8,
        int8); None when this accelerator has no tensor cores for it."""
        if precision == "bf16":
            return self.achievable_bf16_flops if achievable else self.peak_bf16_flops
        if precision == "fp8":
            return self.achievable_fp8_flops if achievable else self.peak_fp8_flops
        if precision == "int8":
            return self.achievable_int8_ops if achievable else self.peak_int8_ops
        raise ValueError(f"no matmul precision {precision!r}")

    @classmethod
    def from_dict(cls, data: Any, source: str = "hardware") -> HardwareSpec:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping of hardware keys, got {type(data).__name__}", source)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            hint = f"expected one of: {', '.join(cls.model_fields)}"
            raise ConfigError(validation_problems(e, data, source, unknown_key_hint=hint)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> HardwareSpec:
        return cls.from_dict(load_yaml(path, "hardware file"), source=str(path))


def load_hardware(name_or_path: str | Path, base_dir: str | Path | None = None, location: str = "") -> HardwareSpec:
    """A bundled accelerator by name (case-insensitive: ``h100-sxm``, ``a100-80gb-sxm``,
    ``h200-sxm``) or a path to a YAML file in the same format; relative paths start at
    `base_dir`."""
    bundled = _bundled(HARDWARE_DIR, (".yaml", ".yml"))
    path, _ = _resolve(name_or_path, base_dir, bundled, "hardware", location)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, expected a hardware YAML file", location)
    return HardwareSpec.from_file(path)


def check_precision(model: ModelSpec, hw: HardwareSpec, tp: int = 1, weights_loc: str = "model_precision",
                    kv_loc: str = "kv_cache.dtype") -> None:
    """ConfigError (naming the setting) unless `hw` runs `model`'s precisions on `tp` GPUs:
    fp8 (weights or KV cache) needs FP8 tensor cores (Hopper or later), int8 W8A8 int8
    tensor cores; int4 groups must divide each GPU's share of every linear's inputs."""
    problems = []
    q = model.quant
    if q.matmul != "bf16" and hw.matmul_rate(q.matmul) is None:
        key = "peak_fp8_flops" if q.matmul == "fp8" else "peak_int8_ops"
        why = "FP8 tensor cores (Hopper or later)" if q.matmul == "fp8" else "int8 tensor cores"
        problems.append((weights_loc, f"{q.label} weights need {why}: {hw.name} has none ({key} is null in its "
                         "hardware file)"))
    if model.kv_dtype == "fp8" and hw.peak_fp8_flops is None:
        problems.append((kv_loc, f"an fp8 KV cache needs FP8 support (Hopper or later): {hw.name} has none "
                         "(peak_fp8_flops is null in its hardware file); use int8 or bf16"))
    if model.is_moe and q.weights == "int4":
        problems.append((weights_loc, f"int4 weights of an MoE model ({model.name}) are not modelled (bf16, fp8, "
                         "int8)"))
    if q.scales in ("group", "block") and not problems:
        try:
            shapes = model.linear_shapes(tp)
        except ConfigError:
            shapes = {}
        bad = sorted({f"{k} ({shapes[k][0]} inputs per GPU)" for k in ("qkv", "o", "gate_up", "down")
                      if k in shapes and shapes[k][0] % q.group_size})
        if bad:
            problems.append((weights_loc, f"group size {q.group_size} does not divide the inputs of "
                             f"{', '.join(bad)}" + (f" with tp={tp}" if tp > 1 else "")))
    if problems:
        raise ConfigError(problems)


def apply_precision(model: ModelSpec, hw: HardwareSpec, precision: Any = None, kv_dtype: str | None = "auto",
                    tp: int = 1, weights_loc: str = "model_precision", kv_loc: str = "kv_cache.dtype") -> ModelSpec:
    """`model` with a run's precisions, checked against the checkpoint and the hardware.
    ``precision`` None keeps the checkpoint's (bf16 unless its config.json has a
    ``quantization_config``); a checkpoint stored quantised cannot be served in another
    weight format. ``kv_dtype`` ``auto`` / None: the checkpoint's KV scheme, else bf16."""
    q = model.quant
    if precision is not None:
        q = parse_precision(precision, weights_loc)
        if model.quant.source == "checkpoint" and q != model.quant:
            raise ConfigError(f"model {model.name}'s checkpoint holds {model.quant.label} weights (its config.json's "
                              f"quantization_config): serving it as {q.label} needs the unquantised checkpoint",
                              weights_loc)
    kv = model.kv_dtype if kv_dtype in (None, "auto") else parse_kv_dtype(kv_dtype, kv_loc)
    out = model if (q == model.quant and kv == model.kv_dtype) else model.with_precision(q, kv)
    check_precision(out, hw, tp, weights_loc, kv_loc)
    return out


def hardware_for_device(device_name: str) -> str | None:
    """The bundled hardware spec whose ``device_names`` match a CUDA device name (None: none)."""
    for name in bundled_hardware():
        if any(n.lower() in device_name.lower() for n in load_hardware(name).device_names):
            return name
    return None


def gb(nbytes: float) -> str:
    """Decimal gigabytes with one decimal, for messages."""
    return f"{nbytes / 1e9:.1f} GB"


__all__ = [
    "ModelSpec",
    "rope_settings",
    "rope_type",
    "HardwareSpec",
    "load_model",
    "load_hardware",
    "bundled_models",
    "bundled_hardware",
    "DTYPE_BYTES",
    "gb",
    "Quantization",
    "BF16",
    "WEIGHT_PRECISIONS",
    "KV_DTYPES",
    "parse_precision",
    "parse_kv_dtype",
    "quantization_from_hf",
    "quantization_to_hf",
    "check_precision",
    "apply_precision",
]
