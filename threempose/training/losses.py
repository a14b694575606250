"""Training signal of 3M-Pose (thesis §3.4, §4.1): every loss term and their sum.

Terms (each a 0-dim float32 tensor):

* :func:`heatmap_loss` — HigherHRNet's masked heatmap MSE.
* :func:`ae_loss` — associative-embedding grouping loss (push, pull) with scalar
  tags, HigherHRNet's ``AELoss('exp')``.
* :func:`flops_loss` — ``(GFLOPs / T) ** w`` and its epoch schedule
  :func:`flops_loss_scale` (x10 every 3 epochs from 1e-4, capped at 1).
* :func:`teacher_loss` — ``1 - mean_i max_j Pearson(RDM_teacher_i, RDM_student_j)``.

:class:`PoseLoss` applies the heatmap and grouping terms at every exit, adds the
architecture terms once, weights them with :class:`~threempose.config.LossConfig`
and raises :class:`NonFiniteLossError` naming the term (and exit) and the step
when the total is NaN or infinite.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from threempose.config import LossConfig


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the term(s) and the step."""

    def __init__(self, message: str, step: Optional[int], terms: list[str]):
        super().__init__(message)
        self.step = step
        self.terms = terms


# --------------------------------------------------------------------------- #
# Heatmaps and associative embedding (applied per exit)
# --------------------------------------------------------------------------- #
def heatmap_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked heatmap MSE (HigherHRNet ``HeatmapLoss``).

    Args:
        pred: predicted heatmaps ``[B, J, h, w]``.
        target: Gaussian target heatmaps ``[B, J, h, w]``.
        mask: ``[B, h, w]``, 1 where the pixel is supervised, 0 over crowds and
            unannotated people.

    Returns:
        0-dim tensor: ``mean_b mean_{j,y,x} (pred - target)^2 * mask``
        (masked pixels still count in the denominator, as in HigherHRNet).
    """
    if pred.dim() != 4 or pred.shape != target.shape:
        raise ValueError(f"heatmap_loss: pred {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} must both be [B, J, h, w]")
    b, _, h, w = pred.shape
    if tuple(mask.shape) != (b, h, w):
        raise ValueError(f"heatmap_loss: mask must be [B, h, w] = {(b, h, w)}, got {tuple(mask.shape)}")
    diff = pred.float() - target.float()
    return (diff * diff * mask.float()[:, None]).mean()


def ae_loss(tags: Tensor, joints: Tensor) -> tuple[Tensor, Tensor]:
    """Associative-embedding loss with scalar tags (HigherHRNet ``AELoss('exp')``).

    Args:
        tags: predicted tag maps ``[B, J, h, w]``.
        joints: ``[B, P, J, 2]`` int64; ``joints[b, p, j] = (y * w + x, visible)``
            locates joint ``j`` of person ``p`` in channel ``j`` of ``tags[b]``.
            Rows with no visible joint (padding) are ignored.

    Per image with ``K`` people who have a visible joint, mean tags ``m_k``:

    * pull = ``(1/K) sum_k mean_{visible j} (tag_kj - m_k)^2`` (0 when K = 0);
    * push = ``sum_{k != l} exp(-(m_k - m_l)^2) / (K (K - 1)) * 0.5`` (0 when K < 2).

    Returns:
        ``(push, pull)``: 0-dim tensors, the per-image values averaged over the batch.
    """
    if tags.dim() != 4:
        raise ValueError(f"ae_loss: tags must be [B, J, h, w], got {tuple(tags.shape)}")
    b, j, h, w = tags.shape
    if joints.dim() != 4 or joints.shape[0] != b or joints.shape[2] != j or joints.shape[3] != 2:
        raise ValueError(f"ae_loss: joints must be [B, P, J, 2] = [{b}, P, {j}, 2], "
                         f"got {tuple(joints.shape)}")
    p = joints.shape[1]
    zero = tags.new_zeros((), dtype=torch.float32)
    if p == 0:
        return zero, zero
    joints = joints.to(tags.device)
    loc = joints[..., 0].long()
    visible = joints[..., 1] > 0                                      # [B, P, J]
    if bool(((loc < 0) | (loc >= h * w))[visible].any()):
        raise ValueError(f"ae_loss: a visible joint's flat index is outside 0..{h * w - 1} "
                         f"(tags are {h}x{w}; the index is y * w + x)")
    channel = torch.arange(j, device=tags.device) * (h * w)           # joint j lives in channel j
    index = (loc.clamp(0, h * w - 1) + channel).reshape(b, p * j)
    t = tags.float().reshape(b, j * h * w).gather(1, index).reshape(b, p, j)
    t = torch.where(visible, t, torch.zeros_like(t))                  # hidden joints: no NaN leaks in

    v = visible.float()
    count = v.sum(-1)                                                 # [B, P] visible joints
    person = count > 0                                                # [B, P]
    people = person.sum(-1).float()                                   # [B]   K per image
    mean = (t * v).sum(-1) / count.clamp(min=1)                       # [B, P] m_k
    spread = ((t - mean[..., None]) ** 2 * v).sum(-1) / count.clamp(min=1)
    pull = spread.sum(-1) / people.clamp(min=1)                       # [B]

    pair = person[:, :, None] & person[:, None, :]
    pair &= ~torch.eye(p, dtype=torch.bool, device=tags.device)
    diff = mean[:, :, None] - mean[:, None, :]
    push = torch.where(pair, torch.exp(-diff * diff), torch.zeros_like(diff)).sum((1, 2))
    push = push / (people * (people - 1)).clamp(min=1) * 0.5          # [B], 0 when K < 2
    return push.mean(), pull.mean()


# --------------------------------------------------------------------------- #
# Architecture terms (applied once per step)
# --------------------------------------------------------------------------- #
def flops_loss(gflops: Tensor | float, target: float = 47.8, exponent: float = 0.15) -> Tensor:
    """FLOPs constraint ``(gflops / target) ** exponent`` (thesis §3.4: T = 47.8, w = 0.15);
    the same form constrains latency (``gflops`` and ``target`` in ms).

    Args:
        gflops: 0-dim tensor, the sampled architecture's differentiable expected
            GFLOPs (multiply-adds) or latency; a plain number is accepted (no gradient).
        target: T in the same unit (> 0).
        exponent: w (> 0).
    """
    if target <= 0 or exponent <= 0:
        raise ValueError(f"flops_loss: target ({target}) and exponent ({exponent}) must be > 0")
    gflops = torch.as_tensor(gflops)
    if gflops.dim() != 0:
        raise ValueError(f"flops_loss: gflops must be a 0-dim tensor, got shape {tuple(gflops.shape)}")
    return (gflops.float() / target) ** exponent


def cost_target(cfg: LossConfig) -> float:
    """T of the cost constraint: ``loss.cost.target``, else ``loss.flops_target`` (GFLOPs)."""
    return cfg.cost.target if cfg.cost.target is not None else cfg.flops_target


def flops_loss_scale(epoch: int, start: float = 1e-4, every: int = 3, cap: float = 1.0) -> float:
    """Step schedule of the FLOPs loss (thesis §3.4): ``min(cap, start * 10 ** (epoch // every))``.

    With the defaults: 1e-4 for epochs 0-2, 1e-3 for 3-5, 1e-2 for 6-8,
    1e-1 for 9-11, 1 from epoch 12 on. ``epoch`` counts from 0.
    """
    if epoch < 0 or every < 1:
        raise ValueError(f"flops_loss_scale: need epoch >= 0 and every >= 1, got {epoch}, {every}")
    power = min(epoch // every, 300)        # 10.0 ** 309 would overflow; the cap is long reached
    return float(min(cap, start * 10.0 ** power))


def teacher_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    """Student-teacher RDM loss ``1 - mean_i max_j Pearson(RDM_teacher_i, RDM_student_j)``.

    An RDM is the ``[B, B]`` matrix of Euclidean distances between the batch's
    flattened activations; two RDMs are compared by the Pearson correlation of
    their upper triangles. Computed by :func:`threempose.kernels.rdm_pearson`
    (Triton on a GPU, PyTorch elsewhere).

    Args:
        student_feats: student cell outputs, each ``[B, ...]`` (gradients flow).
        teacher_feats: the teacher's chosen layers, each ``[B, ...]`` (detached).

    Returns:
        0-dim tensor in ``[0, 2]``.
    """
    if not student_feats or not teacher_feats:
        raise ValueError(f"teacher_loss: needs at least one student and one teacher feature, "
                         f"got {len(student_feats)} and {len(teacher_feats)}")
    batch = {int(f.shape[0]) for f in list(student_feats) + list(teacher_feats)}
    if len(batch) != 1:
        raise ValueError(f"teacher_loss: all features must share the batch size, got {sorted(batch)}")
    if batch.pop() < 3:
        raise ValueError("teacher_loss: the RDM Pearson needs a batch of at least 3 images per "
                         "process; raise data.batch_size or set loss.teacher_weight to 0")
    from threempose.kernels import rdm_pearson

    corr = rdm_pearson(list(student_feats), [f.detach() for f in teacher_feats])
    expected = (len(teacher_feats), len(student_feats))
    if tuple(corr.shape) != expected:
        raise RuntimeError(f"teacher_loss: rdm_pearson returned shape {tuple(corr.shape)}, "
                           f"expected [len(teacher), len(student)] = {list(expected)}")
    return 1.0 - corr.float().max(dim=1).values.mean()


# --------------------------------------------------------------------------- #
# The combined loss
# --------------------------------------------------------------------------- #
class PoseLoss:
    """Weighted sum of all terms over all exits, with a NaN/inf guard.

    ``total = heatmap_weight * sum_exits heatmap
            + grouping_weight * sum_exits (push + pull)
            + flops_weight * flops_loss_scale(epoch) * cost
            + teacher_weight * teacher``

    ``cost`` is :func:`flops_loss` of the metric ``loss.cost.metric`` names: the expected
    GFLOPs (term ``"flops"``, the thesis) or the expected latency in ms (term ``"latency"``),
    against ``loss.cost.target`` (default ``flops_target``). A weight of 0 switches its term
    off: it is neither computed nor reported, and its inputs (gflops, latency, epoch,
    features) may be omitted.
    """

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def __call__(
        self,
        exits: Sequence[Any],
        targets: Mapping[str, Tensor],
        *,
        step: Optional[int] = None,
        gflops: Optional[Tensor] = None,
        latency: Optional[Tensor] = None,
        epoch: Optional[int] = None,
        student_feats: Optional[Sequence[Tensor]] = None,
        teacher_feats: Optional[Sequence[Tensor]] = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss of one step.

        Args:
            exits: the model's exit outputs, each with ``.heatmaps`` and ``.tags``
                ``[B, J, h, w]`` (early exits first, final exit last).
            targets: ``"heatmaps"`` ``[B, J, h, w]``, ``"mask"`` ``[B, h, w]``,
                ``"joints"`` ``[B, P, J, 2]`` int64 (see :func:`ae_loss`).
            step: the global step, quoted by :class:`NonFiniteLossError`.
            gflops: 0-dim expected GFLOPs of the sampled architecture (FLOPs term).
            latency: 0-dim expected latency in ms (the cost term when ``loss.cost.metric`` is
                ``"latency"``).
            epoch: the epoch (from 0) for :func:`flops_loss_scale` (cost term).
            student_feats / teacher_feats: feature lists for :func:`teacher_loss`.

        Returns:
            ``(total, terms)``: ``total`` is the 0-dim differentiable loss;
            ``terms`` maps names to detached 0-dim tensors: the unweighted
            ``heatmap``, ``push``, ``pull``, ``grouping`` (= push + pull, each
            summed over exits), ``flops`` or ``latency`` (unscaled), ``teacher``, the
            weighted ``total``, and per exit ``exit{k}/heatmap``,
            ``exit{k}/push``, ``exit{k}/pull`` when there is more than one exit.
        """
        cfg = self.cfg
        if not exits:
            raise ValueError("PoseLoss: the model returned no exits")
        parts: list[tuple[str, float, Tensor]] = []      # (name, weight, unweighted value)
        per_exit: dict[str, Tensor] = {}
        if cfg.heatmap_weight:
            _require(targets, ("heatmaps", "mask"), "loss.heatmap_weight")
            values = [_at_exit(k, heatmap_loss, e.heatmaps, targets["heatmaps"], targets["mask"])
                      for k, e in enumerate(exits)]
            per_exit.update({f"exit{k}/heatmap": v for k, v in enumerate(values)})
            parts.append(("heatmap", cfg.heatmap_weight, torch.stack(values).sum()))
        if cfg.grouping_weight:
            _require(targets, ("joints",), "loss.grouping_weight")
            pushes, pulls = zip(*(_at_exit(k, ae_loss, e.tags, targets["joints"])
                                  for k, e in enumerate(exits)))
            per_exit.update({f"exit{k}/push": v for k, v in enumerate(pushes)})
            per_exit.update({f"exit{k}/pull": v for k, v in enumerate(pulls)})
            push, pull = torch.stack(pushes).sum(), torch.stack(pulls).sum()
            parts += [("push", cfg.grouping_weight, push), ("pull", cfg.grouping_weight, pull)]
        if cfg.flops_weight:
            name, given, cost = (("flops", "gflops", gflops) if cfg.cost.metric == "gflops"
                                 else ("latency", "latency", latency))
            if cost is None or epoch is None:
                raise ValueError(f"PoseLoss: loss.flops_weight is non-zero but no {given}/epoch was "
                                 "given; pass them or set loss.flops_weight to 0")
            scale = flops_loss_scale(epoch, cfg.flops_scale_start, cfg.flops_scale_every,
                                     cfg.flops_scale_max)
            parts.append((name, cfg.flops_weight * scale,
                          flops_loss(cost, cost_target(cfg), cfg.flops_exponent)))
        if cfg.teacher_weight:
            if not student_feats or not teacher_feats:
                raise ValueError("PoseLoss: loss.teacher_weight is non-zero but no student/teacher "
                                 "features were given; pass them or set loss.teacher_weight to 0")
            parts.append(("teacher", cfg.teacher_weight, teacher_loss(student_feats, teacher_feats)))
        if not parts:
            raise ValueError("PoseLoss: every loss weight is 0; nothing to optimise")

        total = sum(weight * value for _, weight, value in parts)
        terms = {name: value.detach() for name, _, value in parts}
        if "push" in terms:
            terms["grouping"] = terms["push"] + terms["pull"]
        terms["total"] = total.detach()
        if len(exits) > 1:
            terms.update({k: v.detach() for k, v in per_exit.items()})
        if not bool(torch.isfinite(total)):
            _raise_non_finite(terms, step)
        return total, terms


def _at_exit(k: int, fn, *args):
    """``fn(*args)``, with the exit index added to a shape error's message."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"exit {k}: {e}") from None


def _require(targets: Mapping[str, Tensor], keys: tuple[str, ...], why: str) -> None:
    missing = [k for k in keys if k not in targets]
    if missing:
        raise KeyError(f"PoseLoss: targets lack {missing} (needed because {why} is non-zero); "
                       f"got keys {sorted(targets)}")


def _raise_non_finite(terms: dict[str, Tensor], step: Optional[int]) -> None:
    """Raise :class:`NonFiniteLossError` naming the non-finite terms (per exit when known)."""
    where = f"step {step}" if step is not None else "an unknown step"
    bad = [k for k, v in terms.items() if k != "total" and not bool(torch.isfinite(v))]
    if not bad:
        bad = ["total"]      # every term finite, the weighted sum overflowed
    summary = ", ".join(f"{k}={v.item():.6g}" for k, v in terms.items())
    raise NonFiniteLossError(
        f"non-finite loss at {where}: term {', '.join(repr(b) for b in bad)} is not finite "
        f"({summary})", step, bad)
