"""Per-block latency tables for hardware-aware search: timing the fabric's blocks in the form
inference runs them, and checking a table's predictions against whole networks. The library
behind ``python -m threempose.latency``.

Times every block the cost model prices for the fabric of ``--config``'s model section
(default: the thesis fabric, 4 rows x 10 layers, C = 32): every candidate op of the op registry
at every row's size and width, every input path, every cell's output conv, the element-wise
sum, the stem, the Fuse-Split blocks and the heads. Identical (block, shape) pairs are timed
once. Form (``--form``, :func:`inference_form`): ``deploy`` (default) times every block and
network as inference runs it, optimized by :func:`threempose.inference.deploy.optimize_for_inference`
(BatchNorm folded, channels-last, oneDNN-fused on a CPU; each block optimized on its own
inputs, feature maps channels-last as they flow between blocks); ``eager`` times them in eval
mode with BatchNorm kept. Method: the blocks are run under ``torch.inference_mode``;
``--warmup`` rounds, then ``--reps`` rounds each calling every block once (interleaved, so a
load change on a shared machine hits all blocks alike); an entry is the median of its rounds.

Timers (``--timer``): ``wall`` (default) is ``time.perf_counter`` around each call (after
``torch.cuda.synchronize`` on a GPU), the latency a user sees on an otherwise idle device.
``cpu`` is the process' CPU time (``time.process_time``), only with ``--threads 1`` on a CPU:
equal to the wall time on an idle machine, it leaves out the time the process waits while
other processes hold the cores, which on a loaded machine inflates a 50 ms network (preempted
many times) far more than a 50 us block (almost never), so wall-clock medians of blocks and of
networks do not add up there. CPU time still varies with what shares the core and caches.

Each table also carries a calibration factor measured on whole reference networks
(:func:`build_table`); :func:`build_table_and_time` times further networks in the same
rounds, to compare predictions with measurements taken under the same load.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from threempose.config import ModelConfig
from threempose.inference.deploy import optimize_for_inference
from threempose.nas.derived import DerivedNet
from threempose.nas.fabric import FabricNet
from threempose.nas.genotype import ROW_STEP, FabricLayout, Genotype
from threempose.nas.latency_table import (
    FABRIC_KEYS,
    LatencyTable,
    LatencyTableError,
    add_key,
    block_key,
    device_name,
    op_key,
    output_key,
    path_key,
)
from threempose.nas.ops import OP_NAMES
from threempose.nas.supernet import Supernet

FORMS = ("deploy", "eager")  # what inference_form can produce; recorded in every table


FORM = "deploy"             # the default: the form Predictor and infer run


CALIBRATION_NETWORKS = 4  # reference networks timed with the blocks (see build_table)


CALIBRATION_SEED = 10 ** 6


TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


PRECISIONS = ("fp32", "bf16")   # what a table can be measured in (int8 runs in onnxruntime, not per block)


def check_precision(precision: str) -> None:
    """Raise LatencyTableError unless blocks can be timed in ``precision``."""
    if precision == "int8":
        raise LatencyTableError("int8 latency tables are not measured: int8 runs as whole onnxruntime "
                                "segments, not as the torch blocks a table times; use fp32 or bf16")
    if precision not in PRECISIONS:
        raise LatencyTableError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")


def inference_form(net: nn.Module, input_hw: tuple[int, int], device: torch.device | str,
                   example_inputs: Optional[tuple] = None, form: str = FORM, precision: str = "fp32") -> nn.Module:
    """``net`` (a whole network or one block of a fabric) in the form in which it is timed, as
    inference runs it; the one place that decides it. ``form``:

    * ``"deploy"`` (:data:`FORM`, what :class:`~threempose.inference.predictor.Predictor` and ``infer``
      run): :func:`~threempose.inference.deploy.optimize_for_inference`'s defaults for ``device`` (a
      copy: BatchNorm folded, channels-last, oneDNN-fused convs on a CPU). A block is optimized
      on its own ``example_inputs`` (its call's arguments, feature maps in
      :func:`feature_layout`); None: a network taking images ``[B, 3, *input_hw]``.
    * ``"eager"``: ``net`` itself in eval mode on ``device``, BatchNorm kept.

    ``precision`` ``"bf16"`` (deploy form only): optimized with ``dtype=torch.bfloat16``; a
    block then takes and passes on bf16 features (:func:`feature_layout`).
    """
    check_form(form)
    check_precision(precision)
    if form == "eager":
        if precision != "fp32":
            raise LatencyTableError(f"precision {precision} is timed in the deploy form only")
        return net.to(device).eval()
    dtype = torch.bfloat16 if precision == "bf16" else None
    return optimize_for_inference(net, input_hw, device, example_inputs=example_inputs, dtype=dtype)


def feature_layout(x: torch.Tensor, form: str = FORM, precision: str = "fp32") -> torch.Tensor:
    """A feature map ``[B, C, H, W]`` in the memory layout and precision blocks pass it on in
    ``form`` (channels-last in ``"deploy"``, bfloat16 with ``precision`` ``"bf16"``)."""
    x = x.to(torch.bfloat16) if precision == "bf16" else x
    return x.contiguous(memory_format=torch.channels_last) if form == "deploy" else x


def check_form(form: str) -> None:
    """Raise ValueError unless ``form`` is one of :data:`FORMS`."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; use one of {list(FORMS)}")


def median_ms(fns: dict[str, Callable[[], Any]], device: torch.device | str, warmup: int = 3,
              reps: int = 15, progress: Optional[str] = None, timer: str = "wall") -> dict[str, float]:
    """Median time in ms of each ``fns[name]()``.

    ``warmup`` rounds, then ``reps`` rounds, each calling every function once in order
    (interleaved), under ``torch.inference_mode`` (synchronising a CUDA device around each
    call). ``timer``: ``"wall"`` or ``"cpu"`` (module docstring). ``progress``: a tqdm bar
    label (None: no bar).
    """
    device = torch.device(device)
    check_timer(timer, device)
    clock = TIMERS[timer]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    from tqdm import tqdm

    bar = tqdm(total=(warmup + reps) * len(fns), desc=progress, unit="run", disable=progress is None,
               leave=False)
    with torch.inference_mode():
        for round_ in range(warmup + reps):
            for name, fn in fns.items():
                sync()
                start = clock()
                fn()
                sync()
                if round_ >= warmup:
                    times[name].append((clock() - start) * 1e3)
                bar.update()
    bar.close()
    return {name: statistics.median(t) for name, t in times.items()}


def check_timer(timer: str, device: torch.device | str) -> None:
    """Raise ValueError unless ``timer`` measures latency on ``device`` with torch's threads."""
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r}; use one of {sorted(TIMERS)}")
    if timer == "cpu" and (torch.device(device).type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError(f"the cpu timer measures latency only on a CPU with one thread (got "
                         f"{torch.device(device).type}, {torch.get_num_threads()} threads); use --threads 1 "
                         "or the wall timer")


def fabric_blocks(net: Supernet, input_hw: tuple[int, int], batch: int = 1,
                  form: str = FORM, precision: str = "fp32") -> dict[str, Callable[[], Any]]:
    """``{block key: run it once}`` for every block of ``net`` the cost model prices at
    ``input_hw``, each in :func:`inference_form` ``form`` (optimized on its own inputs) on
    random inputs of its shape on ``net``'s device (identical keys once)."""
    g = net.genotype
    device = next(net.parameters()).device
    sizes = [FabricLayout.row_size(input_hw, r) for r in range(g.rows)]

    def feat(width: int, row: int) -> torch.Tensor:
        return feature_layout(torch.randn(batch, width, *sizes[row], device=device), form, precision)

    def timed(module: nn.Module, *args: Any) -> Callable[[], Any]:
        run = inference_form(module, input_hw, device, args, form, precision)
        return lambda: run(*args)

    def concat_then(output: nn.Module, nodes: list[torch.Tensor]) -> Callable[[], Any]:
        run = inference_form(output, input_hw, device, (torch.cat(nodes, dim=1),), form, precision)
        return lambda: run(torch.cat(nodes, dim=1))

    blocks: dict[str, Callable[[], Any]] = {}

    def add(key: str, make: Callable[[], Callable[[], Any]]) -> None:
        if key not in blocks:      # identical blocks are optimized and timed once
            blocks[key] = make()

    def on_images(stem: nn.Module) -> Callable[[], Any]:
        images = torch.randn(batch, 3, *input_hw, device=device)
        run = inference_form(stem, input_hw, device, None, form, precision)   # optimized as a network's start
        return lambda: run(images)

    add(block_key(net.stem, input_hw), lambda: on_images(net.stem))
    for c in g.cells:
        if c.pruned:
            continue
        cell, width, hw = net.cells[str(c.index)], g.channels * 2 ** c.row, sizes[c.row]
        x = feat(width, c.row)
        for name, op in cell.edges[0].items():
            add(op_key(name, width, hw), lambda op=op, x=x: timed(op, x))
        for name, path in cell.inputs.items():
            src = c.row + ROW_STEP[name]
            inp = feat(g.channels * 2 ** src, src)
            add(path_key(name, width, hw), lambda path=path, inp=inp, hw=hw: timed(path, inp, hw))
        nodes = [feat(width, c.row) for _ in range(g.hidden)]
        add(output_key(g.hidden, width, hw), lambda out=cell.output, nodes=nodes: concat_then(out, nodes))
        y = feat(width, c.row)
        add(add_key(width, hw), lambda x=x, y=y: lambda: x + y)
    fused = feat(g.channels, 0)
    for layer in g.exit_layers:
        if g.fuse_split:
            block = net.exits[str(layer)]
            rows = {r: feat(g.channels * 2 ** r, r) for r in block.rows}
            add(block_key(block.fuse, sizes[0]), lambda f=block.fuse, xs=list(rows.values()): timed(f, xs, sizes[0]))
            if block.fuse_skip is not None:
                add(block_key(block.fuse_skip, sizes[0]), lambda f=block.fuse_skip: timed(f, [fused, fused], sizes[0]))
            if block.split is not None:
                add(block_key(block.split, sizes[0]), lambda s=block.split, rows=rows: timed(s, fused, rows))
        head = net.heads[str(layer)]
        add(block_key(head, sizes[0]), lambda head=head: timed(head, fused))
    return blocks


def build_table(model: ModelConfig, input_hw: tuple[int, int], device: torch.device | str = "cpu",
                batch: int = 1, warmup: int = 3, reps: int = 15, progress: bool = False,
                timer: str = "wall", form: str = FORM, precision: str = "fp32") -> LatencyTable:
    """Measure the :class:`LatencyTable` of ``model``'s fabric with every op of the registry
    (:data:`~threempose.nas.ops.OP_NAMES`) at ``input_hw`` on ``device`` (module docstring).

    Calibration: :data:`CALIBRATION_NETWORKS` random networks (:func:`random_genotypes` with
    preference 1, fixed seeds) are timed whole in the same interleaved rounds as the blocks;
    the table's ``calibration`` is the median of measured / sum-of-blocks over them. It is a
    per-device factor for what adding block medians leaves out: the fabric's own Python
    dispatch between blocks, blocks whose inputs come cold from the previous block rather
    than warm from the last repetition, and per-call times skewed to the right (a network's
    median exceeds the sum of its blocks' medians)."""
    return build_table_and_time(model, input_hw, {}, device, batch, warmup, reps, progress, timer, form,
                                precision)[0]


def build_table_and_time(model: ModelConfig, input_hw: tuple[int, int], networks: dict[str, FabricNet],
                         device: torch.device | str = "cpu", batch: int = 1, warmup: int = 3,
                         reps: int = 15, progress: bool = False,
                         timer: str = "wall", form: str = FORM, precision: str = "fp32"
                         ) -> tuple[LatencyTable, dict[str, float]]:
    """:func:`build_table`, and the whole ``networks`` (their last exit) timed in the same
    interleaved rounds: ``(table, {name: median ms})``. On a machine whose load drifts, this
    compares predictions with measurements taken under the same load."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = dataclasses.replace(model, ops=list(OP_NAMES))
    check_form(form)
    net = Supernet(model).to(device).eval()
    check_precision(precision)
    blocks = fabric_blocks(net, input_hw, batch, form, precision)
    references = {f"\0reference network {i}": DerivedNet(g, model.num_joints, model.stem_blocks)
                  for i, g in enumerate(random_genotypes(model, CALIBRATION_NETWORKS, CALIBRATION_SEED, 1.0))}
    images = torch.randn(batch, 3, *input_hw, device=device)
    whole = {k: (lambda n=inference_form(n, input_hw, device, form=form, precision=precision):
                 _run_to(n, images, n.genotype.layers))
             for k, n in {**references, **networks}.items()}
    times = median_ms({**blocks, **whole}, device, warmup, reps, "latency table" if progress else None, timer)
    entries = {k: times[k] for k in blocks}
    fabric = {k: getattr(model, k) for k in FABRIC_KEYS}
    fabric["eels"] = list(fabric["eels"])
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch, "form": form,
            "precision": precision,
            "method": {"timer": timer, "clock": TIMERS[timer].__name__, "statistic": "median",
                       "warmup_rounds": warmup, "rounds": reps, "grad": "torch.inference_mode",
                       "order": "interleaved: each round runs every block once"}}
    table = LatencyTable(entries=entries, fabric=fabric, ops=list(OP_NAMES), input_hw=tuple(input_hw),
                         device=device.type, device_name=device_name(device), meta=meta)
    ratios = [times[k] / n.exit_costs(table, input_hw)[model.layers] for k, n in references.items()]
    table.calibration = statistics.median(ratios)
    meta["calibration_ratios"] = ratios
    return table, {k: times[k] for k in networks}


def network_ms(nets: dict[str, FabricNet], input_hw: tuple[int, int], device: torch.device | str = "cpu",
               batch: int = 1, warmup: int = 3, reps: int = 15, progress: Optional[str] = None,
               exits: bool = False, timer: str = "wall", form: str = FORM) -> dict[str, Any]:
    """Measured end-to-end latency (median ms, :func:`median_ms`, interleaved over ``nets``) of
    each network in :func:`inference_form` ``form`` on ``[batch, 3, *input_hw]`` images: ``{name: ms}``
    to the last exit, or with ``exits`` ``{name: {layer: ms}}`` to every exit (computing
    only as far as that exit)."""
    images = torch.randn(batch, 3, *input_hw, device=device)
    fns: dict[str, Callable[[], Any]] = {}
    for name, net in nets.items():
        net = inference_form(net, input_hw, device, form=form)
        g = net.genotype
        for layer in (g.exit_layers if exits else [g.layers]):
            fns[f"{name}\0{layer}"] = lambda net=net, layer=layer: _run_to(net, images, layer)
    times = median_ms(fns, device, warmup, reps, progress, timer)
    out: dict[str, Any] = {}
    for key, ms in times.items():
        name, layer = key.split("\0")
        if exits:
            out.setdefault(name, {})[int(layer)] = ms
        else:
            out[name] = ms
    return out


def _run_to(net: FabricNet, images: torch.Tensor, layer: int) -> None:
    for out in net.run(images, net.genotype):
        if out.layer == layer:
            return


def prediction_accuracy(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """How well predicted latencies match measured ones (same order, no ties expected):
    ``spearman`` (Pearson correlation of the ranks), ``mae`` (mean of |pred - meas| / meas)
    and ``bias`` (mean of pred / meas - 1)."""
    if len(predicted) != len(measured) or len(predicted) < 2:
        raise ValueError(f"need two equally long lists of at least 2, got {len(predicted)} and "
                         f"{len(measured)}")
    p, m = torch.tensor(predicted, dtype=torch.float64), torch.tensor(measured, dtype=torch.float64)
    ranks = torch.stack([p.argsort().argsort(), m.argsort().argsort()]).double()
    spearman = float(torch.corrcoef(ranks)[0, 1])
    return {"spearman": spearman, "mae": float(((p - m).abs() / m).mean()), "bias": float((p / m - 1).mean())}


def random_genotypes(model: ModelConfig, count: int, seed: int = 0,
                     preference: float = 0.0) -> list[Genotype]:
    """``count`` architectures of ``model``'s search space, Dyn-EGS draws at tau = 1, seeds
    ``seed, seed + 1, ...``. With ``preference`` 0 alpha, beta and m are uniform (as a search's
    first steps draw); with ``preference`` s > 0 each genotype first draws its own logits over
    ops, inputs and Dyn-EGS states, N(0, s^2), shared by all its cells, so the set spans cheap
    (identity, one input) to costly (two convs per edge, three inputs) networks."""
    net = Supernet(model)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(count):
            for p in net.arch_parameters():
                p.copy_(preference * torch.randn(p.shape[-1], generator=gen).expand_as(p))
            out.append(net.genotype_of(net.sample(1.0, seed=seed + i)))
    return out
