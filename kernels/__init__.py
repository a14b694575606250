"""Triton kernels for threempose's hot loops, each beside its PyTorch reference (installed as ``threempose.kernels``)."""
