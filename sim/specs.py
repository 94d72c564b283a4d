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
from dataclasses import dataclass, field
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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}

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
}

# ---------------------------------------------------------------------------------------
# RoPE settings
# ---------------------------------------------------------------------------------------

DEFAULT_ROPE_THETA = 10000.0  # transformers' default_theta of every supported model_type
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
                  problems: list[tuple[str, str]] | None = None) -> tuple[float, dict | None]:
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
        theta = DEFAULT_ROPE_THETA
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
    """A dense Llama-family decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU MLP).

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

    # --- derived sizes -------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP, two RMSNorm weights)."""
        d, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        n = d * (q + 2 * kv) + q * d  # q, k, v, o
        n += 3 * d * i  # gate, up, down
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
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies over all layers (K and V), one GPU."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def linear_shapes(self, tp: int = 1) -> dict[str, tuple[int, int]]:
        """(in, out) features of each per-layer linear on one of `tp` GPUs (Megatron
        split: qkv and gate_up column-parallel, o and down row-parallel); ``lm_head`` is
        vocab-parallel. KV heads are replicated when tp exceeds them."""
        self.check_tp(tp)
        d = self.hidden_size
        qg = self.num_heads // tp * self.head_dim
        kvg = self.kv_heads_per_gpu(tp) * self.head_dim
        ig = self.intermediate_size // tp
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
        (one layer) and ``lm_head`` (applied to sampled tokens only)."""
        return {k: 2 * a * b for k, (a, b) in self.linear_shapes(1).items()}

    @property
    def flops_per_token(self) -> int:
        """Linear-layer FLOPs of a full forward for one token (attention excluded)."""
        f = self.linear_flops_per_token
        return self.num_layers * (f["qkv"] + f["o"] + f["gate_up"] + f["down"]) + f["lm_head"]

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
            if self.intermediate_size % tp:
                problems.append(f"model {self.name} has intermediate_size {self.intermediate_size}, not divisible by tp={tp}")
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
                f"unsupported model_type {mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)}; dense models only)",
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

        if cfg.get("quantization_config") is not None:
            method = cfg["quantization_config"]
            method = method.get("quant_method", "?") if isinstance(method, Mapping) else method
            problems.append((f"{source}: quantization_config", f"quantized checkpoints ({method}) are not supported: "
                             "the model would be priced as unquantized weights"))
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
        rope_theta, rope_scaling = rope_settings(cfg, source, problems)
        eps = get_float("rms_norm_eps")
        tie = get_bool("tie_word_embeddings", False)
        qk_norm = mt == "qwen3"
        if mt == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif mt == "mistral":
            qkv_bias = o_bias = mlp_bias = False
        else:
            qkv_bias = o_bias = get_bool("attention_bias", False)
            mlp_bias = get_bool("mlp_bias", False) if mt == "llama" else False
        if mt in ("qwen2", "qwen3"):
            use = get_bool("use_sliding_window", False)
            sw = get_int("sliding_window", if_absent("sliding_window")) if use else None
        elif mt == "mistral":
            sw = get_int("sliding_window", if_absent("sliding_window"))
        else:
            sw = None
        if sw is not None and sw >= max_pos:
            sw = None  # a window as long as the context changes nothing
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
        if self.model_type in ("llama", "qwen3"):
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"model {self.name}: {self.model_type} has biases on q/k/v and o alike")
            cfg["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        if self.model_type in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = self.sliding_window is not None
        if self.model_type != "llama":
            cfg["sliding_window"] = self.sliding_window
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

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    peak_bf16_flops: float = _Pos
    peak_fp8_flops: float | None = Field(default=None, gt=0)  # None: no FP8 tensor cores
    hbm_bytes_per_s: float = _Pos
    hbm_capacity_bytes: float = _Pos
    nvlink_bytes_per_s: float = _Pos
    pcie_bytes_per_s: float = _Pos
    host_memory_bytes: float = _Pos
    achievable_bf16_flops: float = _Pos
    achievable_fp8_flops: float | None = Field(default=None, gt=0)
    achievable_hbm_bytes_per_s: float = _Pos
    idle_power_w: float = _Pos
    max_power_w: float = _Pos
    # streaming multiprocessors: a kernel with fewer programs than this leaves SMs idle
    # (the cost model's longest-program bound on prefill attention); None: not modelled
    num_sms: int | None = Field(default=None, gt=0)
    # substrings of the CUDA device name this spec describes (the GPU backend refuses to run
    # or calibrate a spec on another GPU); empty: not checked
    device_names: list[str] = Field(default_factory=list)

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
        if self.idle_power_w > self.max_power_w:
            raise ValueError("idle_power_w exceeds max_power_w")
        return self

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
]
