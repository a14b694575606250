"""The bilevel architecture optimizer's weight decay (PNFS §IV-B's first-order baseline)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from threempose.config import ConfigError, load_config
from threempose.engine.distributed import DistContext
from threempose.training.search_optim import SearchOptimizers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("decay", [0.001, 0.0])
def test_arch_adam_decays_architecture_parameters(decay):
    """With a loss that does not depend on alpha, only the L2 term moves it: Adam's first step is
    lr * g / (|g| + eps) with g = decay * alpha (about lr * sign(alpha)), nothing at decay 0."""
    cfg = load_config(CONFIGS / "pnfs-mpii-first-order.json",
                      overrides={"search": {"arch_weight_decay": decay}, "run": {"amp": "none"}})
    module = nn.Linear(2, 2)
    alpha = nn.Parameter(torch.tensor([0.5, -2.0, 1e-3]))
    opt = SearchOptimizers(module, list(module.parameters()), [alpha], cfg, DistContext(), ["alpha"])
    assert opt.arch_opt.param_groups[0]["weight_decay"] == decay
    before = alpha.detach().clone()
    opt.arch_step((alpha * 0).sum() + module(torch.ones(1, 2)).sum() * 0)
    g = decay * before
    expected = before - 0.003 * g / (g.abs() + 1e-8)          # Adam's first step (bias-corrected)
    torch.testing.assert_close(alpha.detach(), expected, rtol=0, atol=1e-6)


def test_first_order_baseline_config_is_pnfs_table_ii():
    """PNFS §IV-B / Table II: "Another Adam optimizer is used to update alpha, beta with 0.003 learning
    rate and 0.001 weight decay"; half of the training data held out; MobileNet-V2, P=3, H=1, C=10."""
    cfg = load_config(CONFIGS / "pnfs-mpii-first-order.json")
    s, p, m = cfg.search, cfg.pnfs, cfg.model
    assert (s.strategy, s.arch_lr, s.arch_weight_decay, s.arch_val_fraction) == ("bilevel", 0.003, 0.001, 0.5)
    assert (p.backbone, p.num_parts, m.hidden, m.channels, p.topdown.vector_dim) == ("mobilenet_v2", 3, 1, 40, 8)
    assert load_config(CONFIGS / "search.json").search.arch_weight_decay == 0.0     # the thesis gives none
    with pytest.raises(ConfigError, match="arch_weight_decay must be >= 0"):
        load_config(CONFIGS / "search.json", overrides={"search": {"arch_weight_decay": -1.0}})
