"""The derived network: only the genotype's modules, lazy early exits, static GFLOPs per exit
equal to FlopCounterMode, and the thesis architecture end to end."""
import collections
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from threempose.config import ModelConfig
from threempose.nas import cell as cell_module
from threempose.nas import ops as ops_module
from threempose.nas.derived import DerivedNet
from threempose.nas.fabric import Carry
from threempose.nas.supernet import Supernet
from threempose.nas.fuse_split import FuseSplit
from threempose.nas.genotype import Genotype

from test_nas_supernet import derived_twin, random_weights_

THESIS = Path(__file__).resolve().parents[1] / "configs" / "genotypes" / "3m-pose-thesis.json"
TINY = dict(rows=3, layers=4, channels=4, eels=[2, 3], stem_blocks=1)


@pytest.fixture(scope="module")
def genotype() -> Genotype:
    torch.manual_seed(0)
    return Supernet(ModelConfig(**TINY))(torch.randn(2, 3, 32, 32), tau=1.0, seed=21).genotype


@pytest.fixture(scope="module")
def net(genotype) -> DerivedNet:
    torch.manual_seed(0)
    return DerivedNet(genotype, stem_blocks=1).eval()


def test_contains_exactly_the_genotypes_ops_and_paths(genotype, net):
    live = [c for c in genotype.cells if not c.pruned]
    expected = collections.Counter(ops_module.OPS[o] for c in live for edge in c.edges for o in edge)
    expected.update(cell_module.PATHS[p] for c in live for p in c.inputs)
    kinds = set(ops_module.OPS.values()) | set(cell_module.PATHS.values())
    found = collections.Counter(type(m) for m in net.cells.modules() if type(m) in kinds)
    assert found == expected
    assert sorted(int(k) for k in net.cells) == [c.index for c in live]


def test_state_dict_keys_are_a_subset_of_the_supernets(genotype, net):
    torch.manual_seed(0)
    supernet = Supernet(ModelConfig(**TINY)).state_dict()
    for key, value in net.state_dict().items():
        assert key in supernet and supernet[key].shape == value.shape, key


@pytest.mark.parametrize("hw", [(64, 48), (45, 59)])
def test_forward_equals_the_supernet_on_its_sampled_architecture(genotype, hw):
    """The derived network of a sample, holding the supernet's (random) weights, gives the
    supernet's exits and cell outputs for the same sample: only the chosen modules, summed
    without the sample's 0/1 weights. Measured: bit-identical; bound 1e-6."""
    torch.manual_seed(0)
    supernet = random_weights_(Supernet(ModelConfig(**TINY))).eval()
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[1]))
    with torch.no_grad():
        out = supernet(x, tau=1.0, seed=21)
        assert out.genotype == genotype
        derived = derived_twin(supernet, genotype)
        cells = []
        exits = list(derived.run(x, derived.genotype, cell_outputs=cells))
    assert [e.layer for e in exits] == [2, 3, 4]
    assert all(e.heatmaps.shape == (2, 17, (hw[0] + 3) // 4, (hw[1] + 3) // 4) for e in exits)
    for got, want in zip(exits, out.exits):
        assert want.heatmaps.abs().max() > 0.05                            # loud: not two zero maps
        torch.testing.assert_close(got.heatmaps, want.heatmaps, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.tags, want.tags, rtol=0, atol=1e-6)
    assert len(cells) == len(out.cell_outputs) == sum(not c.pruned for c in genotype.cells)
    for got, want in zip(cells, out.cell_outputs):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_iter_exits_runs_later_layers_only_when_asked(genotype, net):
    called = []
    hooks = [m.register_forward_hook(lambda *_, key=k: called.append(key))
             for k, m in [*((f"cell{k}", c) for k, c in net.cells.items()),
                          *((f"split{k}", b.split) for k, b in net.exits.items() if b.split is not None)]]
    try:
        with torch.no_grad():
            exits = net.iter_exits(torch.randn(1, 3, 32, 32))
            first = next(exits)
            assert first.layer == 2
            assert called == [f"cell{c.index}" for c in genotype.cells if not c.pruned and c.layer <= 2]
            second = next(exits)
            assert second.layer == 3
            assert "split2" in called and "split3" not in called
            assert not any(f"cell{c.index}" in called for c in genotype.cells if c.layer == 4)
    finally:
        for h in hooks:
            h.remove()


def test_segments_chain_to_the_forward_and_carries_can_drop_images(net):
    """stem -> exit 2 -> exit 3 -> exit 4 through explicit carries gives forward()'s exits; a
    carry cut to some images continues exactly as those images run on their own."""
    x = torch.randn(3, 3, 45, 59, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = net(x)
        out2, carry2 = net.segment(x)
        assert carry2.layer == 2 and carry2.skip.shape == (3, 4, 12, 15)
        assert sorted(carry2.feats) == [0, 1, 2] and carry2.feats[2].shape[-2:] == (3, 4)
        flat = carry2.tensors()
        again = Carry.from_tensors(2, sorted(carry2.feats), flat)
        out3, carry3 = net.segment(again)
        out4, last = net.segment(carry3)
        assert last is None
        for a, b in zip(full, (out2, out3, out4)):
            assert a.layer == b.layer and torch.equal(a.heatmaps, b.heatmaps) and torch.equal(a.tags, b.tags)
        keep = torch.tensor([2, 0])
        out3_kept, _ = net.segment(carry2.select(keep))
        alone = net(x[keep])[1]
        assert torch.allclose(out3_kept.heatmaps, alone.heatmaps, atol=1e-6)
        with pytest.raises(ValueError, match="no exit after layer 4"):
            net.segment(Carry(4, carry3.feats, carry3.skip))
        with pytest.raises(ValueError, match="has 3 or 4 tensors, got 2"):
            Carry.from_tensors(2, [0, 1, 2], flat[:2])


@pytest.mark.parametrize("hw", [(64, 48), (45, 59)])
def test_exit_gflops_equal_flop_counter_up_to_each_exit(net, hw):
    static = net.exit_gflops(hw)
    assert list(static) == [2, 3, 4]
    x = torch.randn(1, 3, *hw)
    for n_exits, layer in enumerate(static, start=1):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            exits = net.iter_exits(x)
            for _ in range(n_exits):
                next(exits)
        assert static[layer] == pytest.approx(counter.get_total_flops() / 2 / 1e9, rel=1e-9)
    assert static[2] < static[3] < static[4]


def test_exit_params_add_up_to_the_whole_network(net):
    params = net.exit_params()
    assert params[4] == sum(p.numel() for p in net.parameters())
    split = sum(p.numel() for b in net.exits.values() if b.split is not None for p in b.split.parameters())
    assert params[2] < params[3] < params[4] and split > 0


def test_thesis_genotype_builds_and_runs():
    torch.manual_seed(0)
    net = DerivedNet(Genotype.load(THESIS)).eval()
    assert "2" not in net.cells and len(net.cells) == 36          # cell 2 is pruned
    assert isinstance(net.exits["4"], FuseSplit) and net.exits["10"].split is None
    assert len(net.exits["4"].rows) == 4 and net.exits["10"].rows == [0, 1, 2, 3]
    with torch.no_grad():
        exits = net(torch.randn(1, 3, 64, 96))
    assert [(e.layer, tuple(e.heatmaps.shape), tuple(e.tags.shape)) for e in exits] == [
        (layer, (1, 17, 16, 24), (1, 17, 16, 24)) for layer in (4, 7, 10)]
    assert all(torch.isfinite(e.heatmaps).all() for e in exits)
