"""Parallelism layouts of one replica: tensor (TP), pipeline (PP) and expert (EP) parallel.

A replica runs on ``tp * pp`` GPUs: ``pp`` pipeline stages of ``num_layers / pp`` layers
each, every stage a tensor-parallel group of ``tp`` GPUs (attention heads, KV heads, the
dense MLP and the vocabulary split over them). Expert parallelism lays an MoE model's
experts over the GPUs of a stage's TP group, as TensorRT-LLM's ``moe_expert_parallel_size``
(with ``moe_tensor_parallel_size = tp / ep``) and vLLM's ``--enable-expert-parallel`` do:
``ep`` GPU groups hold ``num_experts / ep`` experts each, every expert split over the
``tp / ep`` GPUs of its group. EP adds no GPUs.

`check_layout` refuses (ConfigError, naming the ``cluster.*`` key) what no engine can run:
a split that does not divide the heads, the KV heads (tp must divide them or be a multiple
of them: KV heads are then replicated), the layers, the experts or the experts' width; a
TP group larger than one server (``gpus_per_node``); a replica larger than one server
when the hardware names no network between servers. `layouts_for` lists the layouts of a
GPU count that pass.

Pure decisions over duck-typed specs (a ``ModelSpec`` and a ``HardwareSpec`` of
sim/specs.py): nothing here imports the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

from servesim.sim.types import ConfigError


@dataclass(frozen=True)
class Layout:
    """How one replica is split. ``micro_batches``: requests in flight through the
    pipeline at once as separate micro-batches (None: ``pp``, TensorRT-LLM's choice)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    micro_batches: int | None = None

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def moe_tp(self) -> int:
        """GPUs one expert is split over (TensorRT-LLM's moe_tensor_parallel_size)."""
        return self.tp // self.ep

    @property
    def num_micro_batches(self) -> int:
        return self.pp if self.micro_batches is None else self.micro_batches

    @property
    def is_trivial(self) -> bool:
        return self.tp == 1 and self.pp == 1 and self.ep == 1

    @classmethod
    def of(cls, cluster) -> Layout:
        """The layout of a run's ``cluster`` settings (sim/config.py ClusterConfig)."""
        return cls(cluster.tensor_parallel, cluster.pipeline_parallel, cluster.expert_parallel,
                   cluster.pp_micro_batches)

    def label(self) -> str:
        s = f"tp{self.tp}"
        if self.pp > 1:
            s += f"-pp{self.pp}"
        if self.ep > 1:
            s += f"-ep{self.ep}"
        return s


KEYS = {"tp": "cluster.tensor_parallel", "pp": "cluster.pipeline_parallel", "ep": "cluster.expert_parallel",
        "micro_batches": "cluster.pp_micro_batches"}


def layout_problems(model, hw, layout: Layout, where: str = "") -> list[tuple[str, str]]:
    """(location, message) of everything that keeps `model` from running split as
    `layout` on `hw` (empty: it can; memory is sim/memory.py's to check)."""
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    loc = {k: f"{where}{v}" for k, v in KEYS.items()}
    probs: list[tuple[str, str]] = []
    for k, v in (("tp", tp), ("pp", pp), ("ep", ep)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            probs.append((loc[k], f"expected a positive integer, got {v!r}"))
    if probs:
        return probs
    name = model.name
    if model.num_heads % tp:
        probs.append((loc["tp"], f"model {name} has {model.num_heads} attention heads, not divisible by "
                      f"tensor_parallel {tp}"))
    kvh = model.num_kv_heads
    if kvh % tp and tp % kvh:
        probs.append((loc["tp"], f"model {name} has {kvh} KV heads: tensor_parallel {tp} must divide them or be a "
                      f"multiple of them (then each GPU holds a replica of one)"))
    if tp > hw.gpus_per_node:
        probs.append((loc["tp"], f"tensor_parallel {tp} is more GPUs than one {hw.name} server has "
                      f"(gpus_per_node {hw.gpus_per_node}): a tensor-parallel group's all-reduces need the "
                      "server's NVLink / PCIe (use pipeline_parallel across servers)"))
    if model.num_layers % pp:
        probs.append((loc["pp"], f"model {name} has {model.num_layers} layers, not divisible by pipeline_parallel "
                      f"{pp} (stages of equal layers)"))
    if tp * pp > hw.gpus_per_node and hw.network_bytes_per_s is None and tp <= hw.gpus_per_node:
        probs.append((loc["pp"], f"tensor_parallel x pipeline_parallel = {tp * pp} GPUs, more than one {hw.name} "
                      f"server (gpus_per_node {hw.gpus_per_node}), and its hardware file names no network between "
                      "servers (network_bytes_per_s)"))
    if layout.micro_batches is not None:
        m = layout.micro_batches
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            probs.append((loc["micro_batches"], f"expected a positive integer or null, got {m!r}"))
        elif pp == 1 and m != 1:
            probs.append((loc["micro_batches"], "micro-batches apply to pipeline_parallel > 1"))
    if model.is_moe:
        E = model.num_experts
        if ep > 1 and tp % ep:
            probs.append((loc["ep"], f"expert_parallel {ep} must divide tensor_parallel {tp}: the experts are laid "
                          "over the GPUs of a stage's tensor-parallel group"))
        elif E % ep:
            probs.append((loc["ep"], f"model {name} has {E} experts, not divisible by expert_parallel {ep}"))
        elif model.moe_intermediate_size % (tp // ep):
            probs.append((loc["ep"] if ep > 1 else loc["tp"],
                          f"model {name}'s experts are {model.moe_intermediate_size} wide, not divisible by the "
                          f"tensor_parallel / expert_parallel = {tp // ep} GPUs each expert is split over"))
    else:
        if ep != 1:
            probs.append((loc["ep"], f"expert_parallel {ep}: model {name} is dense (no experts to split)"))
        if model.intermediate_size % tp:
            probs.append((loc["tp"], f"model {name} has intermediate_size {model.intermediate_size}, not divisible "
                          f"by tensor_parallel {tp}"))
    return probs


def check_layout(model, hw, layout: Layout, where: str = "") -> None:
    """Raise ConfigError with every `layout_problems`."""
    probs = layout_problems(model, hw, layout, where)
    if probs:
        raise ConfigError(probs)


def layouts_for(model, hw, gpus: int, expert_parallel: bool | None = None) -> list[Layout]:
    """Every layout of exactly `gpus` GPUs that `check_layout` accepts (TP-heavy first);
    `expert_parallel` True / False keeps only layouts with / without EP (None: both)."""
    out = []
    for tp in range(gpus, 0, -1):
        if gpus % tp:
            continue
        pp = gpus // tp
        eps = [e for e in range(1, tp + 1) if tp % e == 0] if model.is_moe else [1]
        for ep in eps:
            if expert_parallel is not None and (ep > 1) != expert_parallel:
                continue
            lay = Layout(tp, pp, ep)
            if not layout_problems(model, hw, lay):
                out.append(lay)
    return out


__all__ = ["Layout", "KEYS", "layout_problems", "check_layout", "layouts_for"]
