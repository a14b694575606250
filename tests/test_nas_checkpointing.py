"""Activation checkpointing of the cells (all rows but the last), the exits' Fuse blocks and the
stem's first bottleneck unit: the
same gradients (weights and architecture parameters) and BatchNorm running statistics as the
plain step, on a tiny supernet and a tiny derived net, with fewer activation bytes kept for
backward."""
import copy
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from threempose.config import ModelConfig
from threempose.nas.checkpointing import torch_checkpoint_fn
from threempose.nas.derived import DerivedNet
from threempose.nas.supernet import Supernet

TINY = ModelConfig(rows=2, layers=3, channels=16, eels=[2], stem_blocks=1, hidden=2)


def _loss(exits) -> torch.Tensor:
    return sum((e.heatmaps ** 2).mean() + e.tags.abs().mean() for e in exits)


def _step(net, forward):
    """One forward + backward; ``(loss, {name: grad}, {name: buffer}, saved activation bytes)``."""
    saved = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):         # activations, not the weights themselves
            saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward(net)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    return loss.detach(), grads, buffers, saved[0]


def _compare(net, forward, checkpoint_fn=torch_checkpoint_fn):
    plain_net, ckpt_net = copy.deepcopy(net), copy.deepcopy(net)
    ckpt_net.use_activation_checkpointing(checkpoint_fn)
    loss, grads, buffers, plain_bytes = _step(plain_net, forward)
    loss_c, grads_c, buffers_c, ckpt_bytes = _step(ckpt_net, forward)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and len(grads) > 20
    for name in grads:
        assert torch.equal(grads[name], grads_c[name]), name
    moved = [n for n in buffers if "running_mean" in n and not torch.equal(buffers[n], net.state_dict()[n])]
    assert moved                                                  # the step did update BN statistics ...
    for name in buffers:                                          # ... once, as the plain step
        assert torch.equal(buffers[name], buffers_c[name]), name
    return plain_bytes, ckpt_bytes


def test_supernet_step_has_the_plain_gradients_with_fewer_saved_activations():
    torch.manual_seed(0)
    net = Supernet(TINY).train()
    images = torch.randn(2, 3, 40, 32)

    def forward(n):
        out = n(images, tau=0.7, seed=11)        # the same Gumbel draw in both runs
        return _loss(out.exits) + out.gflops

    plain_bytes, ckpt_bytes = _compare(net, forward)
    assert ckpt_bytes < 0.75 * plain_bytes      # 2 rows: row 0's cells, the Fuse blocks, the stem unit
    arch_grads = [p.grad for p in net.arch_parameters()]
    assert all(g is None for g in arch_grads)                       # the original net was not stepped


def test_supernet_checkpointed_gradients_reach_the_architecture_parameters():
    torch.manual_seed(0)
    net = Supernet(TINY).train()
    net.use_activation_checkpointing()
    out = net(torch.randn(2, 3, 32, 32), tau=1.0, seed=3)
    _loss(out.exits).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (net.arch.alpha, net.arch.beta))


def test_checkpointing_covers_the_cells_of_all_rows_but_the_last_the_fuse_blocks_and_a_stem_unit():
    torch.manual_seed(0)
    model = ModelConfig(rows=3, layers=3, channels=8, eels=[2], stem_blocks=1, hidden=2)
    net = Supernet(model).train()
    inputs = []

    def counting(function, *tensors):
        inputs.append(tensors)
        return torch_checkpoint_fn(function, *tensors)

    net.use_activation_checkpointing(counting)
    out = net(torch.randn(2, 3, 64, 64), tau=1.0, seed=4)
    cells = [c for layer in range(1, model.layers + 1) for c in out.genotype.cells_in_layer(layer)]
    assert any(c.row == model.rows - 1 for c in cells)            # the draw has last-row cells to leave out
    expected = 1 + sum(c.row < model.rows - 1 for c in cells) + len(out.genotype.exit_layers)  # 1: stem unit
    assert len(inputs) == expected
    assert inputs[0][0].shape[1] == 64                           # the stem's first unit, on conv2's output
    fuse_inputs = inputs[-1]                                     # the last exit's Fuse: its rows' features
    assert [t.shape[1] for t in fuse_inputs[:-1]] == [8 * 2 ** c.row for c in out.genotype.cells_in_layer(3)]


def test_derived_net_step_has_the_plain_gradients():
    torch.manual_seed(0)
    supernet = Supernet(TINY)
    genotype = supernet.genotype_of(supernet.sample(tau=1.0, seed=5))
    torch.manual_seed(1)
    net = DerivedNet(genotype, TINY.num_joints, TINY.stem_blocks).train()
    images = torch.randn(2, 3, 32, 32)
    plain_bytes, ckpt_bytes = _compare(net, lambda n: _loss(n(images)))
    assert ckpt_bytes < 0.8 * plain_bytes


@pytest.mark.parametrize("grad", [False, True])
def test_checkpointing_changes_nothing_without_gradients_or_in_eval(grad):
    torch.manual_seed(0)
    net = Supernet(TINY).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        plain = net(images, tau=1.0, seed=2).exits[-1].heatmaps
        net.use_activation_checkpointing()
        ckpt = net(images, tau=1.0, seed=2).exits[-1].heatmaps
    assert torch.equal(plain, ckpt)


def _deepspeed_rank(port: int) -> None:
    """One gloo rank: the DeepSpeed backend (configured from a config's section) against the plain step."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from threempose.nas.checkpointing import deepspeed_checkpoint_fn
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    net = Supernet(TINY).train()
    images = torch.randn(2, 3, 40, 32)
    ds_fn = deepspeed_checkpoint_fn({"train_micro_batch_size_per_gpu": 2,
                                     "activation_checkpointing": {"partition_activations": False}})

    def forward(n):
        out = n(images, tau=0.7, seed=11)
        return _loss(out.exits) + out.gflops

    _compare(net, forward, ds_fn)
    print("deepspeed backend: equal")


@pytest.mark.slow     # a gloo rank in a subprocess (DeepSpeed's import and op build)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed package")
def test_deepspeed_backend_has_the_plain_gradients():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, __file__, str(port)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and "deepspeed backend: equal" in proc.stdout, proc.stderr[-3000:]


if __name__ == "__main__":
    _deepspeed_rank(int(sys.argv[1]))
