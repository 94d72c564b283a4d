import os
import sys
from pathlib import Path

# engine_harness.py and other shared test helpers live beside the tests
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MPLBACKEND", "Agg")
