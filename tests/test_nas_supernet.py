"""The supernet: exit shapes at any input size, discrete sampled forwards (op calls counted),
gradients to every architecture parameter, reproducible samples, and expected GFLOPs equal to
FlopCounterMode on the derived network of the same sample."""
import math

import pytest
import torch

from threempose.config import CellOptions, ModelConfig
from threempose.util.flops import measure_gflops
from threempose.nas.derived import DerivedNet
from threempose.nas.supernet import Supernet
from threempose.nas.genotype import INPUT_NAMES
from threempose.nas.ops import SqueezeExcite

TINY = dict(rows=3, layers=4, channels=4, eels=[2, 3], stem_blocks=1)


def tiny_supernet(**over) -> Supernet:
    torch.manual_seed(0)
    return Supernet(ModelConfig(**{**TINY, **over}))


@pytest.fixture(scope="module")
def net() -> Supernet:
    return tiny_supernet()


def random_weights_(net: torch.nn.Module, seed: int = 7) -> torch.nn.Module:
    """Variance-preserving random conv/linear weights and random BatchNorm running statistics
    (not alpha/beta/m): fresh heads output ~0, which would make any two networks look equal."""
    gen = torch.Generator().manual_seed(seed)
    arch = {id(p) for p in getattr(net, "arch_parameters", list)()}
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and id(p) not in arch:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net


def derived_twin(supernet: Supernet, genotype) -> DerivedNet:
    """The derived network of ``genotype`` holding ``supernet``'s weights (its state dict keys
    are a subset of the supernet's), in eval mode."""
    derived = DerivedNet(genotype, supernet.num_joints, supernet.stem_blocks).eval()
    own = derived.state_dict()
    derived.load_state_dict({k: v for k, v in supernet.state_dict().items() if k in own}, strict=True)
    return derived


@pytest.mark.parametrize("hw", [(64, 48), (50, 70), (37, 45)])
def test_exits_have_quarter_scale_maps_for_any_input_size(net, hw):
    out = net(torch.randn(2, 3, *hw), tau=1.0, seed=1)
    assert [e.layer for e in out.exits] == [2, 3, 4]
    expected = (2, 17, math.ceil(hw[0] / 4), math.ceil(hw[1] / 4))
    for e in out.exits:
        assert e.heatmaps.shape == expected and e.tags.shape == expected
    live = [c for c in out.genotype.cells if not c.pruned]
    assert len(out.cell_outputs) == len(live)
    for c, y in zip(live, out.cell_outputs):
        assert y.shape == (2, 4 * 2 ** c.row, math.ceil(hw[0] / 2 ** (c.row + 2)),
                           math.ceil(hw[1] / 2 ** (c.row + 2)))


@pytest.mark.parametrize("mode", ["argmax", "dense"])
def test_other_sampling_modes_equal_the_derived_network_of_a_one_hot_architecture(mode):
    """alpha, beta and m one-hot (30 on one entry: softmax weights of 1 - 1e-13) make the argmax
    and the dense (softmax-weighted, every op computed) supernets the derived network of
    ``derive()`` with the same weights. Measured: bit-identical outputs; bound 1e-6."""
    net = random_weights_(tiny_supernet(sampling=mode)).eval()
    assert net.sampling == mode
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        alpha, beta = net.arch.alpha, net.arch.beta
        alpha.copy_(30.0 * torch.nn.functional.one_hot(torch.randint(0, 9, alpha.shape[:2], generator=gen), 9))
        beta.copy_(30.0 * torch.nn.functional.one_hot(torch.randint(0, 3, beta.shape[:1], generator=gen), 3))
        net.arch.m_alpha.copy_(torch.tensor([30.0, 0.0]))                 # state 0: one op per edge
        net.arch.m_beta.copy_(torch.tensor([30.0, 0.0, 0.0]))             # one input per cell
    x = torch.randn(2, 3, 40, 36, generator=gen)
    with torch.no_grad():
        out = net(x, tau=1.0)
        expected = derived_twin(net, net.derive())(x)
    assert [tuple(e.heatmaps.shape) for e in out.exits] == [(2, 17, 10, 9)] * 3
    assert len({op for c in net.derive().cells if not c.pruned for edge in c.edges for op in edge}) > 3
    for got, want in zip(out.exits, expected):
        assert want.heatmaps.abs().max() > 0.05                            # loud: not two zero maps
        torch.testing.assert_close(got.heatmaps, want.heatmaps, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.tags, want.tags, rtol=0, atol=1e-6)


def test_without_fuse_split_heads_read_row_0():
    net = tiny_supernet(fuse_split=False)
    assert len(net.exits) == 0
    out = net(torch.randn(2, 3, 32, 32), tau=1.0, seed=0)
    assert [tuple(e.heatmaps.shape) for e in out.exits] == [(2, 17, 8, 8)] * 3
    # row 1-2 cells of the last layer feed nothing and are never built
    assert {"9", "10"}.isdisjoint(net.cells.keys())


def count_calls(net: Supernet):
    calls, handles = [], []
    for index, cell in net.cells.items():
        for e, ops in enumerate(cell.edges):
            for name, op in ops.items():
                handles.append(op.register_forward_hook(
                    lambda *_, key=(int(index), e, name): calls.append(key)))
        for name, path in cell.inputs.items():
            handles.append(path.register_forward_hook(
                lambda *_, key=(int(index), "path", name): calls.append(key)))
    return calls, handles


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_forward_computes_exactly_the_chosen_ops_and_paths(net, seed):
    sample = net.sample(tau=1.0, seed=seed)
    calls, handles = count_calls(net)
    try:
        out = net(torch.randn(2, 3, 32, 32), tau=1.0, seed=seed)
    finally:
        for h in handles:
            h.remove()
    expected = []
    for cell in out.genotype.cells:
        if cell.pruned:
            continue
        expected += [(cell.index, "path", p) for p in cell.inputs]
        for e, ops in enumerate(cell.edges):
            assert 1 <= len(ops) <= 2                   # r_alpha = 2
            assert sorted(net.ops.index(o) for o in ops) == sample.ops[cell.index][e]
            expected += [(cell.index, e, o) for o in ops]
        assert [INPUT_NAMES.index(p) for p in cell.inputs] == sample.paths[cell.index]
    assert sorted(calls, key=str) == sorted(expected, key=str)   # each chosen module once, nothing else


def test_forced_state_picks_top_two_ops_of_alpha():
    net = tiny_supernet()
    with torch.no_grad():
        net.arch.alpha.copy_(torch.tensor([0.0, 40.0, 0.0, 0.0, 0.0, 80.0, 0.0, 0.0, 0.0]))  # sep_conv > conv
        net.arch.m_alpha.copy_(torch.tensor([0.0, 60.0]))                                   # state 1: 2 ops
    out = net(torch.randn(2, 3, 32, 32), tau=1.0, seed=4)
    assert {tuple(ops) for c in out.genotype.cells for ops in c.edges} == {("conv", "sep_conv")}


def test_one_backward_reaches_every_architecture_parameter(net):
    net.zero_grad()
    out = net(torch.randn(2, 3, 32, 32), tau=1.0, seed=3)
    loss = sum(e.heatmaps.square().mean() + e.tags.square().mean() for e in out.exits) + out.gflops
    loss.backward()
    for p in net.arch_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_dense_architecture_gradient_equals_finite_differences():
    """d loss / d alpha and d loss / d beta through the relaxed (``dense``, softmax-weighted)
    supernet equal central finite differences, in float64 on a 2x3 fabric with random weights
    (fresh heads output ~0 and would make every gradient ~0). m_alpha / m_beta do not enter a
    dense forward; their straight-through gradient is the reachability check above. Step 1e-3:
    smaller steps meet float32 rounding inside the network (a 1e-6 step is 5% off). Measured at
    1e-3: |FD - autograd| <= 6.8e-5 of the largest gradient; the bound is 1e-3 of it."""
    torch.manual_seed(0)
    net = Supernet(ModelConfig(rows=2, layers=3, channels=2, eels=[2], stem_blocks=0, sampling="dense"))
    net = net.double().eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for p in net.weight_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p[0].numel() ** 0.5)
    x = torch.randn(1, 3, 16, 16, generator=gen, dtype=torch.float64)

    def loss():
        out = net(x, tau=0.7)
        return sum((e.heatmaps ** 2).mean() + (e.tags ** 2).mean() for e in out.exits)

    alpha, beta = net.arch.alpha, net.arch.beta
    grads = torch.autograd.grad(loss(), [alpha, beta])
    h = 1e-3
    for p, g in zip((alpha, beta), grads):
        flat, g = p.data.view(-1), g.view(-1)
        picked = torch.cat([g.abs().topk(4).indices, torch.randperm(g.numel(), generator=gen)[:4]])
        for i in picked.tolist():
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + h
                up = loss().item()
                flat[i] = old - h
                down = loss().item()
                flat[i] = old
            fd = (up - down) / (2 * h)
            assert abs(fd - g[i].item()) <= 1e-3 * g.abs().max().item(), (tuple(p.shape), i, fd, g[i].item())
        assert g.abs().max() > 1e-5                             # a real gradient, not zeros


def test_same_seed_same_architecture_and_output(net):
    x = torch.randn(2, 3, 32, 32)
    a, b = net(x, tau=1.0, seed=11), net(x, tau=1.0, seed=11)
    assert a.genotype == b.genotype
    torch.testing.assert_close(a.exits[-1].heatmaps, b.exits[-1].heatmaps)
    assert any(net(x, tau=1.0, seed=s).genotype != a.genotype for s in (12, 13, 14))
    # without a seed, the supernet's own generator: two fresh supernets draw the same sequence
    n1, n2 = tiny_supernet(), tiny_supernet()
    assert [n1(x, tau=1.0).genotype for _ in range(2)] == [n2(x, tau=1.0).genotype for _ in range(2)]


@pytest.mark.parametrize("seed, hw", [(0, (64, 48)), (5, (50, 70)), (9, (36, 36))])
def test_expected_gflops_match_flop_counter_on_the_derived_network(net, seed, hw):
    out = net(torch.randn(2, 3, *hw), tau=1.0, seed=seed)
    derived = DerivedNet(out.genotype, num_joints=17, stem_blocks=1)
    measured = measure_gflops(lambda: derived(torch.randn(1, 3, *hw)))
    assert out.gflops.item() == pytest.approx(measured, rel=0.02)
    assert out.gflops.item() == pytest.approx(derived.exit_gflops(hw)[4], rel=1e-6)


def test_argmax_gflops_match_the_derived_genotype(net):
    net.sampling = "argmax"
    try:
        out = net(torch.randn(1, 3, 48, 40), tau=1.0)
    finally:
        net.sampling = "dyn_egs"
    assert out.genotype == net.derive()
    measured = measure_gflops(lambda: DerivedNet(net.derive(), stem_blocks=1)(torch.randn(1, 3, 48, 40)))
    assert out.gflops.item() == pytest.approx(measured, rel=0.02)


def test_parameter_groups_are_disjoint_and_cover_the_model(net):
    arch, weights = net.arch_parameters(), net.weight_parameters()
    assert {id(p) for p in arch}.isdisjoint(id(p) for p in weights)
    assert len(arch) + len(weights) == len(list(net.parameters()))
    assert [tuple(p.shape) for p in arch] == [(11, 3, 9), (11, 3), (11, 3, 2), (11, 3)]


def test_derive_follows_the_parameters():
    net = tiny_supernet()
    with torch.no_grad():
        net.arch.alpha[..., net.ops.index("zoom_conv")] = 5.0
        net.arch.beta[:, INPUT_NAMES.index("parallel")] = 5.0
    g = net.derive()
    live = [c for c in g.cells if not c.pruned]
    assert all(ops == ["zoom_conv"] for c in live for ops in c.edges)
    # a cell with a parallel neighbour takes it; a new row's first cell takes its copy's source
    assert all(c.inputs == (["above"] if c.row == c.layer else ["parallel"]) for c in live)


def test_bad_model_configs_are_errors_naming_the_key():
    with pytest.raises(ValueError, match="model.r_alpha"):
        Supernet(ModelConfig(**TINY, ops=["conv", "identity"], r_alpha=3))
    with pytest.raises(ValueError, match="model.ops"):
        Supernet(ModelConfig(**TINY, ops=["conv", "dilated"]))
    with pytest.raises(ValueError, match="unknown sampling mode"):
        tiny_supernet().sample(1.0, 0, mode="random")


def test_cell_options_reach_the_derived_genotype_and_network():
    options = CellOptions(hidden_sum=True, se_reduction=2, sep_conv_repeats=2)
    net = Supernet(ModelConfig(**TINY, ops=["se", "sep_conv"], cell_options=options))
    genotype = net.derive()
    assert genotype.cell_options == options
    derived = DerivedNet(genotype, 17, TINY["stem_blocks"])
    assert all(m.hidden_sum for m in derived.cells.values())
    squeezes = {m.fc1.out_channels * 2 == m.fc1.in_channels for m in derived.cells.modules()
                if isinstance(m, SqueezeExcite)}
    assert squeezes == {True}                                       # C // 2 in every SE op
    derived.load_state_dict({k: v for k, v in net.state_dict().items() if k in derived.state_dict()})
