"""Triton kernels, one module per family (installed as ``genfast.kernels``)."""
