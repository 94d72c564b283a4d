"""The README's configuration reference is generated from the config models: keep in sync."""

from pathlib import Path

from servesim.sim.config_doc import markdown


def test_config_reference_in_sync():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert markdown() in readme, "regenerate with: python -m servesim.sim.config_doc"
