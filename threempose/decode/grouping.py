"""Grouping of keypoint candidates into people by associative-embedding tags.

This is the HigherHRNet / Associative Embedding ``match_by_tag`` procedure, written
so that a NumPy/SciPy reference (here) and a C++ implementation
(``csrc/grouping.cpp``, imported as ``threempose._grouping``) give *identical*
people, ties included. :func:`group_people` runs the native code when it was
built and falls back to the reference with one warning otherwise.

The algorithm
-------------
Joints are visited in ``joint_order`` (HigherHRNet's COCO order: head, shoulders,
hips, elbows, wrists, knees, ankles). For each joint type the candidates whose
detection value is ``> detection_threshold`` are matched against the people found
so far (the first ``max_people`` of them, in creation order), the candidates taken in
order of decreasing detection value (equal values keep their order): the cost of
candidate ``r`` for person ``c`` is built from the L2 distance between the
candidate's tag and the person's mean tag (see *Costs*), and one optimal
assignment is solved (see *Ties*). A matched pair whose *unrounded* tag distance
is ``< tag_threshold`` adds the candidate to that person; every other candidate
(unmatched, or matched too far away) starts a new person. If no person exists
yet, every candidate starts one. As in HigherHRNet, when there are no more
candidates than people every candidate is matched to someone, so a candidate of
a person not seen yet can take (and then reject) another person's slot. With ``ignore_too_much`` a joint type is skipped
once ``max_people`` people exist.

Costs (exact integers)
----------------------
``d[r, c] = sqrt(sum_l (tag[r, l] - mean[c, l])**2)`` in float64, where a
person's mean tag is its running float64 tag sum divided by its joint count.
HigherHRNet's cost is ``round(d) * 100 - value`` (``use_detection_val``) or
``d``. Here both are scaled by ``Q = 2**20`` and rounded to int64:

* ``use_detection_val``: ``100*Q*min(rint(d), R_MAX) - rint(clip(value, ±V_MAX) * Q)``
* otherwise: ``rint(min(d, R_MAX) * Q)``

(``rint`` rounds half to even, like ``np.round``.) Integer costs make "optimal"
an exact notion shared by both implementations; the only change from
HigherHRNet is that detection values closer than ``2**-20`` compare equal, and
that rounded tag distances beyond ``R_MAX = 1e5`` compare equal (tags are O(1)).

Ties
----
When several assignments reach the minimum total cost (common: rounded
distances tie), the one taken is fixed by a preference order of each candidate
over the people, ``tie_rule``:

* ``"nearest"`` (default): candidates in order of detection value each take
  their *own cheapest* person: candidate 0 (the strongest) gets, among the people
  it has in *some* optimal assignment, the one at the smallest unrounded tag
  distance (then the lowest-numbered); candidate 1 the same given that, and so on.
* ``"lowest_index"`` (this project's earlier rule): each takes the
  lowest-numbered person it can have.

That is the lexicographically smallest vector of preference ranks. With
HigherHRNet's rounded costs, the lowest-numbered rule lets a strong candidate
go to a far, older person while its own person (tag distance ~0) takes a
leftover candidate at the same total cost; on noisy maps "nearest" scores
clearly higher (``tests/test_decode_quality.py``). Non-square problems are
padded to square with zero-cost dummy people (a candidate on a dummy starts a
new person); every real person is preferred to a new one. This rule is a
property of the answer, not of the solver: scipy's
``linear_sum_assignment`` and the C++ Hungarian algorithm may find different
optimal assignments, and both are then moved to the same canonical one (see
:func:`canonical_assignment`).

Differences from HigherHRNet: people are kept in a list in creation order rather
than a dict keyed by the first tag value (there, two candidates with the same
tag value collide into one person), and the cost quantisation above.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from threempose.data.keypoints import NUM_JOINTS

# HigherHRNet's order for the 17 COCO joints (lib/core/group.py, Params.joint_order):
# nose, eyes, ears, shoulders, hips, elbows, wrists, knees, ankles.
COCO_JOINT_ORDER = (0, 1, 2, 3, 4, 5, 6, 11, 12, 7, 8, 9, 10, 13, 14, 15, 16)

COST_SCALE = 2 ** 20            # Q: detection values are compared at 2**-20 resolution
MAX_ROUNDED_DISTANCE = 100_000  # R_MAX: rounded tag distances are clamped here
MAX_VALUE = 1_000_000.0         # V_MAX: detection values are clipped to +-V_MAX in the cost
MAX_ABS_COST = 2 ** 44          # every cost the grouping builds is below this
MAX_ASSIGNMENT_SIZE = 256       # keeps every sum the solvers form exact in float64

Backend = Literal["auto", "native", "reference"]
TieRule = Literal["nearest", "lowest_index"]


@dataclass(frozen=True)
class GroupingParams:
    """Settings of the tag grouping (HigherHRNet TEST.* names in brackets).

    detection_threshold: candidates with value <= this are ignored [DETECTION_THRESHOLD].
    tag_threshold: a match is accepted when the tag distance is < this [TAG_THRESHOLD].
    use_detection_val: cost = round(distance)*100 - value instead of the distance [USE_DETECTION_VAL].
    ignore_too_much: skip a joint type once max_people people exist [IGNORE_TOO_MUCH].
    max_people: only the first max_people people are matched against [MAX_NUM_PEOPLE].
    joint_order: the order joint types are visited; None = COCO_JOINT_ORDER for 17
        joints, 0..J-1 otherwise.
    tie_rule: which optimal assignment is taken when several tie (module docstring).
    """

    detection_threshold: float = 0.1
    tag_threshold: float = 1.0
    use_detection_val: bool = True
    ignore_too_much: bool = False
    max_people: int = 30
    joint_order: Optional[tuple[int, ...]] = None
    tie_rule: TieRule = "nearest"

    def __post_init__(self) -> None:
        if self.tie_rule not in ("nearest", "lowest_index"):
            raise ValueError(f"tie_rule must be 'nearest' or 'lowest_index', got {self.tie_rule!r}")
        if self.detection_threshold < 0:
            raise ValueError(f"detection_threshold must be >= 0 (a joint with value 0 counts as missing), "
                             f"got {self.detection_threshold}")
        if not 1 <= self.max_people <= MAX_ASSIGNMENT_SIZE:
            raise ValueError(f"max_people must be in 1..{MAX_ASSIGNMENT_SIZE}, got {self.max_people}")

    def resolve_joint_order(self, num_joints: int) -> np.ndarray:
        """The visiting order for ``num_joints`` joint types, int64 [J]; checked to be a permutation."""
        if self.joint_order is None:
            order = COCO_JOINT_ORDER if num_joints == NUM_JOINTS else tuple(range(num_joints))
        else:
            order = tuple(self.joint_order)
        if sorted(order) != list(range(num_joints)):
            raise ValueError(
                f"joint_order {list(order)} is not a permutation of 0..{num_joints - 1} "
                f"(the candidates have {num_joints} joint types)")
        return np.asarray(order, dtype=np.int64)


# --------------------------------------------------------------------------- #
# Costs and the canonical optimal assignment
# --------------------------------------------------------------------------- #
def tag_distances(cand_tags: np.ndarray, mean_tags: np.ndarray) -> np.ndarray:
    """L2 distances between candidate tags [n, L] and mean tags [m, L] -> float64 [n, m].

    The squares are summed in tag-dimension order, as the C++ code does, so both
    round identically.
    """
    diff = cand_tags.astype(np.float64)[:, None, :] - mean_tags.astype(np.float64)[None, :, :]
    sq = diff * diff
    acc = sq[..., 0].copy()
    for l in range(1, sq.shape[-1]):
        acc += sq[..., l]
    return np.sqrt(acc)


def assignment_costs(dist: np.ndarray, values: np.ndarray, use_detection_val: bool) -> np.ndarray:
    """Exact integer costs [n, m] int64 from tag distances [n, m] and candidate values [n].

    See the module docstring ("Costs") for the formula.
    """
    if use_detection_val:
        rounded = np.minimum(np.rint(dist), MAX_ROUNDED_DISTANCE).astype(np.int64)
        val = np.rint(np.clip(values.astype(np.float64), -MAX_VALUE, MAX_VALUE) * COST_SCALE)
        return rounded * (100 * COST_SCALE) - val.astype(np.int64)[:, None]
    return np.rint(np.minimum(dist, MAX_ROUNDED_DISTANCE) * COST_SCALE).astype(np.int64)


def _dual_columns(cost: np.ndarray, match: np.ndarray) -> np.ndarray:
    """Column potentials w [N] (int64) making ``match`` tight, by Bellman-Ford.

    With ``u_i = cost[i, match[i]] - w[match[i]]`` every reduced cost
    ``cost[i, j] - u_i - w_j`` is >= 0 and is 0 on ``match``. Such potentials
    exist exactly when ``match`` is optimal.
    """
    n = cost.shape[0]
    rel = cost - cost[np.arange(n), match][:, None]   # rel[i, j] = cost[i, j] - cost[i, match[i]]
    w = np.zeros(n, dtype=np.int64)
    for _ in range(n + 1):
        new = np.minimum(w, (w[match][:, None] + rel).min(axis=0))
        if np.array_equal(new, w):
            return w
        w = new
    raise RuntimeError("assignment given to _dual_columns is not optimal (negative cycle)")


def lexicographic_optimum(tight: np.ndarray, match: np.ndarray, rows: int, real_cols: int,
                          rank: np.ndarray) -> np.ndarray:
    """Move a perfect matching inside the tight graph to the one with the lexicographically
    smallest vector of preference ranks.

    tight: bool [N, N], the zero-reduced-cost edges of an optimal dual solution
        (its perfect matchings are exactly the optimal assignments).
    match: int64 [N], a perfect matching using only tight edges (row -> column).
    rows: only rows 0..rows-1 are made lexicographically smallest (later rows are
        padding whose columns do not matter).
    real_cols: columns >= real_cols are identical zero-cost padding, ranked after
        every real column; a row is never moved from one of them to another.
    rank: int64 [rows, real_cols], row i's preference over the real columns (a
        permutation of 0..real_cols-1 per row, 0 = most preferred).
    Returns the new matching (a copy), int64 [N].

    Row i, in order, takes its most preferred real column c, preferred to match[i],
    for which an alternating cycle exists: the row holding c moves to another tight
    column, whose row moves on, ..., until a row takes match[i], using only rows > i.
    """
    match = match.copy()
    size = match.shape[0]
    row_of = np.empty(size, dtype=np.int64)
    row_of[match] = np.arange(size)
    for i in range(rows):
        target = int(match[i])
        better = np.flatnonzero(tight[i, :real_cols])
        if target < real_cols:
            better = better[rank[i, better] < rank[i, target]]
        if better.size == 0:
            continue
        # Columns from which `target` is reachable by shifting rows > i along tight edges.
        reached = np.zeros(size, dtype=bool)
        reached[target] = True
        nxt = np.full(size, -1, dtype=np.int64)
        stack = [target]
        while stack:
            col = stack.pop()
            for r in np.flatnonzero(tight[i + 1:, col]) + i + 1:
                held = int(match[r])
                if not reached[held]:
                    reached[held] = True
                    nxt[held] = col
                    stack.append(held)
        usable = better[reached[better]]
        if usable.size == 0:
            continue
        col = int(usable[np.argmin(rank[i, usable])])
        holder = int(row_of[col])
        match[i], row_of[col] = col, i
        while col != target:
            r, col = holder, int(nxt[col])
            holder = int(row_of[col])
            match[r], row_of[col] = col, r
    return match


def _check_cost(cost: np.ndarray) -> np.ndarray:
    """Validate an assignment cost matrix: 2-D int64, bounded size and entries."""
    cost = np.asarray(cost)
    if cost.ndim != 2 or cost.dtype != np.int64:
        raise ValueError(f"cost must be a 2-D int64 array, got {cost.dtype} {cost.shape}")
    if max(cost.shape) > MAX_ASSIGNMENT_SIZE or (cost.size and np.abs(cost).max() > MAX_ABS_COST):
        raise ValueError(f"cost must be at most {MAX_ASSIGNMENT_SIZE}x{MAX_ASSIGNMENT_SIZE} "
                         f"with |entries| <= 2**44, got shape {cost.shape}")
    return np.ascontiguousarray(cost)


def preference_ranks(dist: np.ndarray) -> np.ndarray:
    """Each row's rank of the columns by (distance, column index): int64 [n, m], 0 = nearest."""
    order = np.argsort(dist, axis=1, kind="stable")
    rank = np.empty(dist.shape, dtype=np.int64)
    np.put_along_axis(rank, order, np.arange(dist.shape[1], dtype=np.int64)[None, :], axis=1)
    return rank


def _check_rank(rank: Optional[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Validate a preference matrix (None = column index order): int64 [n, m], rows are permutations."""
    if rank is None:
        return np.broadcast_to(np.arange(shape[1], dtype=np.int64), shape).copy()
    rank = np.ascontiguousarray(rank)
    if rank.shape != shape or rank.dtype != np.int64 or \
            (rank.size and not (np.sort(rank, axis=1) == np.arange(shape[1])).all()):
        raise ValueError(f"rank must be an int64 {shape} array whose rows are permutations of 0..{shape[1] - 1}")
    return rank


def canonical_assignment(cost: np.ndarray, rank: Optional[np.ndarray] = None) -> np.ndarray:
    """The minimum-cost assignment of rows to columns with the lexicographically
    smallest vector of preference ranks.

    cost: int64 [n, m], |cost| <= MAX_ABS_COST, n, m <= MAX_ASSIGNMENT_SIZE.
    rank: int64 [n, m], each row's preference over the columns (a permutation of
        0..m-1, 0 = first choice); None = lowest column index first.
    Returns int64 [n]: the column of each row, or -1 when the row is left
    unassigned (only when n > m). The problem is padded to square with zero-cost
    dummy rows/columns; scipy finds one optimum (exact: every value is an integer
    below 2**53), Bellman-Ford gives dual potentials and
    :func:`lexicographic_optimum` moves to the canonical optimum.
    """
    cost = _check_cost(cost)
    rank = _check_rank(rank, cost.shape)
    n, m = cost.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    size = max(n, m)
    square = np.zeros((size, size), dtype=np.int64)
    square[:n, :m] = cost
    _, match = linear_sum_assignment(square.astype(np.float64))
    match = match.astype(np.int64)
    w = _dual_columns(square, match)
    u = square[np.arange(size), match] - w[match]
    tight = (square - u[:, None] - w[None, :]) == 0
    match = lexicographic_optimum(tight, match, n, m, rank)[:n]
    match[match >= m] = -1
    return match


# --------------------------------------------------------------------------- #
# Grouping
# --------------------------------------------------------------------------- #
def _check_candidates(vals, tags, locs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes and convert to C-contiguous float32 (what both backends read)."""
    vals = np.ascontiguousarray(vals, dtype=np.float32)
    tags = np.asarray(tags)
    if tags.ndim == 2:
        tags = tags[..., None]
    tags = np.ascontiguousarray(tags, dtype=np.float32)
    locs = np.ascontiguousarray(locs, dtype=np.float32)
    if vals.ndim != 2:
        raise ValueError(f"vals must be [J, K], got shape {vals.shape}")
    j, k = vals.shape
    if tags.ndim != 3 or tags.shape[:2] != (j, k) or tags.shape[2] < 1:
        raise ValueError(f"tags must be [J, K, L] (or [J, K]) with J, K = {j}, {k}; got {tags.shape}")
    if locs.shape != (j, k, 2):
        raise ValueError(f"locs must be [J, K, 2] (x, y) with J, K = {j}, {k}; got {locs.shape}")
    if k > MAX_ASSIGNMENT_SIZE:
        raise ValueError(f"at most {MAX_ASSIGNMENT_SIZE} candidates per joint, got {k}")
    for name, arr in (("vals", vals), ("tags", tags), ("locs", locs)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinity")
    return vals, tags, locs


def group_reference(vals: np.ndarray, tags: np.ndarray, locs: np.ndarray,
                    params: GroupingParams = GroupingParams()) -> np.ndarray:
    """Group candidates into people (NumPy/SciPy reference; see the module docstring).

    vals: float32 [J, K] detection values of the top-K candidates per joint type.
    tags: float32 [J, K, L] their tags (L = tag dimension; [J, K] means L = 1).
    locs: float32 [J, K, 2] their (x, y) locations.
    Returns float32 [P, J, 3 + L]: per person and joint (x, y, value, tag...),
    all zeros where the person has no such joint; people in creation order.
    """
    vals, tags, locs = _check_candidates(vals, tags, locs)
    num_joints, _, dim = tags.shape
    people: list[np.ndarray] = []      # [J, 3 + L] float32 each
    tag_sums: list[np.ndarray] = []    # float64 [L] each
    counts: list[int] = []

    def add(person: Optional[int], joint: int, row: np.ndarray, tag: np.ndarray) -> None:
        if person is None:
            people.append(np.zeros((num_joints, 3 + dim), dtype=np.float32))
            tag_sums.append(np.zeros(dim, dtype=np.float64))
            counts.append(0)
            person = len(people) - 1
        people[person][joint] = row
        tag_sums[person] += tag
        counts[person] += 1

    vals64 = vals.astype(np.float64)  # thresholds compare in float64, as in the C++ code
    for joint in params.resolve_joint_order(num_joints):
        keep = np.flatnonzero(vals64[joint] > params.detection_threshold)
        if not keep.size:
            continue
        keep = keep[np.argsort(-vals64[joint][keep], kind="stable")]   # strongest first
        cand_vals, cand_tags = vals[joint][keep], tags[joint][keep]
        rows = np.concatenate([locs[joint][keep], cand_vals[:, None], cand_tags], axis=1)
        cand_tags64 = cand_tags.astype(np.float64)
        if not people:
            for r in range(len(rows)):
                add(None, joint, rows[r], cand_tags64[r])
            continue
        grouped = min(len(people), params.max_people)
        if params.ignore_too_much and grouped == params.max_people:
            continue
        means = np.stack(tag_sums[:grouped]) / np.asarray(counts[:grouped], dtype=np.float64)[:, None]
        dist = tag_distances(cand_tags64, means)
        rank = preference_ranks(dist) if params.tie_rule == "nearest" else None
        assigned = canonical_assignment(assignment_costs(dist, cand_vals, params.use_detection_val), rank)
        for r, col in enumerate(assigned):
            accept = col >= 0 and dist[r, col] < params.tag_threshold
            add(int(col) if accept else None, joint, rows[r], cand_tags64[r])
    if not people:
        return np.zeros((0, num_joints, 3 + dim), dtype=np.float32)
    return np.stack(people)


# --------------------------------------------------------------------------- #
# Dispatcher: native extension when built, reference otherwise
# --------------------------------------------------------------------------- #
_NATIVE = None
_NATIVE_ERROR: Optional[str] = None
_WARNED = False

try:  # built by `pip install` from csrc/grouping.cpp (optional: see setup.py)
    from threempose import _grouping as _NATIVE  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the install
    _NATIVE_ERROR = str(exc)


def native_available() -> bool:
    """True when the C++ extension ``threempose._grouping`` was built and imports."""
    return _NATIVE is not None


def _resolve_backend(backend: Backend) -> str:
    global _WARNED
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"backend must be 'auto', 'native' or 'reference', got {backend!r}")
    if backend == "native" and _NATIVE is None:
        raise ImportError(
            f"the native grouping extension threempose._grouping is not built ({_NATIVE_ERROR}); "
            "reinstall with a C++17 compiler available: pip install -e .")
    if backend == "auto":
        if _NATIVE is not None:
            return "native"
        if not _WARNED:
            _WARNED = True
            warnings.warn(
                "threempose._grouping (C++ keypoint grouping) is not built; using the slower "
                f"NumPy/SciPy reference ({_NATIVE_ERROR}). Reinstall with a C++17 compiler "
                "to build it: pip install -e .", RuntimeWarning, stacklevel=3)
        return "reference"
    return backend


def group_people(vals: np.ndarray, tags: np.ndarray, locs: np.ndarray,
                 params: GroupingParams = GroupingParams(), backend: Backend = "auto") -> np.ndarray:
    """Group candidates into people; same contract as :func:`group_reference`.

    backend: "native" (C++; ImportError if not built), "reference" (NumPy/SciPy),
    or "auto" (native when built, else the reference with one RuntimeWarning per process).
    Returns float32 [P, J, 3 + L].
    """
    if _resolve_backend(backend) == "reference":
        return group_reference(vals, tags, locs, params)
    vals, tags, locs = _check_candidates(vals, tags, locs)
    order = params.resolve_joint_order(vals.shape[0])
    return _NATIVE.group(vals, tags, locs, order, float(params.detection_threshold),
                         float(params.tag_threshold), bool(params.use_detection_val),
                         bool(params.ignore_too_much), int(params.max_people),
                         params.tie_rule == "nearest")


def native_canonical_assignment(cost: np.ndarray, rank: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`canonical_assignment` computed by the C++ Hungarian solver (ImportError if not built)."""
    _resolve_backend("native")
    cost = _check_cost(cost)
    return _NATIVE.assign(cost, _check_rank(rank, cost.shape))
