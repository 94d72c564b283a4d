"""servesim: an LLM-serving simulator with a real-GPU execution mode.

The repository's top-level folders (sim/, policies/, traces/, gpu_backend/, kernels/)
are installed as sub-packages of this distribution (servesim.sim, ...).
"""

__version__ = "0.1.0"
