"""Triton kernels of fastprune (installed as ``fastprune.kernels``)."""
