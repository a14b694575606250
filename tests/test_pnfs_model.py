"""The PNFS network: shapes for every part mode, the HRNet backbone (PNFS' "HRNet-W32 stem~stage3",
8.1 M), model files, params/GFLOPs per crop, config checks and the main commands' dispatch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from threempose.config import ConfigError, config_from_dict, load_config
from threempose.engine.checkpoint import CheckpointError, StateDictMismatchError, save_checkpoint
from threempose.training.search_optim import multistep
from threempose.util.flops import measure_gflops
from threempose.models.higherhrnet import HigherHRNet
from threempose.pnfs.backbone import HRNetBackbone, MobileNetV2Backbone, ResNet50Backbone
from threempose.pnfs.dispatch import pnfs_main, pnfs_requested
from threempose.pnfs.model import (
    PnfsNet, check_pnfs_config, is_pnfs_model_file, load_pnfs_model, profile_pnfs, pruned_network, save_pnfs_model,
)
from threempose.pnfs.parts import part_groups, parts_per_joint

from test_nas_supernet import random_weights_
from test_pnfs_cnf import tiny_cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def assert_is_the_composition(net: PnfsNet, x: torch.Tensor) -> None:
    """``net(x)`` is its backbone, then each part on the backbone's pyramid, then the scores of
    PNFS Eq. 5 and 6 written out here: joint j's score sums ``|v|^2 / (1 + |v|^2)`` over the
    parts p holding it (``v = parts[p][:, part_groups(P)[p].index(j)]``). Measured: bit-identical
    parts and scores; bound 1e-6."""
    with torch.no_grad():
        out = net(x)
        pyramid = net.backbone(x)
        parts = [part(pyramid) for part in net.parts]
    for got, want in zip(out.parts, parts):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    expected = torch.zeros_like(out.scores)
    for p, joints in enumerate(part_groups(net.num_parts)):
        squared = (parts[p] ** 2).sum(dim=2)                                 # [B, J_p, h, w]
        for i, j in enumerate(joints):
            expected[:, j] += squared[:, i] / (1 + squared[:, i])
    assert expected.max() > 0.05                                             # not all-zero maps
    torch.testing.assert_close(out.scores, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_parts", [1, 3, 5, 8])
def test_part_outputs_and_merged_scores_have_the_paper_shapes_and_values(num_parts):
    torch.manual_seed(0)
    net = PnfsNet(tiny_cfg(num_parts=num_parts, topdown={"input_width": 48, "input_height": 64, "vector_dim": 4}))
    x = torch.randn(2, 3, 64, 48)
    out = net(x)
    assert [tuple(p.shape) for p in out.parts] == [(2, len(g), 4, 16, 12) for g in part_groups(num_parts)]
    assert out.scores.shape == (2, 17, 16, 12)
    assert_is_the_composition(random_weights_(net).eval(), x)
    # Each joint's score sums the squashed lengths (each in [0, 1)) of the parts that hold it.
    bound = torch.tensor(parts_per_joint(num_parts), dtype=torch.float32)[None, :, None, None]
    assert ((out.scores >= 0) & (out.scores < bound)).all()


def test_hrnet_backbone_pyramid_and_the_papers_parameter_count():
    backbone = HRNetBackbone(width=8)
    rows = backbone(torch.randn(2, 3, 64, 48))
    assert [tuple(r.shape) for r in rows] == [(2, 8, 16, 12), (2, 16, 8, 6), (2, 32, 4, 3), (2, 64, 2, 2)]
    with pytest.raises(ValueError, match="multiples of 16"):
        backbone(torch.randn(1, 3, 72, 48))
    # PNFS Tables VI, VII: "HRNet-W32-Stem~stage3 (8.1M)".
    assert sum(t.numel() for t in HRNetBackbone(width=32).parameters()) == 8_128_320


def test_hrnet_backbone_loads_the_stem_to_stage3_of_a_higherhrnet_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = HigherHRNet(width=8)
    path = tmp_path / "higherhrnet_w8.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    backbone = HRNetBackbone(width=8)
    backbone.load_pretrained(path)
    mine, theirs = backbone.state_dict(), source.state_dict()
    assert mine.keys() <= theirs.keys() and not any(k.startswith("stage4") for k in mine)
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    torch.save(HigherHRNet(width=4).state_dict(), tmp_path / "w4.pth")
    with pytest.raises(StateDictMismatchError, match="shape mismatches"):
        backbone.load_pretrained(tmp_path / "w4.pth")
    with pytest.raises(FileNotFoundError, match="backbone checkpoint not found"):
        backbone.load_pretrained(tmp_path / "missing.pth")


TORCHVISION_MOBILENET_V2 = Path(__file__).resolve().parent / "data" / "torchvision_mobilenet_v2_parameters.txt"


def torchvision_mobilenet_v2_listing() -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of torchvision's ``mobilenet_v2()`` parameters, from the text fixture."""
    rows = []
    for line in TORCHVISION_MOBILENET_V2.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            rows.append((name, tuple(int(d) for d in shape.split(","))))
    return rows


def test_mobilenet_v2_backbone_has_torchvisions_keys_and_shapes_up_to_block_16():
    listing = torchvision_mobilenet_v2_listing()
    assert len(listing) == 158 and sum(math.prod(s) for _, s in listing) == 3_504_872   # torchvision's 3.50 M
    kept = [(n, s) for n, s in listing if n.startswith("features.") and int(n.split(".")[1]) <= 16]
    backbone = MobileNetV2Backbone()
    assert [(n, tuple(t.shape)) for n, t in backbone.named_parameters()] == kept
    bn = [n[: -len(".weight")] for n, s in kept if n.endswith(".weight") and len(s) == 1]
    buffers = {n for n, _ in backbone.named_buffers()}
    assert buffers == {f"{m}.{b}" for m in bn for b in ("running_mean", "running_var", "num_batches_tracked")}
    # PNFS Tables II-V, VII: "MobileNet-V2 (1.3M)"
    assert round(sum(t.numel() for t in backbone.parameters()) / 1e6, 1) == 1.3
    rows = backbone.eval()(torch.randn(2, 3, 64, 48))
    assert [tuple(r.shape) for r in rows] == [(2, 24, 16, 12), (2, 32, 8, 6), (2, 96, 4, 3), (2, 160, 2, 2)]


def test_mobilenet_v2_backbone_loads_a_torchvision_state_dict(tmp_path):
    """A state_dict with torchvision's every key (classifier and blocks 17-18 included) loads;
    the values land under the same names; a missing backbone key is a clear error."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in torchvision_mobilenet_v2_listing():
        state[name] = torch.randn(shape, generator=gen)
        if name.endswith(".weight") and len(shape) == 1:          # a BatchNorm: its buffers too
            module = name[: -len(".weight")]
            state[f"{module}.running_mean"] = torch.randn(shape, generator=gen)
            state[f"{module}.running_var"] = torch.rand(shape, generator=gen) + 0.5
            state[f"{module}.num_batches_tracked"] = torch.tensor(7)
    torch.save(state, tmp_path / "mobilenet_v2.pth")
    backbone = MobileNetV2Backbone()
    backbone.load_pretrained(tmp_path / "mobilenet_v2.pth")
    mine = backbone.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in mine.items())
    del state["features.16.conv.2.weight"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(StateDictMismatchError, match="features.16.conv.2.weight"):
        backbone.load_pretrained(tmp_path / "cut.pth")


def test_mobilenet_v2_backbone_network_end_to_end(tmp_path):
    torch.manual_seed(0)
    net = PnfsNet(tiny_cfg(backbone="mobilenet_v2"))
    assert len(net.searchable_fabrics()) == 3 and net.backbone.widths == [24, 32, 96, 160]
    assert net(torch.randn(2, 3, 64, 48)).scores.shape == (2, 17, 16, 12)
    assert_is_the_composition(random_weights_(net).eval(), torch.randn(2, 3, 64, 48))
    torch.save(MobileNetV2Backbone().state_dict(), tmp_path / "imagenet.pth")
    loaded = PnfsNet(tiny_cfg(backbone="mobilenet_v2", backbone_checkpoint=str(tmp_path / "imagenet.pth")))
    saved = torch.load(tmp_path / "imagenet.pth")
    assert all(torch.equal(v, saved[k]) for k, v in loaded.backbone.state_dict().items())


def test_hrnet_backbone_network_end_to_end():
    torch.manual_seed(0)
    net = PnfsNet(tiny_cfg(backbone="hrnet", backbone_channels=8))
    assert len(net.searchable_fabrics()) == 3 and net.backbone.widths == [8, 16, 32, 64]
    assert net(torch.randn(2, 3, 64, 48)).scores.shape == (2, 17, 16, 12)
    assert_is_the_composition(random_weights_(net).eval(), torch.randn(2, 3, 64, 48))


def test_model_file_round_trip_and_profile(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    net = PnfsNet(cfg).eval()
    fixed = pruned_network(net, cfg, net.architecture())
    path = save_pnfs_model(tmp_path / "model.pt", fixed, cfg)
    loaded, loaded_cfg = load_pnfs_model(path)
    x = torch.randn(2, 3, 64, 48)
    assert torch.equal(loaded(x).scores, fixed(x).scores) and torch.equal(fixed(x).scores, net(x).scores)
    assert loaded_cfg.pnfs == cfg.pnfs and is_pnfs_model_file(path)
    with pytest.raises(ValueError, match="search space"):
        save_pnfs_model(tmp_path / "search.pt", net, cfg)
    save_checkpoint(tmp_path / "other.pt", {"kind": "model"})
    assert not is_pnfs_model_file(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a PNFS model"):
        load_pnfs_model(tmp_path / "other.pt")
    # Params and GFLOPs per crop: the parts add up to the whole, which FlopCounterMode counts.
    report = profile_pnfs(fixed, (64, 48))
    whole = measure_gflops(lambda: fixed(torch.zeros(1, 3, 64, 48)))
    assert report["gflops"] == pytest.approx(whole, rel=1e-9)
    assert report["params_m"] * 1e6 == pytest.approx(sum(t.numel() for t in fixed.parameters()))
    assert [p["cells"] for p in report["parts"]] == [6, 6, 6]
    search = profile_pnfs(net, (64, 48))                     # arch parameters are not counted
    assert search["params_m"] == pytest.approx(report["params_m"]) and search["gflops"] == pytest.approx(whole)


def test_pnfs_config_is_typed_and_checked(tmp_path):
    assert load_config(CONFIGS / "search-small.json").pnfs.enabled is False
    for name in ("pnfs-small", "pnfs-coco"):
        cfg = load_config(CONFIGS / f"{name}.json")
        check_pnfs_config(cfg)
        assert cfg.pnfs.enabled
    coco = load_config(CONFIGS / "pnfs-coco.json")     # PNFS Table VII ours-3: P=5, H=1, C=16 (row 0: 4C), 384x288
    assert (coco.pnfs.num_parts, coco.model.hidden, coco.model.channels, coco.pnfs.backbone) == (5, 1, 64, "hrnet")
    assert (coco.pnfs.topdown.input_height, coco.pnfs.topdown.input_width, coco.pnfs.topdown.vector_dim) == (384, 288, 8)
    # §VI-b: O = zero, skip, 3x3 separable conv, 3x3 dilated conv (rate 2); synchronous search, 200
    # epochs; Adam 1e-3 for the weights x0.25 at 90/120/150 (§IV-A) and, for ours-3, no decay of the
    # architecture rate.
    assert sorted(coco.model.ops) == sorted(["zero", "identity", "sep_conv", "dil_conv"])
    assert (coco.search.strategy, coco.search.epochs, coco.search.weight_lr, coco.search.arch_lr) == (
        "synchronous", 200, 1e-3, 1e-3)
    weight_lr = [multistep(coco.search.weight_lr, coco.pnfs.weight_lr_milestones, coco.pnfs.weight_lr_gamma, e)
                 for e in (89, 90, 119, 120, 150, 199)]
    assert weight_lr == pytest.approx([1e-3, 2.5e-4, 2.5e-4, 6.25e-5, 1.5625e-5, 1.5625e-5])
    assert {multistep(coco.search.arch_lr, coco.search.arch_lr_milestones, coco.search.arch_lr_gamma, e)
            for e in range(200)} == {1e-3}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"extends": str(CONFIGS / "pnfs-small.json"), "pnfs": {"topdown": {"crop_width": 10}}}))
    with pytest.raises(ConfigError, match="pnfs.topdown.crop_width"):
        load_config(bad)
    for pnfs, model, message in (({"num_parts": 4}, {}, "num_parts"), ({}, {"eels": [1]}, "model.eels"),
                                 ({"enabled": False}, {}, "not a PNFS config"),
                                 ({"backbone": "hrnet"}, {"rows": 3}, "model.rows must be 4")):
        raw = {"model": {"rows": 4, "layers": 3, "eels": [], **model}, "pnfs": {"enabled": True, **pnfs}}
        with pytest.raises(ConfigError, match=message):
            check_pnfs_config(config_from_dict(raw, "x.json"))


def test_main_commands_dispatch_pnfs_configs_and_model_files(tmp_path):
    assert pnfs_requested("search", ["--config", str(CONFIGS / "pnfs-small.json")])
    assert not pnfs_requested("search", ["--config", str(CONFIGS / "search-small.json")])
    assert not pnfs_requested("train", ["--config", "missing.json", "--genotype", "G.json"])
    assert pnfs_main("profile", ["--config", str(CONFIGS / "search-small.json")]) is None
    cfg = tiny_cfg()
    net = PnfsNet(cfg)
    model = save_pnfs_model(tmp_path / "model.pt", pruned_network(net, cfg, net.architecture()), cfg)
    assert pnfs_requested("infer", ["--checkpoint", str(model), "--images", "x"])
    assert not pnfs_requested("infer", ["--checkpoint", str(tmp_path / "missing.pt")])
    with pytest.raises(ValueError, match="unknown command"):
        pnfs_requested("evaluate", [])


def test_resnet50_backbone_is_torchvisions_stem_to_layer4():
    """torchvision's resnet50 has 25,557,032 parameters in 161 tensors; without ``fc`` (2048 x 1000
    + 1000) that is 23,508,032 in 159, PNFS Table VII's "ResNet-50 (23.5M)". v1.5 layout: the
    stride sits on each first block's 3x3 conv; torchvision's key names."""
    backbone = ResNet50Backbone()
    params = dict(backbone.named_parameters())
    assert len(params) == 159 and sum(t.numel() for t in params.values()) == 25_557_032 - 2048 * 1000 - 1000
    shapes = {"conv1.weight": (64, 3, 7, 7), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
              "layer2.0.conv2.weight": (128, 128, 3, 3), "layer3.5.bn3.bias": (1024,),
              "layer4.2.conv3.weight": (2048, 512, 1, 1)}
    assert {k: tuple(params[k].shape) for k in shapes} == shapes
    assert backbone.layer2[0].conv2.stride == (2, 2) and backbone.layer2[0].conv1.stride == (1, 1)
    rows = backbone.eval()(torch.randn(1, 3, 64, 48))
    assert [tuple(r.shape) for r in rows] == [(1, 256, 16, 12), (1, 512, 8, 6), (1, 1024, 4, 3), (1, 2048, 2, 2)]


def test_resnet50_backbone_loads_a_torchvision_state_dict_and_is_selectable(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in ResNet50Backbone().state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)   # ignored
    torch.save(state, tmp_path / "resnet50.pth")
    net = PnfsNet(tiny_cfg(backbone="resnet50", backbone_checkpoint=str(tmp_path / "resnet50.pth")))
    assert isinstance(net.backbone, ResNet50Backbone) and net.backbone.widths == [256, 512, 1024, 2048]
    assert all(torch.equal(v, state[k]) for k, v in net.backbone.state_dict().items())
    assert net(torch.randn(1, 3, 64, 48)).scores.shape == (1, 17, 16, 12)
    del state["layer4.2.bn3.weight"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(StateDictMismatchError, match="layer4.2.bn3.weight"):
        net.backbone.load_pretrained(tmp_path / "cut.pth")


def test_a_derived_part_that_reads_no_row_0_input_runs():
    """A dyn_egs derivation may leave every layer-1 cell of a part without a row-0 input; the
    part then has no row-0 adapter and still runs at row 0's size."""
    from dataclasses import replace
    from threempose.pnfs.cnf import FabricArchitecture
    from threempose.pnfs.model import PnfsArchitecture
    cfg = tiny_cfg()
    derived = [FabricArchitecture(a.genotype) for a in PnfsNet(cfg).architecture().parts]
    g = derived[0].genotype
    inputs = {0: ["below"], 1: ["parallel", "below"], 2: ["parallel", "below"], 3: ["parallel"]}
    cells = [replace(c, inputs=inputs[c.row]) if c.layer == 1 and not c.pruned else c for c in g.cells]
    derived[0] = FabricArchitecture(replace(g, cells=cells).prune())
    net = PnfsNet(cfg, PnfsArchitecture(3, PnfsNet(cfg).architecture().backbone, derived)).eval()
    assert "0" not in net.parts[0].adapters
    assert net(torch.randn(2, 3, 64, 48)).scores.shape == (2, 17, 16, 12)
