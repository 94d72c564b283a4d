"""The hardware spec of the device a benchmark runs on.

The GPU backend refuses a hardware spec that does not describe the CUDA device, so every
benchmark that runs it (or prices against this card's roofline) names the spec whose
``device_names`` match the device (`servesim.sim.specs.hardware_for_device`), never a
fixed ``h100-sxm``.
"""

from __future__ import annotations


def device_name() -> str:
    """The CUDA device's name, or "cpu" (no CUDA device, or no torch)."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def hardware_here(default: str = "h100-sxm") -> str:
    """The bundled hardware spec of this machine's CUDA device; ``default`` (the
    experiments' own card) where there is no CUDA device (the CPU smoke runs). A CUDA
    device that no bundled spec describes is an error naming it."""
    from servesim.sim.specs import hardware_for_device

    name = device_name()
    if name == "cpu":
        return default
    hw = hardware_for_device(name)
    if hw is None:
        raise SystemExit(f"no bundled hardware spec describes the CUDA device {name!r} (sim/data/hardware/*.yaml "
                         "device_names): add one")
    return hw
