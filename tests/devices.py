"""Where kernel tests run: a CUDA GPU when present, else the CPU (Triton's interpreter)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# The ``gpu`` marker; tests/conftest.py skips a marked test with this reason on a machine without CUDA.
gpu = pytest.mark.gpu(reason="needs a CUDA GPU: checks the compiled kernels in bf16 "
                             "(the interpreter runs on this machine)")
