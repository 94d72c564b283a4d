"""`servesim.analysis`: read runs, sweeps, searches and comparisons (sim/analysis.py)."""

from .sim.analysis import *  # noqa: F401,F403
from .sim.analysis import __all__  # noqa: F401
