"""Triton kernels (@triton.jit) and their host wrappers; imported lazily by backend selection."""
