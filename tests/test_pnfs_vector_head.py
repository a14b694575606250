"""Vector in pixel: squash (PNFS Eq. 4/5), its inverse (Appendix A Eq. 9), gradients, the Eq. 6 loss."""
from __future__ import annotations

import math

import pytest
import torch

from threempose.pnfs.parts import part_groups
from threempose.pnfs.vector_head import (
    VectorInPixelHead, expected_length, keypoint_scores, part_scores, pnfs_loss, squash, squash_length,
    unsquash,
)


def test_squash_closed_form():
    v = torch.tensor([3.0, 4.0])                       # ||v|| = 5
    assert squash_length(v, dim=0).item() == pytest.approx(25 / 26)
    assert torch.allclose(squash(v, dim=0), torch.tensor([0.6, 0.8]) * 25 / 26)
    assert squash_length(torch.zeros(8), dim=0).item() == 0.0
    assert torch.equal(squash(torch.zeros(8), dim=0), torch.zeros(8))


def test_expected_length_is_eq9():
    s = torch.tensor([0.0, 0.5, 0.99, 0.2])
    expected = torch.tensor([0.0, 1.0, math.sqrt(99.0), math.sqrt(1 / 0.8 - 1)])
    assert torch.allclose(expected_length(s), expected)
    # A vector of that length squashes back to s.
    v = torch.zeros(4, 8)
    v[:, 3] = expected_length(s)
    assert torch.allclose(squash_length(v, dim=1), s)


def test_squash_round_trip():
    torch.manual_seed(0)
    v = torch.randn(2, 5, 8, 3, 4, dtype=torch.float64) * 3
    assert torch.allclose(unsquash(squash(v)), v, atol=1e-10)
    s = squash(v)
    assert torch.all(s.norm(dim=2) < 1)
    assert torch.allclose(squash(unsquash(s)), s, atol=1e-12)
    assert torch.allclose(s.norm(dim=2), squash_length(v))


def test_squash_length_gradient_closed_form():
    torch.manual_seed(1)
    v = torch.randn(3, 4, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    squash_length(v).sum().backward()
    squared = (v.detach() ** 2).sum(dim=2, keepdim=True)
    assert torch.allclose(v.grad, 2 * v.detach() / (1 + squared) ** 2)


def test_squash_gradients_match_finite_differences_and_are_finite_at_zero():
    torch.manual_seed(2)
    v = torch.randn(2, 3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(squash, (v,))
    assert torch.autograd.gradcheck(squash_length, (v,))
    zero = torch.zeros(1, 1, 8, 1, 1, requires_grad=True)
    (squash(zero).sum() + squash_length(zero).sum()).backward()
    # The true derivative at 0 is 0 (v_s ~ v ||v||); the clamped norm leaves at most 1e-12.
    assert torch.isfinite(zero.grad).all() and zero.grad.abs().max() <= 1e-12


def test_expected_length_rejects_scores_outside_unit_interval():
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            expected_length(torch.tensor([0.5, bad]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        unsquash(torch.tensor([[0.6, 0.8]]), dim=1)       # length 1


def test_d1_is_the_plain_heatmap():
    raw = torch.randn(2, 3, 1, 4, 4)
    assert torch.equal(keypoint_scores(raw), raw[:, :, 0])
    vec = torch.randn(2, 3, 8, 4, 4)
    assert torch.allclose(keypoint_scores(vec), squash_length(vec, dim=2))
    with pytest.raises(ValueError, match=r"\[B, J, d, h, w\]"):
        keypoint_scores(torch.randn(2, 3, 4, 4))


def test_pnfs_loss_hand_case():
    scores = torch.tensor([[[[0.5, 0.0]], [[1.0, 1.0]]]])      # [1, 2, 1, 2]
    target = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])
    # joint 0: (0.5 - 1)^2 = 0.25; joint 1: 1 + 1 = 2; pixels summed, joints averaged over K = 2.
    assert pnfs_loss(scores, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx((0.25 + 2) / 2)
    assert pnfs_loss(scores, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.25 / 2)
    # Batch mean: a second sample with zero error halves the loss.
    batch = pnfs_loss(torch.cat([scores, target]), torch.cat([target, target]), torch.ones(2, 2))
    assert batch.item() == pytest.approx(1.125 / 2)


def test_eq6_sums_shared_keypoints_before_the_error():
    # P = 8, d = 2, 1 x 1 maps. The left elbow (7) is in "left upper arm" (channel 1) and
    # "left lower arm" (channel 0); each predicts f_S = 0.5, so their sum meets a target of 1.
    groups = part_groups(8)
    vectors = [torch.zeros(1, len(g), 2, 1, 1) for g in groups]
    vectors[1][0, 1, :, 0, 0] = torch.tensor([1.0, 0.0])       # f_S = 1 / 2
    vectors[2][0, 0, :, 0, 0] = torch.tensor([0.0, 1.0])       # f_S = 1 / 2
    vectors[2][0, 1, :, 0, 0] = torch.tensor([1.0, 1.0])       # left wrist: f_S = 2 / 3, target 0
    target = torch.zeros(1, 17, 1, 1)
    target[0, 7] = 1.0
    scores = part_scores(vectors, 8)
    assert scores[0, 7, 0, 0].item() == pytest.approx(1.0)
    assert scores[0, 9, 0, 0].item() == pytest.approx(2 / 3)
    loss = pnfs_loss(scores, target, torch.ones(1, 17))
    assert loss.item() == pytest.approx((2 / 3) ** 2 / 17)
    weight = torch.ones(1, 17)
    weight[0, 9] = 0.0                                         # wrist without annotation: masked
    assert pnfs_loss(scores, target, weight).item() == pytest.approx(0.0, abs=1e-12)


def test_pnfs_loss_shape_errors():
    with pytest.raises(ValueError, match="weight"):
        pnfs_loss(torch.zeros(1, 17, 2, 2), torch.zeros(1, 17, 2, 2), torch.zeros(17))
    with pytest.raises(ValueError, match="target"):
        pnfs_loss(torch.zeros(1, 17, 2, 2), torch.zeros(1, 17, 2, 3), torch.zeros(1, 17))


def test_head_layout():
    head = VectorInPixelHead(in_channels=6, num_joints=3, dim=8)
    x = torch.randn(2, 6, 5, 4)
    vectors = head(x)
    assert vectors.shape == (2, 3, 8, 5, 4)
    flat = head.conv(x)
    assert torch.equal(vectors[:, 2, 5], flat[:, 2 * 8 + 5])   # joint j, component c = channel j d + c
    with pytest.raises(ValueError, match="dim"):
        VectorInPixelHead(6, 3, dim=0)


def test_head_starts_at_the_requested_score_for_unit_variance_features():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32, 32)
    vectors = VectorInPixelHead(in_channels=16, num_joints=3, dim=8, initial_score=0.05)(x)
    squared = (vectors ** 2).sum(2)                        # E ||v||^2 = expected_length(0.05)^2 = 0.0526
    assert squared.mean().item() == pytest.approx(0.05 / 0.95, rel=0.15)
    assert 0.03 < keypoint_scores(vectors).mean().item() < 0.06
    scalar = VectorInPixelHead(in_channels=16, num_joints=3, dim=1, initial_score=0.05)(x)
    assert scalar.std().item() == pytest.approx(0.05, rel=0.15)   # d = 1: the channel is the score
    with pytest.raises(ValueError, match="initial_score"):
        VectorInPixelHead(16, 3, initial_score=1.0)
