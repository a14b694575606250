"""Vector in pixel (PNFS §III-D, Appendix A): heads, the squash function and the PNFS loss (Eq. 6).

Each keypoint is a ``d``-dimensional vector ``v`` at every pixel of a part
representation ``T_p`` (``[B, J_p, d, h, w]`` here; the paper writes ``J x h' x w' x d``).
Its squashed length ``f_S(v) = ||v||^2 / (1 + ||v||^2)`` in ``[0, 1)`` is the
keypoint's score at that pixel (Eq. 5); the longest vector is the keypoint's
location. ``d = 1`` is the plain heatmap (PNFS Table IV: "d = 1 (scalar)", "the
common heatmap regression approach without vector in pixel"): the one channel
*is* the score, with no squash.

Shared keypoints (a joint in several parts) are combined by summing the parts'
scores (:func:`threempose.pnfs.parts.merge_part_outputs`), and Eq. 6 compares
that sum with the Gaussian target.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from threempose.pnfs.parts import merge_part_outputs

# Squared lengths below this are treated as exactly zero where a square root is
# taken, so that gradients at v = 0 are 0 instead of NaN (|v| < 1e-12 is far below
# anything a network can resolve).
_TINY_SQUARED = 1e-24


def squash_length(vectors: Tensor, dim: int = 2) -> Tensor:
    """PNFS Eq. 5: ``f_S(v) = ||v||^2 / (1 + ||v||^2)``, the length of the squashed vector.

    Args:
        vectors: any shape; ``dim`` holds the ``d`` vector components
            (``[B, J, d, h, w]`` with the default ``dim = 2``).
        dim: the vector dimension.
    Returns:
        ``vectors.shape`` without ``dim``, values in ``[0, 1)``. Its gradient is
        ``2 v / (1 + ||v||^2)^2`` (smooth, 0 at ``v = 0``).
    """
    squared = (vectors * vectors).sum(dim=dim)
    return squared / (1.0 + squared)


def squash(vectors: Tensor, dim: int = 2) -> Tensor:
    """PNFS Eq. 4: ``v_s = f_S(v) v / ||v||``, the vector rescaled to length ``f_S(v)``.

    Args:
        vectors: any shape with the ``d`` components along ``dim``.
    Returns:
        The same shape; ``||v_s|| = f_S(v)`` in ``[0, 1)``, direction of ``v`` kept.
    """
    squared = (vectors * vectors).sum(dim=dim, keepdim=True)
    length = squared.clamp_min(_TINY_SQUARED).sqrt()
    return vectors * (length / (1.0 + squared))


def expected_length(score: Tensor) -> Tensor:
    """PNFS Eq. 9: the length ``||v|| = sqrt(1 / (1 - s) - 1)`` whose squashed length is ``s``.

    This is what a target score ``c`` asks of the raw vector (Appendix A: a Gaussian
    peak of 0.99 asks for ``||v|| ~ 9.95``, a score of 0.5 for ``||v|| = 1``).

    Args:
        score: any shape, values in ``[0, 1)``.
    Returns:
        The same shape, values in ``[0, inf)``; ``squash_length`` of a vector this long is ``score``.
    """
    if bool(((score < 0) | (score >= 1) | ~torch.isfinite(score)).any()):
        raise ValueError("expected_length: squashed lengths must lie in [0, 1); the inverse "
                         f"squash is undefined for values in [{score.min().item()}, {score.max().item()}]")
    return torch.sqrt(score / (1.0 - score))


def unsquash(squashed: Tensor, dim: int = 2) -> Tensor:
    """The inverse of :func:`squash`: the vector ``v`` with ``squash(v) == squashed``.

    Args:
        squashed: any shape with the ``d`` components along ``dim``; every vector's
            length must be in ``[0, 1)``.
    Returns:
        The same shape: ``squashed`` rescaled to length :func:`expected_length` of its length.
    """
    squared = (squashed * squashed).sum(dim=dim, keepdim=True)
    length = squared.clamp_min(_TINY_SQUARED).sqrt()
    return squashed * (expected_length(length) / length)


def keypoint_scores(vectors: Tensor) -> Tensor:
    """Per-pixel keypoint scores of one part representation.

    Args:
        vectors: ``[B, J, d, h, w]``.
    Returns:
        ``[B, J, h, w]``: :func:`squash_length` over ``d`` when ``d > 1``; the raw
        channel when ``d = 1`` (the plain heatmap).
    """
    if vectors.dim() != 5:
        raise ValueError(f"part vectors must be [B, J, d, h, w], got shape {list(vectors.shape)}")
    if vectors.shape[2] == 1:
        return vectors[:, :, 0]
    return squash_length(vectors, dim=2)


def part_scores(part_vectors: Sequence[Tensor], num_parts: int, dataset: str = "coco") -> Tensor:
    """Scores of all joints from the ``P`` part representations (shared joints summed).

    Args:
        part_vectors: ``P`` tensors ``[B, J_p, d, h, w]`` (``J_p = len(part_groups(P, dataset)[p])``).
        num_parts: ``P`` (1, 3, 5 or 8).
        dataset: ``"coco"`` (17 joints) or ``"mpii"`` (16, MPII release order).
    Returns:
        ``[B, J, h, w]`` (J = 17 or 16), the predicted score maps of Eq. 6 (also what inference decodes).
    """
    return merge_part_outputs([keypoint_scores(v) for v in part_vectors], num_parts, dataset)


def pnfs_loss(scores: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """PNFS Eq. 6 with visibility weights, averaged over the batch.

    ``L = mean_b (1/K) sum_k weight[b, k] * sum_z (scores[b, k, z] - target[b, k, z])^2``.
    As in the paper, pixels are summed (not averaged) and ``K`` is all joints (17),
    masked ones included; a weight of 0 masks a joint without position annotation.

    Args:
        scores: ``[B, K, h, w]`` from :func:`part_scores` (shared joints already summed).
        target: ``[B, K, h, w]`` Gaussian score maps (peak 1).
        weight: ``[B, K]`` visibility weights (1 = annotated, 0 = masked).
    Returns:
        A scalar tensor.
    """
    if scores.shape != target.shape or scores.dim() != 4:
        raise ValueError(f"pnfs_loss: scores {list(scores.shape)} and target {list(target.shape)} "
                         "must both be [B, K, h, w]")
    if tuple(weight.shape) != tuple(scores.shape[:2]):
        raise ValueError(f"pnfs_loss: weight must be [B, K] = {list(scores.shape[:2])}, "
                         f"got {list(weight.shape)}")
    per_joint = ((scores - target) ** 2).sum(dim=(2, 3))           # [B, K]
    return (per_joint * weight).sum(dim=1).div(scores.shape[1]).mean()


class VectorInPixelHead(nn.Module):
    """The output layer of one part: a 1x1 conv to ``J * d`` channels, read as ``[B, J, d, h, w]``.

    Args:
        in_channels: channels of the part's 1/4-scale feature map.
        num_joints: ``J``, the joints of the part.
        dim: ``d``, the vector length (8 in PNFS; 1 for a plain heatmap).
        initial_score: the squashed score the head starts at for unit-variance inputs: the
            weights are ``N(0, s^2)`` with ``in_channels * d * s^2 = expected_length(initial_score)^2``
            (the expected ``||v||^2``) and the bias 0. A small start (0.05, the default) spares
            the first steps unlearning ~0.4 scores everywhere, and, unlike a ~0 start, keeps the
            squash's gradient ``2 v / (1 + ||v||^2)^2`` (0 at ``v = 0``) alive. For ``d = 1`` the
            channel is the score itself (mean 0), whose spread starts at ``initial_score``:
            ``s = initial_score / sqrt(in_channels)``.
    """

    def __init__(self, in_channels: int, num_joints: int, dim: int = 8, initial_score: float = 0.05) -> None:
        super().__init__()
        if in_channels < 1 or num_joints < 1 or dim < 1:
            raise ValueError(f"VectorInPixelHead needs in_channels, num_joints and dim >= 1, got "
                             f"{in_channels}, {num_joints}, {dim}")
        if not 0.0 < initial_score < 1.0:
            raise ValueError(f"VectorInPixelHead initial_score must be in (0, 1), got {initial_score}")
        self.num_joints, self.dim = num_joints, dim
        self.conv = nn.Conv2d(in_channels, num_joints * dim, kernel_size=1)
        if dim == 1:
            std = initial_score / in_channels ** 0.5
        else:
            std = (initial_score / (1.0 - initial_score) / (in_channels * dim)) ** 0.5
        nn.init.normal_(self.conv.weight, std=std)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, in_channels, h, w]`` -> vectors ``[B, J, d, h, w]``."""
        out = self.conv(features)
        return out.view(out.shape[0], self.num_joints, self.dim, *out.shape[2:])
