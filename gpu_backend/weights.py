"""Llama-family weights: model dimensions, random weights, and safetensors loading.

Weights are held *fused* the way the forward pass uses them:

- ``qkv``     ``[(Hq + 2*Hkv) * D, H]``  = cat(q_proj, k_proj, v_proj) along the output dim
- ``gate_up`` ``[2*I, H]``               = cat(gate_proj, up_proj)
- ``o``       ``[H, Hq*D]``, ``down`` ``[H, I]``, norms ``[H]``
- ``embed``   ``[V, H]``, ``lm_head`` ``[V, H]`` (the same tensor object when tied)

Checkpoints use HF naming (``model.layers.{i}.self_attn.q_proj.weight``, ...), either one
``model.safetensors``, several shards listed in ``model.safetensors.index.json``, or any
``*.safetensors`` files in a directory. Every tensor is checked against the shapes the
config implies before anything is loaded; problems are reported together, each naming
the tensor (and the file).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..sim.specs import ModelSpec, rope_type
from .rope import SUPPORTED_ROPE_TYPES


class WeightLoadError(ValueError):
    """A checkpoint does not match the model config (missing or mis-shaped tensors)."""


# --------------------------------------------------------------------------------------
# model dimensions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """What the GPU backend's Llama needs of a model: a view of a `ModelSpec` (the one
    parser of ``config.json``), refusing what this backend does not implement.

    Its attributes are the spec's (``hidden_size``, ``num_layers``, ``head_dim``,
    ``rope_theta``, ``rope_scaling``, ``q_size``, ...); nothing is read again."""

    spec: ModelSpec

    def __post_init__(self) -> None:
        m, problems = self.spec, []
        biases = [f for f in ("qkv_bias", "o_bias", "mlp_bias") if getattr(m, f)]
        if biases:
            problems.append(f"biases ({', '.join(biases)}) are not supported")
        if m.qk_norm:
            problems.append("per-head q/k RMSNorm (qk_norm, Qwen3) is not supported")
        if m.sliding_window is not None:
            problems.append(f"sliding-window attention (sliding_window {m.sliding_window}) is not supported")
        kind = rope_type(m.rope_scaling)
        if kind not in SUPPORTED_ROPE_TYPES:
            problems.append(f"rope_scaling type {kind!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if m.rope_scaling and float(m.rope_scaling.get("partial_rotary_factor", 1.0)) != 1.0:
            problems.append("partial_rotary_factor != 1 is not supported")
        q = m.quant
        if q.weights not in ("bf16", "fp8") or q.scales not in ("none", "tensor", "channel"):
            problems.append(f"{q.label} weights are not supported (bf16, and fp8 with per-tensor or per-channel "
                            "scales through torch._scaled_mm)")
        if m.kv_dtype not in ("bf16", "fp8"):
            problems.append(f"a {m.kv_dtype} KV cache is not supported (the model's dtype, or fp8: e4m3 with "
                            "per-tensor scales)")
        if problems:
            raise ValueError(f"model {m.name}: " + "; ".join(problems))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "spec":  # copy/pickle probes, and before __init__
            raise AttributeError(name)
        return getattr(self.spec, name)

    @classmethod
    def from_spec(cls, spec: ModelSpec | Mapping | Any) -> ModelDims:
        """From a `ModelSpec`, a `ModelDims`, or what `ModelSpec.from_hf_config` reads: an
        HF config dict (``model_type`` defaults to ``llama``: this backend's model is
        LlamaForCausalLM) or an HF ``PretrainedConfig`` (its ``to_dict()``)."""
        if isinstance(spec, ModelDims):
            return spec
        if isinstance(spec, ModelSpec):
            return cls(spec)
        if not isinstance(spec, Mapping) and callable(getattr(spec, "to_dict", None)):
            spec = spec.to_dict()
        if not isinstance(spec, Mapping):
            raise TypeError(f"expected a ModelSpec or an HF config dict, got {type(spec).__name__}")
        cfg = dict(spec)
        if cfg.get("model_type") is None:
            cfg["model_type"] = "llama"
        return cls(ModelSpec.from_hf_config(cfg, name=str(cfg.get("_name_or_path") or "model")))

    def num_params(self) -> int:
        return self.spec.params

    def to_hf_config(self) -> dict:
        """The HF ``config.json`` dict of the model (`ModelSpec.to_hf_config`)."""
        return self.spec.to_hf_config()


def load_config(path: str | os.PathLike) -> ModelSpec:
    """The model of a checkpoint directory (its ``config.json``) or of the file itself."""
    p = Path(path)
    return ModelSpec.from_file(p / "config.json" if p.is_dir() else p)


# --------------------------------------------------------------------------------------
# fp8 weights
# --------------------------------------------------------------------------------------

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class Fp8Weight:
    """A linear's weight ``[N out, K in]`` in float8_e4m3fn with fp32 scales ``[1, N]`` (one per
    output channel; a per-tensor scale is held expanded), ``w ~= q * scale.T``. Multiplied by
    `fp8_linear` (``torch._scaled_mm``, per-token activation scales)."""

    q: torch.Tensor  # [N, K] float8_e4m3fn, row-major (``q.t()`` is the column-major mat2 cuBLASLt wants)
    scale: torch.Tensor  # [1, N] float32
    per_channel: bool = True

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Fp8Weight:
        """On ``device`` (the dtype stays fp8: a quantised weight is not converted back)."""
        return Fp8Weight(self.q.to(device=device or self.q.device), self.scale.to(device=device or self.q.device),
                         self.per_channel)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale.t()).to(dtype)


def quantize_fp8(w: torch.Tensor, per_channel: bool = True) -> Fp8Weight:
    """``w [N, K]`` as e4m3 with per-output-channel (or per-tensor) scales ``amax / 448``
    (round to nearest even, fp32 math)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1, keepdim=True) if per_channel else wf.abs().amax().reshape(1, 1)
    scale = amax.clamp_min(1e-12) / FP8_MAX  # [N, 1] or [1, 1]
    q = (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(q.contiguous(), scale.reshape(1, -1).expand(1, w.shape[0]).contiguous().float(), per_channel)


_ROWWISE: dict[str, bool] = {}  # device type -> torch._scaled_mm takes row-wise scales there


def fp8_linear(x: torch.Tensor, w: Fp8Weight, impl: str = "auto") -> torch.Tensor:
    """``x [T, K] @ w.T`` in fp8: x quantised per token (`kernels.ops.quant_fp8_rowwise`),
    ``torch._scaled_mm`` with row-wise scales, fp32 accumulation, ``x.dtype`` out. Where
    this torch's ``_scaled_mm`` takes no row-wise scales, x is quantised per tensor and the
    weight's channel scales multiply the output (one more elementwise kernel)."""
    from servesim.kernels import ops

    if _ROWWISE.get(x.device.type, True):
        xq, sx = ops.quant_fp8_rowwise(x, impl=impl)
        try:
            out = torch._scaled_mm(xq, w.q.t(), scale_a=sx, scale_b=w.scale, out_dtype=x.dtype)
            _ROWWISE[x.device.type] = True
            return out
        except RuntimeError as e:
            if x.device.type in _ROWWISE:  # it worked before: a real error
                raise
            import warnings

            warnings.warn(f"torch._scaled_mm without row-wise scales here ({e}); fp8 linears fall back to "
                          "per-tensor input scales", stacklevel=2)
            _ROWWISE[x.device.type] = False
    sx = x.float().abs().amax().clamp_min(1e-12).reshape(1, 1) / FP8_MAX
    xq = (x.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    return (torch._scaled_mm(xq, w.q.t(), scale_a=sx.reshape(()), scale_b=one, out_dtype=torch.float32)
            * w.scale).to(x.dtype)


def fp8_linear_ref(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """`fp8_linear` in plain fp32 torch: dequantise both operands, multiply."""
    from servesim.kernels.reference import quant_fp8_rowwise_ref

    xq, sx = quant_fp8_rowwise_ref(x)
    return ((xq.float() * sx) @ w.dequantize(torch.float32).t()).to(x.dtype)


LINEAR_FIELDS = ("qkv", "o", "gate_up", "down")


def quantize_weights_fp8(weights: LlamaWeights, per_channel: bool = True) -> LlamaWeights:
    """The decoder layers' four linears in fp8 (`quantize_fp8`); embedding, norms and lm_head
    kept as they are (the precisions servesim's cost model prices: sim/specs.py)."""
    layers = [LayerWeights(**{f.name: (quantize_fp8(getattr(lw, f.name), per_channel)
                                       if f.name in LINEAR_FIELDS and not isinstance(getattr(lw, f.name), Fp8Weight)
                                       else getattr(lw, f.name)) for f in fields(lw)})
              for lw in weights.layers]
    return LlamaWeights(weights.embed, layers, weights.final_norm, weights.lm_head)


# --------------------------------------------------------------------------------------
# weight containers
# --------------------------------------------------------------------------------------

@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    o: torch.Tensor  # [H, Hq D]
    post_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 I, H]
    down: torch.Tensor  # [H, I]


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]; `is embed` when tied

    @property
    def tied(self) -> bool:
        return self.lm_head is self.embed

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.embed
        for lw in self.layers:
            for f in fields(lw):
                t = getattr(lw, f.name)
                if isinstance(t, Fp8Weight):
                    yield t.q
                    yield t.scale
                else:
                    yield t
        yield self.final_norm
        if not self.tied:
            yield self.lm_head

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LlamaWeights:
        """A copy in ``dtype`` on ``device`` (tensors already there are shared, tying is kept)."""
        def cv(t: torch.Tensor) -> torch.Tensor:
            if isinstance(t, Fp8Weight):
                return t.to(device=device)
            return t.to(dtype=dtype or t.dtype, device=device or t.device)

        embed = cv(self.embed)
        layers = [LayerWeights(**{f.name: cv(getattr(lw, f.name)) for f in fields(lw)}) for lw in self.layers]
        return LlamaWeights(embed, layers, cv(self.final_norm), embed if self.tied else cv(self.lm_head))

    def check(self, dims: ModelDims) -> None:
        """Raise `WeightLoadError` if any tensor's shape does not match ``dims``."""
        problems = [f"{name}: shape {tuple(t.shape)}, expected {shape}"
                    for name, t, shape in self._named(dims) if tuple(t.shape) != shape]
        if problems:
            raise WeightLoadError("weights do not match the model config:\n  " + "\n  ".join(problems))

    def _named(self, dims: ModelDims):
        h, i, qkv = dims.hidden_size, dims.intermediate_size, dims.q_size + 2 * dims.kv_size
        yield "embed", self.embed, (dims.vocab_size, h)
        if len(self.layers) != dims.num_layers:
            raise WeightLoadError(f"weights have {len(self.layers)} layers, the config {dims.num_layers}")
        for n, lw in enumerate(self.layers):
            yield f"layers[{n}].input_norm", lw.input_norm, (h,)
            yield f"layers[{n}].qkv", lw.qkv, (qkv, h)
            yield f"layers[{n}].o", lw.o, (h, dims.q_size)
            yield f"layers[{n}].post_norm", lw.post_norm, (h,)
            yield f"layers[{n}].gate_up", lw.gate_up, (2 * i, h)
            yield f"layers[{n}].down", lw.down, (h, i)
        yield "final_norm", self.final_norm, (h,)
        yield "lm_head", self.lm_head, (dims.vocab_size, h)


# --------------------------------------------------------------------------------------
# random weights
# --------------------------------------------------------------------------------------

def random_weights(spec: Any, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", std: float = 0.02) -> LlamaWeights:
    """Random weights with the real shapes of ``spec``: linear and embedding weights
    ~ normal(0, std) (HF's ``initializer_range``), norms at 1.

    Deterministic given (seed, device): values are drawn on ``device`` from a generator
    seeded with ``seed``, in a fixed order (CPU and GPU draws differ).
    """
    dims = ModelDims.from_spec(spec)
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    h, i = dims.hidden_size, dims.intermediate_size

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)

    def ones() -> torch.Tensor:
        return torch.ones(h, dtype=dtype, device=device)

    embed = normal(dims.vocab_size, h)
    layers = [LayerWeights(input_norm=ones(), qkv=normal(dims.q_size + 2 * dims.kv_size, h),
                           o=normal(h, dims.q_size), post_norm=ones(), gate_up=normal(2 * i, h),
                           down=normal(h, i))
              for _ in range(dims.num_layers)]
    lm_head = embed if dims.tie_word_embeddings else normal(dims.vocab_size, h)
    return LlamaWeights(embed, layers, ones(), lm_head)


# --------------------------------------------------------------------------------------
# HF naming
# --------------------------------------------------------------------------------------

def hf_tensor_shapes(spec: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF LlamaForCausalLM checkpoint of ``spec`` holds, with its shape."""
    dims = ModelDims.from_spec(spec)
    h, i, v = dims.hidden_size, dims.intermediate_size, dims.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(dims.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (dims.q_size, h)
        shapes[p + "self_attn.k_proj.weight"] = (dims.kv_size, h)
        shapes[p + "self_attn.v_proj.weight"] = (dims.kv_size, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, dims.q_size)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not dims.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def to_hf_state_dict(weights: LlamaWeights, spec: Any) -> dict[str, torch.Tensor]:
    """Un-fuse ``weights`` into HF-named tensors (contiguous copies)."""
    dims = ModelDims.from_spec(spec)
    weights.check(dims)
    sd = {"model.embed_tokens.weight": weights.embed}
    for n, lw in enumerate(weights.layers):
        p = f"model.layers.{n}."
        q, k, v = lw.qkv.split([dims.q_size, dims.kv_size, dims.kv_size], dim=0)
        gate, up = lw.gate_up.split([dims.intermediate_size] * 2, dim=0)
        sd.update({p + "input_layernorm.weight": lw.input_norm, p + "self_attn.q_proj.weight": q,
                   p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                   p + "self_attn.o_proj.weight": lw.o, p + "post_attention_layernorm.weight": lw.post_norm,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": lw.down})
    sd["model.norm.weight"] = weights.final_norm
    if not dims.tie_word_embeddings:
        sd["lm_head.weight"] = weights.lm_head
    return {k: t.detach().to("cpu").contiguous().clone() for k, t in sd.items()}


def save_hf_checkpoint(weights: LlamaWeights, spec: Any, path: str | os.PathLike, num_shards: int = 1) -> Path:
    """Write ``config.json`` and the weights in HF naming to directory ``path`` (one
    ``model.safetensors``, or ``num_shards`` shards plus ``model.safetensors.index.json``)."""
    from safetensors.torch import save_file

    dims = ModelDims.from_spec(spec)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sd = to_hf_state_dict(weights, dims)
    cfg = dims.to_hf_config()
    cfg["torch_dtype"] = str(weights.embed.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(sd)
    if num_shards <= 1:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    per = math.ceil(len(names) / num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(num_shards):
        chunk = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: sd[k] for k in chunk}, str(out / fname), metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = fname
            total += sd[k].numel() * sd[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------

def _checkpoint_files(path: Path) -> dict[str, Path] | list[Path]:
    """Either a tensor-name -> file map (from an index), or the files to scan."""
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _read_index(path)
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return _read_index(index)
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightLoadError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
    out = {}
    for name, fname in weight_map.items():
        f = index.parent / fname
        out[name] = f
    missing_files = sorted({str(f) for f in out.values() if not f.is_file()})
    if missing_files:
        raise WeightLoadError(f"{index}: shard file(s) listed but not found: {', '.join(missing_files)}")
    return out


def load_safetensors_weights(spec: Any, path: str | os.PathLike, dtype: torch.dtype | None = None,
                             device: torch.device | str = "cpu",
                             slices: Callable[[str], tuple[int, int, int] | None] | None = None) -> LlamaWeights:
    """Load an HF-named Llama checkpoint (file, directory, or sharded directory), fusing
    q/k/v and gate/up. ``dtype=None`` keeps the checkpoint's dtype.

    ``slices(name)``: ``(dim, start, stop)`` to read only that part of tensor ``name`` (the
    rows or columns of one tensor-parallel rank, `tp.TPShard.hf_slice`; None: all of it);
    the shapes are checked whole, before anything is read.

    Raises `WeightLoadError` naming every missing or mis-shaped tensor.
    """
    from safetensors import safe_open

    dims = ModelDims.from_spec(spec)
    if dims.quant.source == "checkpoint":
        raise WeightLoadError(f"the config of {path} describes a quantised checkpoint ({dims.quant.label}, its "
                              "quantization_config): the gpu backend loads bf16 / fp16 / fp32 checkpoints and "
                              "quantises them itself (model_precision: fp8)")
    root = Path(path)
    located = _checkpoint_files(root)
    expected = hf_tensor_shapes(dims)
    tied = dims.tie_word_embeddings
    device = torch.device(device)

    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        keys: dict[Path, set[str]] = {}

        def handle(f: Path):
            if f not in handles:
                try:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                except Exception as e:  # safetensors raises its own error types
                    raise WeightLoadError(f"{f}: cannot read safetensors file: {e}") from None
            return handles[f]

        if isinstance(located, dict):
            where = located
        else:
            where = {}
            for f in located:
                for k in handle(f).keys():
                    where.setdefault(k, f)

        problems = []
        for name, shape in expected.items():
            f = where.get(name)
            if f is None:
                problems.append(f"tensor '{name}' is missing")
                continue
            h = handle(f)
            if f not in keys:
                keys[f] = set(h.keys())
            if name not in keys[f]:
                problems.append(f"tensor '{name}' is missing from {f.name} (listed there by the index)")
                continue
            got = tuple(h.get_slice(name).get_shape())
            if got != shape:
                problems.append(f"tensor '{name}' in {f.name} has shape {got}, expected {shape}")
        if problems:
            raise WeightLoadError(f"checkpoint {root} does not match the model config:\n  " + "\n  ".join(problems))

        def get(name: str) -> torch.Tensor:
            part = slices(name) if slices is not None else None
            if part is None:
                t = handle(where[name]).get_tensor(name)
            else:  # only this rank's rows / columns leave the file
                dim, a, b = part
                sl = handle(where[name]).get_slice(name)
                t = sl[a:b] if dim == 0 else sl[:, a:b]
            return t.to(device=device, dtype=dtype or t.dtype)

        def fused(*names: str) -> torch.Tensor:
            return torch.cat([get(n) for n in names], dim=0)

        embed = get("model.embed_tokens.weight")
        layers = []
        for n in range(dims.num_layers):
            p = f"model.layers.{n}."
            layers.append(LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                qkv=fused(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                o=get(p + "self_attn.o_proj.weight"),
                post_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=fused(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=get(p + "mlp.down_proj.weight"),
            ))
        final_norm = get("model.norm.weight")
        lm_head = embed if tied else get("lm_head.weight")
    return LlamaWeights(embed, layers, final_norm, lm_head)
