"""Fused Triton kernels for the masked PPO math, imported as ``stepcoder.kernels``."""
