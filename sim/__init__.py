"""servesim.sim."""
