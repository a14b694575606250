"""Inference-optimized networks: the same module, folded, fused and laid out for the backend.

    fast = optimize_for_inference(net, input_size=(512, 512), device="cpu")
    with torch.no_grad():
        exits = fast(images)                 # same exits as net(images), in the same order
        for out in fast.iter_exits(images):  # still lazy: a DerivedNet stays a DerivedNet
            ...

:func:`optimize_for_inference` works on a deep copy in eval mode and keeps its class and module
tree (a :class:`~threempose.nas.derived.DerivedNet` stays one, with ``iter_exits``, ``forward``,
``exit_gflops`` and its lazily evaluated exits), so any code that runs a network runs the
optimized one. What it does, in order:

1. **BatchNorm folding** (always; exact up to float rounding): every BatchNorm whose input is a
   convolution's output (found by running the network once on a small input) is folded into
   that convolution's weight and bias (:func:`fold_batchnorm`) and replaced by ``nn.Identity``.
2. **Channels-last** memory format (``channels_last``; default on): weights and the input in
   NHWC. Measured on a 2-core CPU, 3x3 max/avg pooling is 7-10x and a depthwise 3x3 conv 6x
   faster in NHWC than in NCHW, a dense conv about 10%; cuDNN's tensor-core convs want it too.
3. **oneDNN fusion** (``fuse``; CPU with oneDNN, on by default there, off with ``compile``):
   every convolution runs as one ``mkldnn._convolution_pointwise`` call with its weight
   pre-packed once into oneDNN's blocked layout (instead of re-ordered on every call), a ReLU
   that follows it in an ``nn.Sequential`` fused into it, and in the residual units
   (:class:`~threempose.models.hrnet_blocks.BasicBlock`, :class:`Bottleneck`) the shortcut add
   and the final ReLU fused into the last convolution. The fused modules are subclasses of the
   originals (``isinstance`` holds, parameters keep their names). A fused network is for
   inference on the CPU only: it is not differentiable, cannot be moved to another device and
   does not export to ONNX; export from ``fuse=False`` (folding and channels-last only).
   Square stride-1 max and average pools (the fabric's 3x3 pools) are swapped to faster CPU
   forms at the same time (:mod:`~threempose.inference.fast_pooling`: max of shifted views;
   a packed depthwise conv of ones over the window counts), 2-3x faster than PyTorch's.
4. **Half precision** (``dtype``): ``torch.float16`` or ``torch.bfloat16`` weights on CUDA;
   ``torch.bfloat16`` on a CPU with native bf16 arithmetic (:func:`cpu_bf16_missing`: oneDNN
   and ``avx512_bf16`` / ``amx_bf16`` on x86, ``bf16`` on Arm), where the convolutions are
   packed and fused as in float32 but run oneDNN's bf16 kernels (measured ~2x the float32 form's
   speed on an ``avx512_bf16`` EPYC). On a CPU without it, bf16 would be emulated (several
   times slower than float32), so a :class:`PrecisionWarning` says so and the float32 form is
   returned. Inputs are cast on the way in; a FabricNet's heads (the 1x1 convs that make the
   heatmaps and tags) stay float32, their inputs cast up, so the maps are computed and returned
   in float32 (another network's outputs are cast back to float32): dynamic-exit scoring and
   decoding read float32 heatmaps, and a peak's height is not rounded to bf16's 8 bits. So do
   the exits' Fuse blocks (``FuseSplit.fuse`` / ``fuse_skip``: the 1x1 convs, resizes and
   squeeze-excite that make the heads' input): rounding their activations to bf16 alone moved
   the small synthetic-trained model's decoded people from float32's as much as rounding the
   whole network did (mean OKS 0.92 vs 0.91; the stem or the cells' activations: 0.996 / 0.965),
   since the tags' grouping decisions hang on them; kept float32 they cost ~2% of the bf16
   form's time at 512 and mean OKS went 0.930 -> 0.966 (README, "Low-precision inference").
   An EEL's Split and the features carried between exits stay in ``dtype``.
5. **torch.compile** (``compile``; off by default): each part the network runs (for a
   DerivedNet the stem, every cell, Fuse-Split block and head, so early exits still stop the
   computation) is compiled in place for ``input_size``. The first call then takes minutes on a
   small CPU; use it where the network serves many images.

Finally the optimized network is checked against the original on a small random input (every
output within ``1e-3`` relative to its scale in float32, :data:`HALF_CHECK_TOLERANCE` in half
precision): a network the folding does not fit (e.g. one that
reads a convolution's raw output besides its BatchNorm) raises instead of serving wrong maps.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import platform
import warnings
import weakref
from typing import Any, Optional

import torch
from torch import Tensor, nn

from threempose.inference.fast_pooling import speed_up_pools
from threempose.inference.onednn_fusion import fuse_onednn
from threempose.nas.fabric import FabricNet

CONVS = (nn.Conv2d, nn.ConvTranspose2d)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
CHECK_SIZE = 64          # side of the random image the optimized network is checked on
CHECK_TOLERANCE = 1e-3   # max |optimized - original| / max(1, max |original|), per output
HALF_CHECK_TOLERANCE = 0.05  # the same in float16 / bfloat16 (8 mantissa bits through ~30 layers)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class PrecisionWarning(UserWarning):
    """A precision was asked for that this machine cannot run natively; a fallback is used."""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``'s ``flags`` / ``Features`` line; empty where
    there is none, e.g. off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_bf16_missing() -> Optional[str]:
    """None when this CPU runs oneDNN bf16 convolutions natively, else what is missing (one
    phrase): oneDNN in this PyTorch build, oneDNN's bf16 support, or the CPU's bf16 instructions
    (x86: ``avx512_bf16`` or ``amx_bf16``; Arm: ``bf16``; both read from ``/proc/cpuinfo``)."""
    if not torch.backends.mkldnn.is_available():
        return "oneDNN (this PyTorch build has no torch.backends.mkldnn)"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN bf16 support on this CPU (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)"
    flags = cpu_flags()
    wanted = ("bf16",) if platform.machine().lower() in ("aarch64", "arm64") else ("avx512_bf16", "amx_bf16")
    if not flags & set(wanted):
        return f"the CPU's bf16 instructions ({' or '.join(wanted)} not among /proc/cpuinfo's flags)"
    return None


def fold_batchnorm(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place, so that ``conv(x) == bn(conv_before(x))``.

    With ``s = bn.weight / sqrt(running_var + eps)`` (per output channel ``o``):
    ``W'[o] = s[o] W[o]`` and ``b'[o] = s[o] (b[o] - running_mean[o]) + bn.bias[o]`` (``b = 0`` for
    a conv without bias; it gets one). ``bn`` is left unchanged; drop it from the network.
    """
    if not isinstance(conv, CONVS):
        raise TypeError(f"fold_batchnorm folds into a Conv2d or ConvTranspose2d, not {type(conv).__name__}")
    if conv.groups != 1 and isinstance(conv, nn.ConvTranspose2d):
        raise ValueError("fold_batchnorm: grouped transposed convolutions are not supported")
    channels = conv.out_channels
    if bn.num_features != channels or not bn.track_running_stats or bn.running_var is None:
        raise ValueError(f"fold_batchnorm: BatchNorm2d({bn.num_features}) with running statistics "
                         f"needed after a conv with {channels} output channels")
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        # Conv2d weight [out, in/groups, k, k]; ConvTranspose2d weight [in, out, k, k]
        shape = (-1, 1, 1, 1) if isinstance(conv, nn.Conv2d) else (1, -1, 1, 1)
        conv.weight.mul_(scale.reshape(shape).to(conv.weight.dtype))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype),
                                 requires_grad=conv.weight.requires_grad)


@dataclasses.dataclass
class Trace:
    """What one forward of a network ran: conv -> BatchNorm pairs (the BN's input is that conv's
    output, in every call of both), the first convolution (the one that reads the image) and
    every convolution's and 2-d pool's input shape ``[B, C, H, W]`` (the last call's)."""

    pairs: list[tuple[nn.Module, nn.BatchNorm2d]]
    first_conv: Optional[nn.Module]
    input_shapes: dict[nn.Module, tuple[int, ...]]


@torch.no_grad()
def trace_network(net: nn.Module, *inputs: Any) -> Trace:
    """Run ``net(*inputs)`` once (eval mode; e.g. one image) and record its convolutions and
    BatchNorms (:class:`Trace`)."""
    produced: dict[int, tuple[weakref.ref, nn.Module]] = {}   # id(conv output) -> (output, conv)
    fed: dict[nn.BatchNorm2d, set] = {}       # bn -> the convs (None: not a conv) that fed it
    calls: dict[nn.Module, int] = {}
    shapes: dict[nn.Module, tuple[int, ...]] = {}
    order: list[nn.Module] = []

    def after_conv(module, inputs, output):
        produced[id(output)] = (weakref.ref(output), module)
        calls[module] = calls.get(module, 0) + 1
        shapes[module] = tuple(inputs[0].shape)
        order.append(module)

    def before_pool(module, inputs):
        shapes[module] = tuple(inputs[0].shape)

    def before_bn(module, inputs):
        ref, conv = produced.get(id(inputs[0]), (None, None))
        fed.setdefault(module, set()).add(conv if ref is not None and ref() is inputs[0] else None)
        calls[module] = calls.get(module, 0) + 1

    hooks = []
    for m in net.modules():
        if isinstance(m, CONVS):
            hooks.append(m.register_forward_hook(after_conv))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(before_bn))
        elif isinstance(m, POOLS):
            hooks.append(m.register_forward_pre_hook(before_pool))
    try:
        net(*inputs)
    finally:
        for h in hooks:
            h.remove()
    feeders: dict[nn.Module, list[nn.BatchNorm2d]] = {}
    for bn, convs in fed.items():
        if len(convs) == 1 and None not in convs:
            feeders.setdefault(next(iter(convs)), []).append(bn)
    pairs = [(conv, bns[0]) for conv, bns in feeders.items()
             if len(bns) == 1 and calls[conv] == calls[bns[0]]]
    return Trace(pairs, order[0] if order else None, shapes)


# --------------------------------------------------------------------------- #
# The public function
# --------------------------------------------------------------------------- #
def optimize_for_inference(net: nn.Module, input_size: tuple[int, int] = (512, 512),
                           device: str | torch.device = "cpu", compile: bool = False,
                           channels_last: bool = True, fuse: Optional[bool] = None,
                           dtype: Optional[torch.dtype] = None, check: bool = True,
                           example_inputs: Optional[tuple] = None) -> nn.Module:
    """An inference-optimized deep copy of ``net`` (module docstring), in eval mode on ``device``.

    Args:
        net: a :class:`~threempose.nas.derived.DerivedNet`, a HigherHRNet or any network taking
            images ``[B, 3, H, W]``; left unchanged.
        input_size: ``(H, W)`` the network will mostly see (packing and compilation are tuned
            for it; other sizes still work).
        device: where the optimized network runs.
        compile: ``torch.compile`` its parts (slow first call; module docstring).
        channels_last: NHWC weights and activations.
        fuse: oneDNN conv packing and ReLU / residual-add fusion; None: on for the CPU when
            oneDNN is available and ``compile`` is off.
        dtype: None (float32); ``torch.float16`` / ``torch.bfloat16`` on CUDA;
            ``torch.bfloat16`` on a CPU (float32 with a :class:`PrecisionWarning` where the CPU
            has no native bf16, :func:`cpu_bf16_missing`).
        check: compare the result with ``net`` on a random ``64 x 64`` image, or on
            ``example_inputs`` (within :data:`CHECK_TOLERANCE`, :data:`HALF_CHECK_TOLERANCE`
            in half precision).
        example_inputs: for a module that takes other inputs than one image (e.g. a block of a
            fabric taking feature maps): the arguments of one call, on ``device``, float32 and
            already in the layout they will arrive in (channels-last with ``channels_last``:
            nothing converts them; with a half ``dtype`` the optimized module takes them in
            ``dtype`` and returns ``dtype``, as a block passes features on). The trace (and ``check``) runs on them; None: an image
            ``[1, 3, *input_size]``, converted to channels-last (and ``dtype``) on the way in.

    Returns:
        The optimized module: same class, same outputs (float32: within float rounding), eval
        mode, no parameter requires grad.

    Raises:
        ValueError: float16 off CUDA, ``fuse`` where oneDNN cannot run, CUDA missing.
        RuntimeError: the check failed (the message names the output and the difference).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
    if dtype == torch.float32:
        dtype = None
    if dtype is not None and dtype not in HALF_DTYPES:
        raise ValueError(f"dtype {dtype} is not an inference precision; use float32, float16 or bfloat16")
    if dtype is not None and device.type != "cuda":
        if dtype != torch.bfloat16 or device.type != "cpu":
            raise ValueError(f"dtype {dtype} is for CUDA; on {device.type} the network runs in float32"
                             + (" or bfloat16" if device.type == "cpu" else ""))
        missing = cpu_bf16_missing()
        if missing is not None:
            warnings.warn(f"bfloat16 inference needs {missing}; using the float32 form (emulated bf16 "
                          "would be several times slower)", PrecisionWarning, stacklevel=2)
            dtype = None
    can_fuse = device.type == "cpu" and torch.backends.mkldnn.is_available()
    if fuse is None:
        fuse = can_fuse and not compile
    elif fuse and not can_fuse:
        raise ValueError(f"fuse=True needs the CPU with oneDNN (device {device}, oneDNN "
                         f"{'available' if torch.backends.mkldnn.is_available() else 'missing'})")
    original = net
    net = copy.deepcopy(net).cpu().float().eval().requires_grad_(False)
    if example_inputs is None:
        trace = trace_network(net, torch.randn(1, 3, *input_size))
    else:
        trace = trace_network(net, *_map_tensors(example_inputs, lambda t: t.cpu().float()))
    for conv, bn in trace.pairs:
        fold_batchnorm(conv, bn)
    folded = {bn for _, bn in trace.pairs}
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if child in folded:
                setattr(parent, name, nn.Identity())
    if dtype is not None:
        net.to(dtype)                        # before packing: oneDNN packs bf16 weights as bf16
        if example_inputs is None:
            _keep_maps_float32(net, dtype)
    if fuse:
        fuse_onednn(net, trace.input_shapes)
        speed_up_pools(net, trace.input_shapes, dtype)
    else:
        net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if example_inputs is None:
        _convert_inputs(net, trace.first_conv, dtype, channels_last)
    if check:
        check_same_outputs(original, net, device, inputs=example_inputs, dtype=dtype,
                           tolerance=CHECK_TOLERANCE if dtype is None else HALF_CHECK_TOLERANCE)
    if compile:
        parts = _compiled_parts(net)
        # instances of one class (the cells) share a code object, each with its own guards
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, len(parts))
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * len(parts))
        for m in parts:
            m.compile(dynamic=False)
    return net


def _convert_inputs(net: nn.Module, first_conv: Optional[nn.Module], dtype: Optional[torch.dtype],
                    channels_last: bool) -> None:
    """Cast the image (the first convolution's input) to ``dtype`` and NHWC, by a pre-hook."""
    if first_conv is not None and (dtype is not None or channels_last):
        first_conv.register_forward_pre_hook(functools.partial(_convert_input, dtype=dtype,
                                                               channels_last=channels_last))


def _convert_input(module: nn.Module, inputs: tuple, dtype: Optional[torch.dtype], channels_last: bool) -> tuple:
    x = inputs[0] if dtype is None else inputs[0].to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *inputs[1:])


def _keep_maps_float32(net: nn.Module, dtype: torch.dtype) -> None:
    """The float32 parts of a ``dtype`` network (module docstring, step 4), in place: a
    FabricNet's heads and exits' Fuse blocks float32 with their inputs cast up by pre-hooks,
    each EEL's Split's inputs cast back to ``dtype``; another network's outputs cast to float32."""
    if not isinstance(net, FabricNet):
        net.register_forward_hook(_outputs_to_float32)
        return
    for head in net.heads.values():          # the 1x1 convs that make the heatmaps and tags
        head.float().register_forward_pre_hook(_inputs_to_float32)
    for block in net.exits.values():
        for fuse in (block.fuse, block.fuse_skip):
            if fuse is not None:
                fuse.float()
        block.register_forward_pre_hook(_inputs_to_float32)
        if block.split is not None:          # back to the rows, in dtype
            block.split.register_forward_pre_hook(functools.partial(_inputs_to, dtype=dtype))


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor in it cast to ``dtype``."""
    return _map_tensors(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _inputs_to(module, inputs, dtype: torch.dtype):
    """Forward pre-hook (with ``dtype`` bound): the module's inputs cast to ``dtype``."""
    return _cast(inputs, dtype)


_inputs_to_float32 = functools.partial(_inputs_to, dtype=torch.float32)


def _outputs_to_float32(module, inputs, output):
    return _cast(output, torch.float32)


def _compiled_parts(net: nn.Module) -> list[nn.Module]:
    """What ``compile`` compiles: a FabricNet's stem, cells, exit blocks' parts and heads (so
    ``iter_exits`` still stops early), else the whole network."""
    if not isinstance(net, FabricNet):
        return [net]
    parts = [net.stem, *net.cells.values(), *net.heads.values()]
    for block in net.exits.values():
        parts += [m for m in (block.fuse, block.fuse_skip, block.split) if m is not None]
    return parts


def _map_tensors(obj: Any, fn) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside lists, tuples, dicts and dataclasses."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj)})
    return obj


def output_tensors(obj: Any) -> list[Tensor]:
    """Every tensor of a network's output (lists, tuples, dicts, dataclasses such as
    :class:`~threempose.nas.fuse_split.ExitOutput`), in order."""
    found: list[Tensor] = []
    _map_tensors(obj, found.append)
    return found


@torch.no_grad()
def check_same_outputs(reference: nn.Module, optimized: nn.Module, device: torch.device | str,
                       size: int = CHECK_SIZE, tolerance: float = CHECK_TOLERANCE,
                       inputs: Optional[tuple] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Raise RuntimeError unless ``optimized`` gives ``reference``'s outputs on ``inputs`` (the
    arguments of one call, float32; None: a random ``[1, 3, size, size]`` image): each within
    ``tolerance * max(1, max |reference output|)``. ``dtype``: the precision the optimized
    module takes given ``inputs`` in (None: float32; the random image is always float32, an
    optimized network casts its images itself)."""
    cast = dtype if inputs is not None else None
    if inputs is None:
        inputs = (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)
    reference_device = next(reference.parameters(), torch.empty(0)).device
    was_training = reference.training
    reference.eval()
    try:
        expected = output_tensors(reference(*_map_tensors(inputs, lambda t: t.to(reference_device, torch.float32))))
    finally:
        reference.train(was_training)
    got = output_tensors(optimized(*_map_tensors(inputs, lambda t: t.to(device, cast))))
    if len(got) != len(expected):
        raise RuntimeError(f"optimize_for_inference: {len(got)} outputs, the original network gives "
                           f"{len(expected)}")
    for i, (e, g) in enumerate(zip(expected, got)):
        e, g = e.float().cpu(), g.float().cpu()
        if e.shape != g.shape:
            raise RuntimeError(f"optimize_for_inference: output {i} is {tuple(g.shape)}, the original "
                               f"network's {tuple(e.shape)}")
        err = (e - g).abs().max().item()
        if not err <= tolerance * max(1.0, e.abs().max().item()):
            raise RuntimeError(
                f"optimize_for_inference: output {i} differs from the original network's by {err:.3g} "
                f"(max abs; tolerance {tolerance:g} relative); this network does not fit the folding or "
                f"fusion (pass fuse=False, or report the network)")
