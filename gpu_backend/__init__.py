"""servesim.gpu_backend."""
