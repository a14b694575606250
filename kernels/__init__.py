"""Triton kernels for threempose's hot loops, each beside its PyTorch reference (installed as
``threempose.kernels``; import it under that name, never as a top-level ``kernels``).

Public API (each dispatches through :mod:`threempose.kernels.backend`: ``auto`` runs Triton for
CUDA tensors and the PyTorch reference for CPU tensors; ``triton``; ``reference``):

* :func:`mixed_op_sum` -- ``sum_k w[k] * O_k`` over a cell edge's candidate ops.
* :func:`gumbel_topk` -- Gumbel top-k hard masks with straight-through softmax gradients, all
  rows in one launch (Dyn-EGS); :func:`gumbel_noise` is the noise it adds.
* :func:`rdm_pearson` -- teacher x student Pearson correlations of RDMs (teacher loss).
* :func:`heatmap_moments` -- per-heatmap mean, m2, skew, kurtosis (dynamic inference).

Each ``*_reference`` function is the plain PyTorch implementation with the same signature.
"""
from .backend import get_backend, set_backend, use_backend
from .gumbel_topk import gumbel_noise, gumbel_noise_reference, gumbel_topk, gumbel_topk_reference
from .mixed_op_sum import mixed_op_sum, mixed_op_sum_reference
from .heatmap_moments import heatmap_moments, heatmap_moments_reference
from .rdm_pearson import rdm_pearson, rdm_pearson_reference

__all__ = [
    "get_backend", "set_backend", "use_backend",
    "mixed_op_sum", "mixed_op_sum_reference",
    "gumbel_topk", "gumbel_topk_reference", "gumbel_noise", "gumbel_noise_reference",
    "rdm_pearson", "rdm_pearson_reference",
    "heatmap_moments", "heatmap_moments_reference",
]
