"""Measuring GFLOPs the papers' way: one multiply-add = one FLOP.

``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add;
:func:`measure_gflops` halves its total. (Measured: the official HigherHRNet-W32
at 512x512 is 92.4 G in FlopCounterMode = 46.2 G multiply-adds, which
HigherHRNet and the thesis report as "47.9 GFLOPs".)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def measure_gflops(fn: Callable[[], object]) -> float:
    """Run ``fn()`` under FlopCounterMode; return GFLOPs as multiply-adds (count / 2 / 1e9)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 2.0 / 1e9


def model_gflops(model: nn.Module, input_size: tuple[int, int], batch: int = 1) -> float:
    """GFLOPs (multiply-adds) of one ``model(x)`` call on ``x`` of shape [batch, 3, H, W]."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(batch, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        return measure_gflops(lambda: model(x))
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())
