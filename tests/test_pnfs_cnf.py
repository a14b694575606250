"""PNFS cell fabrics: layouts (PNFS §III-C, §IV-A, Table VIII), per-part architecture
parameters, the three samplers, pruning (§III-F) and architecture files."""
from __future__ import annotations

import json

import pytest
import torch

from threempose.config import config_from_dict
from threempose.nas.genotype import INPUT_NAMES, GenotypeError
from threempose.pnfs.cnf import (
    FabricArchitecture, FixedFabric, PyramidGenotype, PyramidLayout, SearchableFabric, full_genotype, input_rows,
)
from threempose.pnfs.model import PnfsArchitecture, PnfsNet, pruned_network
from threempose.pnfs.parts import part_groups

OPS = ["identity", "sep_conv", "zoom_conv"]


def tiny_cfg(**pnfs):
    """A PNFS config a CPU runs in milliseconds: 4 x 3 part fabrics of width 4, a 3-layer fabric backbone."""
    raw = {"model": {"rows": 4, "layers": 3, "channels": 4, "hidden": 1, "eels": [], "ops": OPS,
                     "sampling": "dense", "stem_blocks": 0},
           "pnfs": {"enabled": True, "num_parts": 3, "backbone": "fabric", "backbone_channels": 8,
                    "backbone_layers": 3, "backbone_hidden": 1,
                    "backbone_ops": ["identity", "sep_conv", "zoom_conv", "max_pool"],
                    "topdown": {"input_width": 48, "input_height": 64}, **pnfs}}
    return config_from_dict(raw)


def live(genotype):
    return {(c.layer, c.row) for c in genotype.cells if not c.pruned}


def n_params(net):
    arch = {id(t) for t in net.arch_parameters()}
    return sum(t.numel() for t in net.parameters() if id(t) not in arch)


# --------------------------------------------------------------------------- #
# Layouts
# --------------------------------------------------------------------------- #
def test_pyramid_layout_has_every_row_in_every_layer_and_copies_missing_neighbours():
    layout = PyramidLayout(4, 3)
    assert len(layout.cells) == 12
    assert [(c.layer, c.row) for c in layout.cells[:5]] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    top, bottom = layout.cells[4], layout.cells[7]            # layer 2, rows 0 and 3
    assert layout.source(top, "below") == (1, 1) and layout.source(top, "above") is None
    assert layout.resolve(top, "above") == "parallel" and layout.resolve(bottom, "below") == "parallel"
    assert layout.source(layout.cells[2], "below") == (0, 3)  # layer 1 reads the pyramid's 4 rows


def test_part_and_backbone_fabrics_keep_the_cells_the_paper_counts():
    # PNFS §IV-A: a subnetwork keeping the last 3 layers of a fabric has 6 cells (3 + 2 + 1 reach row 0).
    part = full_genotype("part", 4, 3, 1, 4, OPS)
    assert isinstance(part, PyramidGenotype)
    assert live(part) == {(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0)}
    assert input_rows(part) == [0, 1, 2, 3]
    # Table VIII: a backbone keeping 3 layers has 9 cells, one keeping 5 layers has 17.
    assert len(live(full_genotype("backbone", 4, 3, 2, 4, OPS))) == 9
    assert len(live(full_genotype("backbone", 4, 5, 1, 4, OPS))) == 17
    with pytest.raises(ValueError, match="at least 3 layers"):
        full_genotype("backbone", 4, 2, 1, 4, OPS)
    with pytest.raises(ValueError, match="distinct names"):
        full_genotype("part", 4, 3, 1, 4, ["identity", "atrous_conv"])


# --------------------------------------------------------------------------- #
# Architecture parameters: one set per part, alpha shared within a fabric
# --------------------------------------------------------------------------- #
def test_every_part_fabric_has_its_own_architecture_parameters():
    torch.manual_seed(0)
    net = PnfsNet(tiny_cfg())
    fabrics = net.searchable_fabrics()
    assert len(fabrics) == 1 + 3 and len(net.arch_parameters()) == 4 * 4
    ids = [{id(t) for t in f.arch_parameters()} for f in fabrics]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
    # A loss on part 0's vectors reaches part 0's (and the shared backbone's) alpha and beta only.
    x = torch.randn(2, 3, 64, 48)
    net(x).parts[0].square().sum().backward()
    part0, part1 = net.parts[0].fabric.arch, net.parts[1].fabric.arch
    assert part0.shared_alpha.grad.abs().sum() > 0 and part0.beta.grad.abs().sum() > 0
    assert net.backbone.fabric.arch.shared_alpha.grad.abs().sum() > 0
    assert part1.shared_alpha.grad is None and part1.beta.grad is None
    # One synchronous step on the whole loss moves each part's alpha differently.
    net.zero_grad()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    target = torch.rand(2, 17, 16, 12)
    ((net(x).scores - target) ** 2).sum().backward()
    opt.step()
    alphas = [f.arch.shared_alpha.detach() for f in fabrics[1:]]
    assert not torch.allclose(alphas[0], alphas[1]) and not torch.allclose(alphas[1], alphas[2])


def test_shared_alpha_is_one_parameter_per_fabric_and_per_cell_otherwise():
    shared = SearchableFabric("part", 4, 3, 1, 4, OPS, share_alpha=True)
    assert shared.arch.shared_alpha.shape == (1, 1, 3) and "alpha" not in dict(shared.arch.named_parameters())
    with torch.no_grad():
        shared.arch.shared_alpha[0, 0] = torch.tensor([0.0, 2.0, -1.0])
    weights = shared.normalised_weights().op_weights                          # [12, 1, 3]
    assert torch.allclose(weights, torch.tensor([0.0, 2.0, -1.0]).softmax(-1).expand(12, 1, 3))
    per_cell = SearchableFabric("part", 4, 3, 2, 4, OPS, share_alpha=False)
    assert per_cell.arch.alpha.shape == (12, 3, 3) and per_cell.arch.alpha is per_cell.arch_parameters()[0]


def test_the_samplers_run_and_derive_part_specific_genotypes():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    net = PnfsNet(cfg)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():     # part 0 prefers sep_conv and its parallel inputs, part 1 identity and below
        for k, (op, path) in enumerate([("sep_conv", "parallel"), ("identity", "below")]):
            arch = net.parts[k].fabric.arch
            arch.shared_alpha[..., OPS.index(op)] = 3.0
            arch.beta[:, INPUT_NAMES.index(path)] = 3.0
    net.sampling = "argmax"
    out = net(x)
    assert [tuple(p.shape) for p in out.parts] == [(2, 5, 8, 16, 12), (2, 6, 8, 16, 12), (2, 6, 8, 16, 12)]
    derived = net.architecture()
    assert all(a.weights is None for a in derived.parts)               # derived genotypes: ops summed
    g0, g1 = derived.parts[0].genotype, derived.parts[1].genotype
    assert live(g0) == {(1, 0), (2, 0), (3, 0)} and all(c.edges == [["sep_conv"]] for c in g0.cells if not c.pruned)
    assert live(g1) == {(1, 2), (2, 1), (3, 0)}                         # below, below, below
    assert all(c.edges == [["identity"]] and c.inputs == ["below"] for c in g1.cells if not c.pruned)
    net.sampling = "dyn_egs"
    a, b = net(x, tau=1.0, seed=7).scores, net(x, tau=1.0, seed=7).scores
    assert torch.equal(a, b)                                             # a seed fixes the draw
    with pytest.raises(ValueError, match="seed"):
        net(x, tau=1.0)


# --------------------------------------------------------------------------- #
# Pruning (PNFS §III-F)
# --------------------------------------------------------------------------- #
def _extreme_arch(net):
    """zoom_conv ~0 in every fabric; every part's last cell ignores its 'below' input, which
    kills cells (2, 1) and then (1, 2); a part's ops weigh softmax([0, 2]) = 0.12 / 0.88."""
    with torch.no_grad():
        for f in net.searchable_fabrics():
            f.arch.shared_alpha.zero_()
            f.arch.shared_alpha[..., f.ops.index("sep_conv")] = 2.0
            f.arch.shared_alpha[..., f.ops.index("zoom_conv")] = -40.0
            f.arch.beta.copy_(torch.randn(f.arch.beta.shape))
        for part in net.parts:
            last = part.fabric.genotype.layout.index(3, 0)
            part.fabric.arch.beta[last, INPUT_NAMES.index("below")] = -40.0
            part.head.conv.weight.normal_(std=0.2)      # vectors of length ~1: scores far from 0 and 1


def test_pruning_zero_weight_ops_and_cells_keeps_the_outputs():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    net = PnfsNet(cfg)
    _extreme_arch(net)
    for m in net.modules():                  # BatchNorm running statistics = the true averages
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(4, 3, 64, 48))
    net.eval()
    x = torch.randn(3, 3, 64, 48)
    dense = net(x)
    assert 0.1 < dense.scores.mean() < 0.9
    architecture = net.architecture(prune_threshold=1e-6)
    for part in architecture.parts:
        assert live(part.genotype) == {(1, 0), (1, 1), (2, 0), (3, 0)}
    pruned = pruned_network(net, cfg, architecture)
    names = [n for n, _ in pruned.named_modules()]
    assert not any("zoom_conv" in n for n in names) and any("sep_conv" in n for n in names)
    assert all(set(part.adapters) == {"0", "1", "2"} for part in pruned.parts)   # pyramid row 3 unused
    assert n_params(pruned) < 0.8 * n_params(net)
    # Kept weights are the dense softmax values, unchanged: e.g. a part's top cell's ops.
    top = architecture.parts[0].weights[architecture.parts[0].genotype.layout.index(3, 0)]
    assert top.edges[0] == pytest.approx(torch.tensor([0.0, 2.0]).softmax(0).tolist(), rel=1e-6)
    out = pruned(x)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(out.parts, dense.parts))
    assert torch.allclose(out.scores, dense.scores, atol=1e-5, rtol=0)
    # The comparison can fail: pruning weights that are not ~0 (identity at 0.12) changes the output.
    coarse = pruned_network(net, cfg, net.architecture(prune_threshold=0.2))
    assert (coarse(x).scores - dense.scores).abs().max() > 1e-2


@pytest.mark.parametrize("logits, kept", [({"zero": 2.0, "dil_conv": 2.0}, ["dil_conv"]),
                                          ({"zero": 2.0}, ["zero"])])
def test_pruning_drops_zero_ops_unless_alone_and_keeps_the_outputs(logits, kept):
    """PNFS' op set (zero, skip, dilated conv): a zero op that survives the threshold beside
    another op is dropped (it adds nothing); alone it stays, and the edge adds nothing."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.model.ops = ["identity", "zero", "dil_conv"]
    net = PnfsNet(cfg)
    with torch.no_grad():
        for part in net.parts:
            alpha = part.fabric.arch.shared_alpha
            alpha.fill_(-40.0)
            for op, value in logits.items():
                alpha[..., part.fabric.ops.index(op)] = value
    net.eval()
    x = torch.randn(2, 3, 64, 48)
    dense = net(x)
    architecture = net.architecture(prune_threshold=1e-6)
    for part in architecture.parts:
        assert {tuple(edge) for c in part.genotype.cells if not c.pruned for edge in c.edges} == {tuple(kept)}
    pruned = pruned_network(net, cfg, architecture)
    assert not any("zero" in n for n, _ in pruned.named_modules()) or kept == ["zero"]
    torch.testing.assert_close(pruned(x).scores, dense.scores, atol=1e-5, rtol=0)


def test_prune_threshold_must_leave_every_edge_an_op():
    fabric = SearchableFabric("part", 4, 3, 1, 4, OPS)
    with pytest.raises(ValueError, match="threshold"):
        fabric.prune(0.34)


# --------------------------------------------------------------------------- #
# Architecture files
# --------------------------------------------------------------------------- #
def test_architecture_json_round_trip_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(1)
    cfg = tiny_cfg()
    net = PnfsNet(cfg)
    _extreme_arch(net)
    net.eval()
    architecture = net.architecture(prune_threshold=1e-6)
    path = architecture.save(tmp_path / "architecture.json")
    loaded = PnfsArchitecture.load(path)
    assert loaded.to_dict() == architecture.to_dict()
    assert isinstance(loaded.parts[0].genotype, PyramidGenotype)
    assert json.loads(path.read_text())["part_joints"] == part_groups(3)
    a, b = pruned_network(net, cfg, architecture), pruned_network(net, cfg, loaded)
    x = torch.randn(2, 3, 64, 48)
    assert torch.equal(a(x).scores, b(x).scores)


def test_architecture_files_are_validated(tmp_path):
    fabric = FixedFabric(FabricArchitecture(full_genotype("part", 4, 3, 1, 4, OPS)))
    raw = fabric.architecture.to_dict()
    raw["weights"] = [{"index": 0, "paths": [1.0], "edges": [[0.5, 0.5, 0.0]]}]
    with pytest.raises(GenotypeError, match="weights are given for cells"):
        FabricArchitecture.from_dict(raw, "A.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "threempose.pnfs-architecture/1", "num_parts": 3, "parts": []}))
    with pytest.raises(GenotypeError, match="P=3 needs 3 part architectures"):
        PnfsArchitecture.load(bad)
    with pytest.raises(GenotypeError, match="not found"):
        PnfsArchitecture.load(tmp_path / "missing.json")
