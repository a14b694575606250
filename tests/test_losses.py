"""Loss terms against hand-computed values and independent numpy references."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from threempose.config import LossConfig
from threempose.training.losses import (NonFiniteLossError, PoseLoss, ae_loss, flops_loss, flops_loss_scale, heatmap_loss, teacher_loss)


# --------------------------------------------------------------------------- #
# heatmap
# --------------------------------------------------------------------------- #
def test_heatmap_loss_hand_case():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])          # [1, 1, 2, 2]
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])           # the 2.0 pixel is ignored
    # (1 + 0 + 9 + 16) / 4 pixels (masked pixels still count in the mean)
    assert heatmap_loss(pred, target, mask).item() == pytest.approx(26 / 4)


def test_heatmap_loss_matches_numpy():
    rng = np.random.default_rng(0)
    p, t = rng.random((3, 5, 6, 7)), rng.random((3, 5, 6, 7))
    m = (rng.random((3, 6, 7)) > 0.3).astype(np.float64)
    ref = (((p - t) ** 2) * m[:, None]).mean(axis=(1, 2, 3)).mean()
    got = heatmap_loss(torch.tensor(p), torch.tensor(t), torch.tensor(m))
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref, rel=1e-6)


def test_heatmap_loss_rejects_bad_mask():
    with pytest.raises(ValueError, match=r"mask must be \[B, h, w\]"):
        heatmap_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))


# --------------------------------------------------------------------------- #
# associative embedding
# --------------------------------------------------------------------------- #
def _put(tags, joints, b, p, j, y, x, value):
    """Write tag ``value`` for joint j of person p at (y, x) and register it as visible."""
    w = tags.shape[3]
    tags[b, j, y, x] = value
    joints[b, p, j] = torch.tensor([y * w + x, 1])


def test_ae_loss_two_people_hand_computed():
    tags = torch.zeros(1, 3, 4, 4)
    joints = torch.zeros(1, 3, 3, 2, dtype=torch.int64)        # 3 slots, slot 2 is padding
    _put(tags, joints, 0, 0, 0, 0, 1, 1.0)                     # person 0: tags 1, 2 (joint 2 hidden)
    _put(tags, joints, 0, 0, 1, 2, 3, 2.0)
    _put(tags, joints, 0, 1, 0, 3, 3, 3.0)                     # person 1: tags 3, 3, 6
    _put(tags, joints, 0, 1, 1, 1, 0, 3.0)
    _put(tags, joints, 0, 1, 2, 0, 1, 6.0)                     # same pixel as person 0 joint 0, other channel
    push, pull = ae_loss(tags, joints)
    # means 1.5 and 4; pull = ((0.25 + 0.25) / 2 + (1 + 1 + 4) / 3) / 2 = (0.25 + 2) / 2
    assert pull.item() == pytest.approx(1.125)
    # push = (2 * exp(-2.5^2)) / (2 * 1) * 0.5
    assert push.item() == pytest.approx(0.5 * math.exp(-6.25))


def test_ae_loss_zero_and_one_person_and_batch_mean():
    tags = torch.zeros(3, 2, 3, 3)
    joints = torch.zeros(3, 2, 2, 2, dtype=torch.int64)
    # image 0: nobody; image 1: one person (tags 0 and 2); image 2: two people, all tags equal
    _put(tags, joints, 1, 0, 0, 0, 0, 0.0)
    _put(tags, joints, 1, 0, 1, 2, 2, 2.0)
    _put(tags, joints, 2, 0, 0, 1, 1, 0.5)
    _put(tags, joints, 2, 1, 1, 1, 2, 0.5)
    push, pull = ae_loss(tags, joints)
    # per image pull: 0, 1, 0; push: 0 (K=0), 0 (K=1), exp(0) * 2 / 2 * 0.5 = 0.5
    assert pull.item() == pytest.approx(1 / 3)
    assert push.item() == pytest.approx(0.5 / 3)


def _ae_reference(tags: np.ndarray, joints: np.ndarray) -> tuple[float, float]:
    """HigherHRNet's AELoss('exp'), loop by loop, in numpy."""
    b, j, h, w = tags.shape
    flat = tags.reshape(b, -1)
    pushes, pulls = [], []
    for i in range(b):
        means, pull = [], 0.0
        for person in joints[i]:
            vals = [flat[i, k * h * w + loc] for k, (loc, vis) in enumerate(person) if vis > 0]
            if not vals:
                continue
            means.append(np.mean(vals))
            pull += np.mean((np.array(vals) - means[-1]) ** 2)
        n = len(means)
        if n == 0:
            pushes.append(0.0)
            pulls.append(0.0)
            continue
        pulls.append(pull / n)
        if n == 1:
            pushes.append(0.0)
            continue
        m = np.array(means)
        e = np.exp(-(m[:, None] - m[None, :]) ** 2)
        pushes.append((e.sum() - n) / ((n - 1) * n) * 0.5)
    return float(np.mean(pushes)), float(np.mean(pulls))


def test_ae_loss_matches_loop_reference_on_random_people():
    rng = np.random.default_rng(1)
    b, j, h, w, p = 4, 5, 6, 6, 4
    tags = rng.normal(size=(b, j, h, w))
    joints = np.stack([rng.integers(0, h * w, size=(b, p, j)),
                       rng.random((b, p, j)) > 0.4], axis=-1).astype(np.int64)
    joints[0, :, :, 1] = 0                                      # an image with nobody
    push, pull = ae_loss(torch.tensor(tags), torch.tensor(joints))
    ref_push, ref_pull = _ae_reference(tags, joints)
    assert push.item() == pytest.approx(ref_push, rel=1e-5)
    assert pull.item() == pytest.approx(ref_pull, rel=1e-5)


def test_ae_loss_gradient_reaches_only_visible_joint_pixels():
    tags = torch.zeros(1, 2, 3, 3)
    joints = torch.zeros(1, 2, 2, 2, dtype=torch.int64)
    _put(tags, joints, 0, 0, 0, 0, 0, 0.0)
    _put(tags, joints, 0, 0, 1, 1, 1, 1.0)
    _put(tags, joints, 0, 1, 0, 2, 2, 0.3)
    tags.requires_grad_(True)
    push, pull = ae_loss(tags, joints)
    (push + pull).backward()
    nonzero = set(map(tuple, tags.grad[0].nonzero().tolist()))
    assert nonzero == {(0, 0, 0), (1, 1, 1), (0, 2, 2)}


def test_ae_loss_rejects_visible_joint_outside_the_map():
    tags = torch.zeros(1, 1, 2, 2)
    joints = torch.tensor([[[[4, 1]]]])
    with pytest.raises(ValueError, match="outside 0..3"):
        ae_loss(tags, joints)
    joints[..., 1] = 0                                          # invisible: ignored
    push, pull = ae_loss(tags, joints)
    assert push.item() == 0.0 and pull.item() == 0.0


def test_ae_loss_ignores_non_finite_tags_under_hidden_joints():
    tags = torch.zeros(1, 2, 2, 2)
    tags[0, 1, 0, 0] = float("nan")
    joints = torch.zeros(1, 2, 2, 2, dtype=torch.int64)
    _put(tags, joints, 0, 0, 0, 1, 1, 1.0)                     # person 0: joint 0 only
    _put(tags, joints, 0, 1, 0, 0, 1, 2.0)                     # person 1: joint 0 only
    push, pull = ae_loss(tags, joints)                          # joint 1 hidden, index 0 -> the NaN
    assert pull.item() == 0.0
    assert push.item() == pytest.approx(0.5 * math.exp(-1.0))


# --------------------------------------------------------------------------- #
# FLOPs
# --------------------------------------------------------------------------- #
def test_flops_loss_value_and_gradient():
    g = torch.tensor(16.63, dtype=torch.float64, requires_grad=True)
    loss = flops_loss(g)
    loss.backward()
    assert loss.item() == pytest.approx((16.63 / 47.8) ** 0.15)
    assert g.grad.item() == pytest.approx(0.15 / 47.8 * (16.63 / 47.8) ** (0.15 - 1))
    assert flops_loss(torch.tensor(47.8)).item() == pytest.approx(1.0)


def test_flops_loss_scale_schedule_per_epoch():
    expected = [1e-4] * 3 + [1e-3] * 3 + [1e-2] * 3 + [1e-1] * 3 + [1.0] * 23   # 35 epochs
    got = [flops_loss_scale(e) for e in range(35)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert flops_loss_scale(10_000) == 1.0
    assert flops_loss_scale(4, start=1e-3, every=2, cap=0.05) == pytest.approx(0.05)
    assert flops_loss_scale(3, start=1e-3, every=2, cap=0.05) == pytest.approx(1e-2)
    with pytest.raises(ValueError):
        flops_loss_scale(-1)


# --------------------------------------------------------------------------- #
# teacher
# --------------------------------------------------------------------------- #
def _teacher_reference(student, teacher) -> float:
    """1 - mean_i max_j corrcoef(pdist(teacher_i), pdist(student_j)), in numpy."""
    rs = [pdist(s.reshape(len(s), -1)) for s in student]
    rt = [pdist(t.reshape(len(t), -1)) for t in teacher]
    sims = [max(np.corrcoef(t, s)[0, 1] for s in rs) for t in rt]
    return 1.0 - float(np.mean(sims))


def _torch_rdm_pearson(student, teacher):
    """Plain torch stand-in with rdm_pearson's contract: [len(teacher), len(student)]."""
    def rdm(f):
        d = torch.cdist(f.reshape(len(f), -1)[None].double(), f.reshape(len(f), -1)[None].double())[0]
        i, j = torch.triu_indices(len(f), len(f), 1)
        v = d[i, j]
        return (v - v.mean()) / (v - v.mean()).norm()
    rs, rt = [rdm(s) for s in student], [rdm(t) for t in teacher]
    return torch.stack([torch.stack([(t * s).sum() for s in rs]) for t in rt])


def test_teacher_loss_reduces_max_over_student_mean_over_teacher(monkeypatch):
    """teacher_loss's own reduction, independent of the kernels package (stand-in rdm_pearson)."""
    import threempose.kernels

    monkeypatch.setattr(threempose.kernels, "rdm_pearson", _torch_rdm_pearson, raising=False)
    rng = np.random.default_rng(4)
    student = [rng.normal(size=(5, 3, 2, 2)) for _ in range(3)]
    teacher = [rng.normal(size=(5, 7)), rng.normal(size=(5, 2, 3))]
    got = teacher_loss([torch.tensor(s) for s in student], [torch.tensor(t) for t in teacher])
    assert got.item() == pytest.approx(_teacher_reference(student, teacher), abs=1e-6)


def test_teacher_loss_matches_numpy_pdist_corrcoef():
    rng = np.random.default_rng(2)
    student = [rng.normal(size=(5, 4, 3, 3)), rng.normal(size=(5, 8, 2, 2)), rng.normal(size=(5, 6))]
    teacher = [rng.normal(size=(5, 3, 4, 4)), rng.normal(size=(5, 10))]
    got = teacher_loss([torch.tensor(s, dtype=torch.float32) for s in student],
                       [torch.tensor(t, dtype=torch.float32) for t in teacher])
    assert got.item() == pytest.approx(_teacher_reference(student, teacher), abs=1e-5)


def test_teacher_loss_is_zero_when_student_copies_teacher_and_grad_reaches_student():
    rng = np.random.default_rng(3)
    t = torch.tensor(rng.normal(size=(6, 4, 2, 2)), dtype=torch.float32)
    s = (2.0 * t + 1.0).clone().requires_grad_(True)          # scaled copy: identical RDM up to x2
    other = torch.tensor(rng.normal(size=(6, 16)), dtype=torch.float32, requires_grad=True)
    loss = teacher_loss([other, s], [t])
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    teacher_loss([other], [t]).backward()
    assert other.grad is not None and torch.isfinite(other.grad).all() and other.grad.abs().sum() > 0


def test_teacher_loss_needs_three_images():
    with pytest.raises(ValueError, match="at least 3 images"):
        teacher_loss([torch.zeros(2, 4)], [torch.zeros(2, 4)])


# --------------------------------------------------------------------------- #
# PoseLoss
# --------------------------------------------------------------------------- #
def _batch(seed=0, b=2, j=3, h=4, w=4, p=2):
    g = torch.Generator().manual_seed(seed)
    exits = [SimpleNamespace(heatmaps=torch.rand(b, j, h, w, generator=g),
                             tags=torch.randn(b, j, h, w, generator=g)) for _ in range(2)]
    joints = torch.stack([torch.randint(0, h * w, (b, p, j), generator=g),
                          torch.ones(b, p, j, dtype=torch.int64)], dim=-1)
    targets = {"heatmaps": torch.rand(b, j, h, w, generator=g),
               "mask": (torch.rand(b, h, w, generator=g) > 0.2).float(), "joints": joints}
    return exits, targets


def test_pose_loss_weighted_sum_over_exits():
    exits, targets = _batch()
    cfg = LossConfig(heatmap_weight=1.0, grouping_weight=1e-3, flops_weight=1e-3, teacher_weight=0.0)
    gflops = torch.tensor(20.0)
    total, terms = PoseLoss(cfg)(exits, targets, step=7, gflops=gflops, epoch=4)
    hm = [heatmap_loss(e.heatmaps, targets["heatmaps"], targets["mask"]) for e in exits]
    ae = [ae_loss(e.tags, targets["joints"]) for e in exits]
    push, pull = sum(a[0] for a in ae), sum(a[1] for a in ae)
    flops = (20.0 / 47.8) ** 0.15
    expected = sum(hm) + 1e-3 * (push + pull) + 1e-3 * 1e-3 * flops     # epoch 4: scale 1e-3
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["heatmap"].item() == pytest.approx(sum(hm).item(), rel=1e-6)
    assert terms["grouping"].item() == pytest.approx((push + pull).item(), rel=1e-6)
    assert terms["flops"].item() == pytest.approx(flops, rel=1e-6)
    assert terms["exit1/heatmap"].item() == pytest.approx(hm[1].item(), rel=1e-6)
    assert "teacher" not in terms
    assert not any(v.requires_grad for v in terms.values())


def test_pose_loss_zero_weight_skips_term_and_its_inputs():
    exits, targets = _batch()
    del targets["joints"]                                     # grouping off: joints not needed
    cfg = LossConfig(grouping_weight=0.0, flops_weight=0.0, teacher_weight=0.0)
    total, terms = PoseLoss(cfg)([exits[0]], targets)         # no gflops, epoch or features
    assert set(terms) == {"heatmap", "total"}
    assert total.item() == pytest.approx(
        heatmap_loss(exits[0].heatmaps, targets["heatmaps"], targets["mask"]).item())
    with pytest.raises(ValueError, match="flops_weight"):
        PoseLoss(LossConfig(grouping_weight=0.0, teacher_weight=0.0))([exits[0]], targets)


def test_pose_loss_non_finite_names_term_exit_and_step():
    exits, targets = _batch()
    exits[1].tags[0, 0, 0, 0] = float("nan")
    targets["joints"][0, 0, 0] = torch.tensor([0, 1])         # that pixel is a visible joint
    cfg = LossConfig(flops_weight=0.0, teacher_weight=0.0)
    with pytest.raises(NonFiniteLossError, match=r"step 12: term 'push', 'pull', 'grouping', "
                                                 r"'exit1/push', 'exit1/pull'") as err:
        PoseLoss(cfg)(exits, targets, step=12)
    assert err.value.step == 12 and "heatmap" not in err.value.terms
