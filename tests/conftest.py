"""Test-session setup shared by the whole suite.

Triton kernels on a CPU-only machine: Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit``
kernel is *decorated*, i.e. when ``threempose.kernels`` is first imported. pytest imports this
file before it collects any test module, so setting the variable here (only when no CUDA
device is present, and only if the caller did not set it) makes the kernel tests run the real
Triton kernel code in Triton's CPU interpreter. With a GPU, the kernels compile for it as usual.
The ``auto`` backend still sends CPU tensors to the PyTorch reference, so other tests are
unaffected.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest


def pytest_collection_modifyitems(config, items):
    """A test marked ``gpu`` skips on a machine without CUDA, with the reason its marker gives
    (``@pytest.mark.gpu(reason=...)``), so the marker alone both labels and guards it."""
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=marker.kwargs.get("reason", "needs a CUDA GPU")))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny test models are dispatch-bound: one intra-op thread is faster on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_backend():
    """Force the Triton path (compiled on a GPU, interpreted on the CPU) and count launches."""
    import torch

    from threempose.kernels import backend, use_backend

    if not (torch.cuda.is_available() or backend.interpreting()):
        pytest.fail("no GPU and no TRITON_INTERPRET=1: tests/conftest.py did not take effect")
    backend.launch_counts.clear()
    with use_backend("triton"):
        yield
