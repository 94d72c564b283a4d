"""servesim.kernels."""
