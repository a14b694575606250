"""Backend switch of threempose.kernels: env var, set_backend, context manager, auto dispatch."""
import importlib
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from threempose import kernels
from threempose.kernels import backend

# the package exports functions named like their modules: reach the modules by their full name
gumbel_mod = importlib.import_module("threempose.kernels.gumbel_topk")
mixed_mod = importlib.import_module("threempose.kernels.mixed_op_sum")
moments_mod = importlib.import_module("threempose.kernels.heatmap_moments")
rdm_mod = importlib.import_module("threempose.kernels.rdm_pearson")

HAS_CUDA = torch.cuda.is_available()


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``env`` on top of a copy of ours."""
    full = {k: v for k, v in os.environ.items()
            if k not in ("TRITON_INTERPRET", "THREEMPOSE_KERNELS")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=120)


def test_cpu_session_runs_the_kernels_in_the_interpreter():
    """Without a GPU, conftest must have made every kernel an interpreted Triton function;
    otherwise the 'triton' tests could not run the Triton code at all."""
    if HAS_CUDA:
        pytest.skip("a CUDA GPU is present: the kernels compile for it, no interpreter")
    from triton.runtime.interpreter import InterpretedFunction

    assert backend.interpreting()
    for kern in (mixed_mod._mixed_op_sum_fwd_kernel, mixed_mod._mixed_op_sum_bwd_kernel,
                 gumbel_mod._gumbel_topk_fwd_kernel, gumbel_mod._gumbel_topk_bwd_kernel,
                 gumbel_mod._gumbel_noise_kernel, rdm_mod._gram_fwd_kernel,
                 rdm_mod._gram_bwd_kernel, moments_mod._moments_partial_kernel,
                 moments_mod._moments_combine_kernel, moments_mod._moments_bwd_kernel):
        assert isinstance(kern, InterpretedFunction), kern


def test_set_backend_and_context_manager_restore():
    start = kernels.get_backend()
    try:
        kernels.set_backend("reference")
        assert kernels.get_backend() == "reference"
        with kernels.use_backend("triton") as name:
            assert name == "triton" and kernels.get_backend() == "triton"
            with kernels.use_backend("AUTO"):
                assert kernels.get_backend() == "auto"
            assert kernels.get_backend() == "triton"
        assert kernels.get_backend() == "reference"
        with pytest.raises(RuntimeError):
            with kernels.use_backend("auto"):
                raise RuntimeError("boom")
        assert kernels.get_backend() == "reference"   # restored after an exception too
    finally:
        kernels.set_backend(start)
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, triton, reference"):
        kernels.set_backend("cuda")


def test_auto_sends_cpu_tensors_to_the_reference():
    x = [torch.randn(2, 3), torch.randn(2, 3)]
    w = torch.tensor([1.0, 2.0])
    backend.launch_counts.clear()
    with kernels.use_backend("auto"):
        assert backend.resolve("op", *x) == "reference"
        y = kernels.mixed_op_sum(x, w)
        kernels.heatmap_moments(torch.rand(1, 2, 3, 3))
        kernels.gumbel_topk(torch.randn(4, 3), 1, 1.0, 0)
        kernels.rdm_pearson([torch.randn(4, 5)], [torch.randn(4, 2)])
    assert sum(backend.launch_counts.values()) == 0
    torch.testing.assert_close(y, x[0] + 2 * x[1])


def test_forced_triton_launches_kernels_and_reference_does_not():
    if not (HAS_CUDA or backend.interpreting()):
        pytest.fail("no GPU and no TRITON_INTERPRET: conftest.py did not take effect")
    dev = "cuda" if HAS_CUDA else "cpu"
    x = [torch.randn(2, 3, device=dev) for _ in range(3)]
    w = torch.tensor([1.0, 0.0, 2.0], device=dev)
    backend.launch_counts.clear()
    with kernels.use_backend("reference"):
        ref = kernels.mixed_op_sum(x, w)
    assert sum(backend.launch_counts.values()) == 0
    with kernels.use_backend("triton"):
        out = kernels.mixed_op_sum(x, w)
    assert backend.launch_counts == {"mixed_op_sum_fwd": 1}
    torch.testing.assert_close(out, ref)


def test_env_var_selects_backend_and_triton_on_cpu_without_interpreter_is_a_clear_error():
    res = _run("""
        import torch
        from threempose import kernels
        from threempose.kernels import backend
        assert kernels.get_backend() == "triton", kernels.get_backend()
        assert not backend.interpreting()
        try:
            kernels.mixed_op_sum([torch.ones(3)], torch.ones(1))
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e) and "'reference'" in str(e), e
            print("CLEAR_ERROR")
        kernels.set_backend("reference")    # the config's run.kernels calls this
        print(kernels.mixed_op_sum([torch.ones(3)], torch.full((1,), 2.0)).tolist())
    """, THREEMPOSE_KERNELS="triton")
    assert res.returncode == 0, res.stderr
    assert "CLEAR_ERROR" in res.stdout and "[2.0, 2.0, 2.0]" in res.stdout

    bad = _run("import threempose.kernels", THREEMPOSE_KERNELS="fast")
    assert bad.returncode != 0
    assert "THREEMPOSE_KERNELS" in bad.stderr and "'fast'" in bad.stderr


def test_without_triton_installed_the_reference_still_works():
    res = _run("""
        import sys
        sys.modules["triton"] = None            # import triton -> ImportError
        import torch
        from threempose import kernels
        from threempose.kernels import backend
        assert not backend.HAS_TRITON
        y = kernels.heatmap_moments(torch.rand(1, 1, 4, 5))
        assert y.shape == (1, 1, 4)
        with kernels.use_backend("triton"):
            try:
                kernels.gumbel_topk(torch.zeros(2, 3), 1, 1.0, 0)
            except RuntimeError as e:
                assert "not installed" in str(e), e
                print("CLEAR_ERROR")
    """)
    assert res.returncode == 0, res.stderr
    assert "CLEAR_ERROR" in res.stdout


def test_triton_below_the_floor_fails_at_import_with_the_versions(tmp_path):
    fake = tmp_path / "triton"                   # a Triton 3.1 that the kernels cannot run on
    (fake / "language").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '3.1.0'\ndef jit(fn=None, **kw):\n    return fn\n")
    (fake / "language" / "__init__.py").write_text("constexpr = None\n")
    res = _run("import threempose.kernels", PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert res.returncode != 0
    assert "ImportError" in res.stderr and "Triton >= 3.3" in res.stderr and "3.1.0" in res.stderr
    for ok in ("3.3.0", "3.9.0+git1234", "4.0"):
        backend._check_triton_version(ok)
    for bad in ("3.2.1", "2.3.0", "unknown"):
        with pytest.raises(ImportError, match=f"Triton {re.escape(bad)} is installed"):
            backend._check_triton_version(bad)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors that ``resolve`` takes for CUDA tensors, with a clean warn-once record."""
    monkeypatch.setattr(backend, "_on_cuda", lambda tensors: True)
    backend.fallback_warnings.clear()
    yield
    backend.fallback_warnings.clear()


def _fallback_messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_auto_warns_once_when_cuda_tensors_fall_back_without_triton(fake_cuda, monkeypatch):
    monkeypatch.setattr(backend, "HAS_TRITON", False)
    x, w = [torch.randn(4), torch.randn(4)], torch.tensor([1.0, 2.0])
    backend.launch_counts.clear()
    with kernels.use_backend("auto"), pytest.warns(RuntimeWarning) as record:
        for _ in range(3):
            y = kernels.mixed_op_sum(x, w)
    messages = _fallback_messages(record)
    assert len(messages) == 1 and "mixed_op_sum" in messages[0] and "Triton is not installed" in messages[0]
    assert sum(backend.launch_counts.values()) == 0
    torch.testing.assert_close(y, x[0] + 2 * x[1])


def test_auto_warns_once_per_reason_for_float64_and_large_rdm_batches(fake_cuda, monkeypatch):
    with kernels.use_backend("auto"), pytest.warns(RuntimeWarning) as record:
        for _ in range(2):
            kernels.heatmap_moments(torch.rand(1, 2, 3, 3, dtype=torch.float64))
            kernels.rdm_pearson([torch.randn(65, 3)], [torch.randn(65, 2)])
    messages = _fallback_messages(record)
    assert len(messages) == 2, messages
    assert "heatmap_moments" in messages[0] and "float64" in messages[0]
    assert "rdm_pearson" in messages[1] and "limit of 64" in messages[1]
    with kernels.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")              # supported CPU calls never warn
        monkeypatch.setattr(backend, "_on_cuda", lambda tensors: False)
        kernels.heatmap_moments(torch.rand(1, 2, 3, 3, dtype=torch.float64))
