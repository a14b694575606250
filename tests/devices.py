"""Where kernel tests run: a CUDA GPU when present, else the CPU (Triton's interpreter)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: checks the compiled kernels "
                                               "in bf16 (the interpreter runs on this machine)")
