"""Batched RDM Pearson similarity between student and teacher activations (thesis §3.4).

An RDM (representational dissimilarity matrix) of a tensor ``X [B, ...]`` is the ``B x B``
matrix of Euclidean distances between its flattened samples; its upper triangle (``i < j``,
row-major, ``P = B (B - 1) / 2`` entries) is the RDM vector. ``rdm_pearson(student, teacher)``
returns ``corr[i, j] = Pearson(rdm(teacher[i]), rdm(student[j]))``, differentiable w.r.t. the
student tensors; the teacher loss is ``1 - mean_i max_j corr[i, j]``.

How it is computed (both backends):

1. Gram matrices of the *shifted* samples ``X' = X - X[0]`` (row 0 subtracted from every row):
   ``G = X' X'^T`` and ``D_ab^2 = G_aa + G_bb - 2 G_ab``. Distances are shift-invariant, and
   the shift keeps the Gram entries on the scale of the distances rather than of the samples'
   norms, so the cancellation in ``D^2`` costs ~1e-7 relative to the distances in float32
   instead of ~1e-7 relative to ``|x|^2`` (important when samples are close: activations
   with a large common component).
2. ``[T, B, B]`` Grams -> distances -> centred, unit-norm RDM vectors, batched for all T
   tensors in a handful of small PyTorch ops (:func:`_rdm_unit_vectors`), then one matmul
   ``U_teacher @ U_student^T``.

The Triton path does step 1 for all student and teacher tensors (of one dtype) in **one
launch**: a table of data pointers and feature counts, and a work list of ``(tensor, chunk of
_CHUNK features)`` items; each program accumulates its chunk's ``[B, B]`` partial Gram with
``tl.dot`` (float32 inputs: IEEE fp32; 16-bit inputs: TF32 on the shifted values, which is
finer than the inputs' own precision), partials are summed per tensor deterministically (no
atomics). The backward, ``dL/dX = S X' - e_0 (1^T S X')`` with ``S = dL/dG + dL/dG^T``, is one
launch over the student tensors. Batches up to 64 of float32/float16/bfloat16 tensors run on
the Triton path; larger batches and float64 use the reference Gram (matmuls) on every backend.

Degenerate RDMs: a distance of exactly 0 gets zero gradient (the subgradient of ``sqrt`` at
0); an RDM vector with (relative) zero variance -- e.g. ``B = 2`` (one distance) or a tensor
identical across the batch -- has no defined correlation and gets ``corr = 0`` (zero gradient).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .backend import HAS_TRITON, launch, resolve, tl, triton, unsupported_dtype

__all__ = ["rdm_pearson", "rdm_pearson_reference", "batched_gram", "batched_gram_reference"]

_CHUNK = 8192          # features per program (split-F); untuned (no GPU in the authoring session)
_MAX_TRITON_BATCH = 64
_FLAT_RTOL = 1e-5      # RDM vectors with std <= 1e-5 * rms(distances) count as constant
_PLAN_CACHE: dict = {}

_TL_DTYPES = {}
if HAS_TRITON:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _work_item(w, addr_ptr, feat_ptr, work_t_ptr, work_c_ptr, CHUNK, DTYPE: tl.constexpr):
    """Work item ``w``: tensor ``t``, its feature range ``[start, end)`` of ``F``, its data pointer."""
    t = tl.load(work_t_ptr + w)
    start = tl.load(work_c_ptr + w) * CHUNK
    F = tl.load(feat_ptr + t)
    end = tl.minimum(start + CHUNK, F)
    base = tl.load(addr_ptr + t).to(tl.pointer_type(DTYPE))
    return t, start, end, F, base


@triton.jit
def _shifted_tile(base, rows, rmask, f0, end, F, BLOCK_F: tl.constexpr):
    """The ``[BLOCK_B, BLOCK_F]`` tile of ``X`` at features ``f0..`` with sample 0 subtracted from
    every row (``X' = X - 1 x_0^T``: pairwise distances unchanged, Gram entries kept small);
    returns its offsets, its mask and the shifted float32 values."""
    cols = f0 + tl.arange(0, BLOCK_F)
    m = rmask[:, None] & (cols < end)[None, :]
    offs = rows[:, None] * F + cols[None, :]
    x = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
    x0 = tl.sum(tl.where((rows == 0)[:, None], x, 0.0), axis=0)
    return offs, m, tl.where(m, x - x0[None, :], 0.0)


@triton.jit
def _gram_fwd_kernel(
    addr_ptr,            # [T] int64 data pointers, each to a contiguous [B, F_t] tensor
    feat_ptr,            # [T] int64 F_t
    work_t_ptr,          # [W] int32 tensor index of work item w
    work_c_ptr,          # [W] int64 chunk index of work item w
    part_ptr,            # [W, B, B] float32 out: partial Gram of the shifted samples
    B, CHUNK,
    DTYPE: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    w = tl.program_id(0)
    t, start, end, F, base = _work_item(w, addr_ptr, feat_ptr, work_t_ptr, work_c_ptr, CHUNK, DTYPE)
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    acc = tl.zeros([BLOCK_B, BLOCK_B], dtype=tl.float32)
    for f0 in range(start, end, BLOCK_F):
        _, m, xs = _shifted_tile(base, rows, rmask, f0, end, F, BLOCK_F)
        if IEEE:
            acc += tl.dot(xs, tl.trans(xs), input_precision="ieee")
        else:
            acc += tl.dot(xs, tl.trans(xs), input_precision="tf32")
    out = part_ptr + w.to(tl.int64) * B * B + rows[:, None] * B + rows[None, :]
    tl.store(out, acc, mask=rmask[:, None] & rmask[None, :])


@triton.jit
def _gram_bwd_kernel(
    addr_ptr,            # [T] int64 data pointers of the inputs X_t [B, F_t]
    gaddr_ptr,           # [T] int64 data pointers of the outputs dL/dX_t [B, F_t]
    feat_ptr,            # [T] int64 F_t
    work_t_ptr, work_c_ptr,
    sym_ptr,             # [T, B, B] float32: S_t = dL/dG_t + dL/dG_t^T
    B, CHUNK,
    DTYPE: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    w = tl.program_id(0)
    t, start, end, F, base = _work_item(w, addr_ptr, feat_ptr, work_t_ptr, work_c_ptr, CHUNK, DTYPE)
    gbase = tl.load(gaddr_ptr + t).to(tl.pointer_type(DTYPE))
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    bm = rmask[:, None] & rmask[None, :]
    S = tl.load(sym_ptr + t.to(tl.int64) * B * B + rows[:, None] * B + rows[None, :], mask=bm,
                other=0.0)
    for f0 in range(start, end, BLOCK_F):
        offs, m, xs = _shifted_tile(base, rows, rmask, f0, end, F, BLOCK_F)
        if IEEE:
            dxs = tl.dot(S, xs, input_precision="ieee")
        else:
            dxs = tl.dot(S, xs, input_precision="tf32")
        # X' = X - 1 x_0^T  =>  dL/dX = dL/dX' - e_0 (column sums of dL/dX')
        dx = dxs - tl.where((rows == 0)[:, None], tl.sum(dxs, axis=0)[None, :], 0.0)
        tl.store(gbase + offs, dx.to(DTYPE), mask=m)


# --------------------------------------------------------------------------- #
# Launch planning and the autograd wrapper (Triton)
# --------------------------------------------------------------------------- #
def _plan(features: tuple[int, ...], chunk: int, device: torch.device):
    """Work list (tensor, chunk) for ``features``, the feature table and the gather index that
    sums each tensor's chunk partials; cached per shape signature (no per-call host work)."""
    key = (features, chunk, str(device))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        chunks = [max(1, -(-f // chunk)) for f in features]
        work_t = [t for t, c in enumerate(chunks) for _ in range(c)]
        work_c = [i for c in chunks for i in range(c)]
        W, cmax = len(work_t), max(chunks)
        gather, pos = [], 0
        for c in chunks:       # index W is an all-zero padding row
            gather.append(list(range(pos, pos + c)) + [W] * (cmax - c))
            pos += c
        plan = (torch.tensor(work_t, dtype=torch.int32, device=device),
                torch.tensor(work_c, dtype=torch.int64, device=device),
                torch.tensor(features, dtype=torch.int64, device=device),
                torch.tensor(gather, dtype=torch.int64, device=device), W)
        _cache_put(key, plan)
    return plan


def _index(idx: tuple[int, ...], device: torch.device) -> Tensor:
    key = ("index", idx, str(device))
    t = _PLAN_CACHE.get(key)
    if t is None:
        t = torch.tensor(idx, dtype=torch.int64, device=device)
        _cache_put(key, t)
    return t


def _cache_put(key, value) -> None:
    if len(_PLAN_CACHE) > 256:
        _PLAN_CACHE.clear()
    _PLAN_CACHE[key] = value


def _pointer_table(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """``[T]`` int64 data pointers on ``device``. On CUDA the copy is a non-blocking one from
    pinned memory: a plain ``torch.tensor(..., device="cuda")`` would synchronise the stream."""
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _block_f(B: int) -> tuple[int, int]:
    block_b = max(16, triton.next_power_of_2(B))
    block_f = 128 if block_b <= 32 else 64
    return block_b, min(block_f, max(16, triton.next_power_of_2(_CHUNK)))


def _flat2d(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).contiguous()


def _groups_by_dtype(xs: Sequence[Tensor], which: Sequence[int]) -> dict:
    groups: dict = {}
    for i in which:
        groups.setdefault(xs[i].dtype, []).append(i)
    return groups


class _GramFunction(torch.autograd.Function):
    """``apply(*tensors [B, ...]) -> [T, B, B]`` float32 Grams of the shifted samples (Triton)."""

    @staticmethod
    def forward(ctx, *tensors: Tensor) -> Tensor:
        xs = [_flat2d(x) for x in tensors]
        B, device = xs[0].shape[0], xs[0].device
        G = torch.empty((len(xs), B, B), dtype=torch.float32, device=device)
        block_b, block_f = _block_f(B)
        for dtype, idx in _groups_by_dtype(xs, range(len(xs))).items():
            group = [xs[i] for i in idx]
            work_t, work_c, feat, gather, W = _plan(tuple(x.shape[1] for x in group), _CHUNK,
                                                    device)
            part = torch.empty((W + 1, B, B), dtype=torch.float32, device=device)
            part[W].zero_()
            launch("rdm_gram_fwd", _gram_fwd_kernel, (W,), _pointer_table(group, device), feat,
                   work_t, work_c, part, B, _CHUNK, DTYPE=_TL_DTYPES[dtype],
                   IEEE=dtype == torch.float32, BLOCK_B=block_b, BLOCK_F=block_f, num_warps=4)
            G[_index(tuple(idx), device)] = part[gather].sum(1)
        need = [i for i, n in enumerate(ctx.needs_input_grad) if n]
        ctx.need = need
        ctx.shapes = [x.shape for x in tensors]
        ctx.save_for_backward(*[xs[i] for i in need])
        return G

    @staticmethod
    def backward(ctx, dG: Tensor):
        saved = dict(zip(ctx.need, ctx.saved_tensors))
        grads: list = [None] * len(ctx.shapes)
        if not ctx.need:
            return tuple(grads)
        sym = (dG + dG.transpose(1, 2)).float().contiguous()
        B, device = dG.shape[1], dG.device
        block_b, block_f = _block_f(B)
        xs = [saved.get(i) for i in range(len(ctx.shapes))]
        for dtype, idx in _groups_by_dtype(xs, ctx.need).items():
            group = [xs[i] for i in idx]
            work_t, work_c, feat, _, W = _plan(tuple(x.shape[1] for x in group), _CHUNK, device)
            gx = [torch.empty_like(x) for x in group]
            sym_g = sym[_index(tuple(idx), device)].contiguous()
            launch("rdm_gram_bwd", _gram_bwd_kernel, (W,), _pointer_table(group, device),
                   _pointer_table(gx, device), feat, work_t, work_c, sym_g, B, _CHUNK,
                   DTYPE=_TL_DTYPES[dtype], IEEE=dtype == torch.float32, BLOCK_B=block_b,
                   BLOCK_F=block_f, num_warps=4)
            for i, g in zip(idx, gx):
                grads[i] = g.view(ctx.shapes[i])
        return tuple(grads)


def batched_gram(tensors: Sequence[Tensor]) -> Tensor:
    """``[T, B, B]`` float32 Grams of the shifted samples ``X_t - X_t[0]`` (flattened per
    sample); one Triton launch per input dtype, reference matmuls where Triton does not apply."""
    tensors = list(tensors)
    B = tensors[0].shape[0]
    too_big = f"the batch is above the kernel's limit of {_MAX_TRITON_BATCH}" if B > _MAX_TRITON_BATCH else None
    if resolve("rdm_pearson", *tensors, unsupported=too_big or unsupported_dtype(*tensors)) == "triton":
        return _GramFunction.apply(*tensors)
    return batched_gram_reference(tensors)


# --------------------------------------------------------------------------- #
# PyTorch reference
# --------------------------------------------------------------------------- #
def batched_gram_reference(tensors: Sequence[Tensor]) -> Tensor:
    """PyTorch reference of :func:`batched_gram`: one matmul per tensor, in float32 (float64
    when any input is float64)."""
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
    out = []
    for x in tensors:
        x2 = x.reshape(x.shape[0], -1).to(dtype)
        xs = x2 - x2[:1]
        out.append(xs @ xs.T)
    return torch.stack(out)


def _rdm_unit_vectors(G: Tensor) -> Tensor:
    """``[T, B, B]`` Grams -> ``[T, P]`` centred, unit-norm upper-triangle distance vectors."""
    B = G.shape[-1]
    iu, ju = torch.triu_indices(B, B, offset=1, device=G.device)
    diag = G.diagonal(dim1=1, dim2=2)
    sq = diag[:, iu] + diag[:, ju] - 2.0 * G[:, iu, ju]
    pos = sq > 0
    d = torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))),
                    torch.zeros_like(sq))
    c = d - d.mean(dim=1, keepdim=True)
    nrm = c.norm(dim=1, keepdim=True)
    ok = nrm > _FLAT_RTOL * d.norm(dim=1, keepdim=True)
    return torch.where(ok, c / torch.where(ok, nrm, torch.ones_like(nrm)), torch.zeros_like(c))


def _pearson_from_grams(G: Tensor, n_student: int) -> Tensor:
    us = _rdm_unit_vectors(G[:n_student])
    ut = _rdm_unit_vectors(G[n_student:].detach())
    return ut @ us.T


def _validate(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> tuple[list, list]:
    student, teacher = list(student), list(teacher)
    if not student or not teacher:
        raise ValueError(f"rdm_pearson: needs at least one student and one teacher tensor, got "
                         f"{len(student)} and {len(teacher)}")
    first = student[0]
    for name, group in (("student", student), ("teacher", teacher)):
        for i, x in enumerate(group):
            if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
                raise ValueError(f"rdm_pearson: {name}[{i}] must be a floating-point [B, ...] "
                                 f"tensor, got {getattr(x, 'shape', type(x).__name__)}")
            if x.shape[0] != first.shape[0] or x.device != first.device:
                raise ValueError(f"rdm_pearson: {name}[{i}] has batch {x.shape[0]} on "
                                 f"{x.device}; student[0] has batch {first.shape[0]} on "
                                 f"{first.device} (all must match)")
            if x[0].numel() == 0:
                raise ValueError(f"rdm_pearson: {name}[{i}] has no features: {tuple(x.shape)}")
    if first.shape[0] < 2:
        raise ValueError(f"rdm_pearson: needs a batch of at least 2, got {first.shape[0]}")
    return student, teacher


def rdm_pearson_reference(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """PyTorch reference of :func:`rdm_pearson` (per-tensor matmul Grams, torch autograd)."""
    student, teacher = _validate(student, teacher)
    G = batched_gram_reference(student + [t.detach() for t in teacher])
    return _pearson_from_grams(G, len(student))


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #
def rdm_pearson(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Pearson correlations between teacher and student RDMs.

    Args:
        student: tensors ``[B, ...]`` (any feature sizes; e.g. every cell's output); gradients
            flow to them.
        teacher: tensors ``[B, ...]`` (e.g. the teacher's chosen layers); treated as constants.

    Returns:
        ``[len(teacher), len(student)]`` float32 (float64 if an input is): entry ``[i, j]`` is
        the Pearson correlation of the upper triangles (``a < b``) of the ``B x B`` Euclidean
        distance matrices of ``teacher[i]`` and ``student[j]`` flattened per sample. 0 where an
        RDM has no variance (e.g. ``B = 2``). On the Triton path all Grams take one launch (per
        input dtype).
    """
    student, teacher = _validate(student, teacher)
    G = batched_gram(student + [t.detach() for t in teacher])
    return _pearson_from_grams(G, len(student))
