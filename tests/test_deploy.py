"""optimize_for_inference: exact BatchNorm folding, and optimized networks (folded, channels-last,
oneDNN-fused) giving the eager network's outputs at every exit, for the thesis genotype, random
genotypes and HigherHRNet-W32, while staying the same class with lazy exits; the Predictor and
``threempose.infer`` run it by default and give the unoptimized network's people.

Tolerance: float32 on the CPU, every output within ``TOL * max(1, max |eager output|)`` (max abs).
Folding and fusion only reorder float arithmetic. Measured (torch 2.13 CPU, oneDNN, 1 thread):
at most 3.6e-7 relative for the thesis genotype, random genotypes and a single block; 5.2e-6
for HigherHRNet-W32 (deeper, wider sums). Bounds ~30x and ~20x those: TOL and HRNET_TOL.
"""
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from threempose.inference import predictor as predictor_module
from threempose.config import ModelConfig
from threempose.inference import deploy
from threempose.inference.deploy import (PrecisionWarning, cpu_bf16_missing, fold_batchnorm, optimize_for_inference,
                                         output_tensors)
from threempose.inference.onednn_fusion import PackedConv2d
from threempose.infer import main as infer_main
from threempose.nas.model_file import save_model_file
from threempose.models.higherhrnet import HigherHRNet
from threempose.nas.derived import DerivedNet
from threempose.nas.supernet import Supernet
from threempose.nas.genotype import Genotype
from threempose.inference.predictor import Predictor

from test_predictor import loud_heads, random_image, tiny_infer, tiny_net

THESIS = Path(__file__).resolve().parents[1] / "configs" / "genotypes" / "3m-pose-thesis.json"
TOL = 1e-5           # measured <= 3.6e-7 (derived networks, blocks)
HRNET_TOL = 1e-4     # measured 5.2e-6 (HigherHRNet-W32)
onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def random_bn_stats_(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (fresh ones are the
    identity map, which would make folding trivially right); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return net.eval()


def assert_same_outputs(expected, got, tol: float = TOL) -> None:
    expected, got = output_tensors(expected), output_tensors(got)
    assert len(expected) == len(got)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert e.shape == g.shape, i
        scale = max(1.0, e.abs().max().item())
        err = (e - g).abs().max().item() / scale
        assert err <= tol, f"output {i}: relative error {err:.3g} > {tol:g}"


# --------------------------------------------------------------------------- #
# fold_batchnorm
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 8, 3, padding=1, bias=False),
    nn.Conv2d(6, 8, 1, stride=2, bias=True),
    nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),     # depthwise
    nn.ConvTranspose2d(6, 8, 4, stride=2, padding=1, bias=False),
], ids=["3x3", "1x1-stride2-bias", "depthwise", "transposed"])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_batchnorm_equals_conv_then_bn_in_eval(conv, affine):
    torch.manual_seed(0)
    bn = random_bn_stats_(nn.BatchNorm2d(conv.out_channels, affine=affine, eps=1e-3))
    if conv.bias is not None:
        nn.init.normal_(conv.bias)
    x = torch.randn(2, 6, 9, 11)
    with torch.no_grad():
        expected = bn(conv(x))
        fold_batchnorm(conv, bn)
        got = conv(x)
    assert conv.bias is not None
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)     # measured <= 9.5e-7


def test_fold_batchnorm_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="BatchNorm2d\\(4\\)"):
        fold_batchnorm(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(4))


# --------------------------------------------------------------------------- #
# optimized networks == eager networks
# --------------------------------------------------------------------------- #
FUSE = [pytest.param(True, marks=onednn, id="fused"), pytest.param(False, id="folded")]


@pytest.fixture(scope="module")
def thesis_net() -> DerivedNet:
    torch.manual_seed(0)
    return random_bn_stats_(DerivedNet(Genotype.load(THESIS)))


@pytest.mark.parametrize("fuse", FUSE)
def test_thesis_network_every_exit_matches_eager(thesis_net, fuse):
    fast = optimize_for_inference(thesis_net, input_size=(64, 96), fuse=fuse)
    assert type(fast) is DerivedNet and fast is not thesis_net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in thesis_net.modules())   # the original is kept
    assert any(isinstance(m, PackedConv2d) for m in fast.modules()) == fuse
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected, got = thesis_net(x), fast(x)
        assert [e.layer for e in got] == [4, 7, 10]
        assert_same_outputs(expected, got)
        # another size and batch than the one it was optimized for
        assert_same_outputs(thesis_net(x[:1, :, :45, :70]), fast(x[:1, :, :45, :70]))
        assert_same_outputs(expected, copy.deepcopy(fast)(x))       # copies repack their weights


@onednn
def test_optimized_exits_stay_lazy(thesis_net):
    fast = optimize_for_inference(thesis_net, input_size=(32, 32))
    called = []
    hooks = [c.register_forward_hook(lambda *_, k=k: called.append(int(k))) for k, c in fast.cells.items()]
    with torch.no_grad():
        first = next(fast.iter_exits(torch.randn(1, 3, 32, 32)))
    for h in hooks:
        h.remove()
    assert first.layer == 4
    assert called and max(fast.genotype.cells[k].layer for k in called) == 4


@pytest.mark.parametrize("seed", [3, 11, 29])
@pytest.mark.parametrize("fuse", FUSE)
def test_random_genotypes_match_eager(seed, fuse):
    torch.manual_seed(seed)
    cfg = ModelConfig(rows=3, layers=4, channels=8, eels=[2, 3], stem_blocks=1)
    genotype = Supernet(cfg)(torch.randn(2, 3, 32, 32), tau=1.0, seed=seed).genotype
    net = random_bn_stats_(DerivedNet(genotype, stem_blocks=1), seed)
    fast = optimize_for_inference(net, input_size=(48, 40), fuse=fuse)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert_same_outputs(net(x), fast(x))


@pytest.mark.parametrize("fuse", FUSE)
def test_higherhrnet_matches_eager(fuse):
    torch.manual_seed(0)
    net = HigherHRNet(width=8, num_joints=17, deconv_blocks=1)
    for m in net.modules():          # the official N(0, 0.001) init makes every output ~0
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight)
    random_bn_stats_(net)
    fast = optimize_for_inference(net, input_size=(64, 64), fuse=fuse)
    assert type(fast) is HigherHRNet
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = net(x)
        assert expected[0].abs().max() > 0.1
        assert_same_outputs(expected, fast(x))


class ReadsRawConv(nn.Module):
    """``bn(conv(x)) + conv(x)``: the raw conv output is used besides its BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_network_folding_does_not_fit_is_refused():
    net = random_bn_stats_(ReadsRawConv())
    with pytest.raises(RuntimeError, match="output 0 differs"):
        optimize_for_inference(net, input_size=(16, 16))


@onednn
def test_a_block_is_optimized_on_its_own_feature_map_inputs():
    """A Fuse block of the thesis fabric takes a list of feature maps and a size: optimized on
    example inputs (channels-last, as they arrive between optimized blocks), it folds its
    BatchNorms, packs its convs, adds no input conversion and gives the original's outputs."""
    net = random_bn_stats_(Supernet(ModelConfig(rows=3, layers=4, channels=8, eels=[2], stem_blocks=1)))
    fuse = net.exits["4"].fuse
    xs = [torch.randn(1, 8 * 2 ** r, 32 // 2 ** r, 32 // 2 ** r).contiguous(memory_format=torch.channels_last)
          for r in range(3)]
    fast = optimize_for_inference(fuse, input_size=(32, 32), example_inputs=(xs, (32, 32)))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, PackedConv2d) for m in fast.modules())
    assert not any(m._forward_pre_hooks for m in fast.modules())
    with torch.no_grad():
        expected, got = fuse(xs, (32, 32)), fast(xs, (32, 32))
    assert_same_outputs(expected, got)
    assert got.is_contiguous(memory_format=torch.channels_last)   # passed on channels-last
    pool = optimize_for_inference(nn.MaxPool2d(3, 1, 1), input_size=(32, 32), example_inputs=(xs[0],))
    assert torch.equal(pool(xs[0]), nn.functional.max_pool2d(xs[0], 3, 1, 1))   # no parameters: fine


def test_a_block_folding_does_not_fit_is_refused_on_its_example_inputs():
    net = random_bn_stats_(ReadsRawConv())
    with pytest.raises(RuntimeError, match="output 0 differs"):
        optimize_for_inference(net, input_size=(16, 16), example_inputs=(torch.randn(1, 3, 16, 16),))


def test_half_precision_off_cuda_is_refused(thesis_net):
    with pytest.raises(ValueError, match="float16 is for CUDA"):
        optimize_for_inference(thesis_net, input_size=(32, 32), dtype=torch.float16)


# --------------------------------------------------------------------------- #
# bfloat16 on the CPU
# --------------------------------------------------------------------------- #
BF16_TOL = 0.05     # the bound: heatmaps within 5% of their scale
native_bf16 = pytest.mark.skipif(cpu_bf16_missing() is not None, reason=f"no native bf16: {cpu_bf16_missing()}")


@native_bf16
@pytest.mark.parametrize("fuse", FUSE)
def test_bf16_on_the_cpu_runs_bf16_convs_and_returns_float32_close_to_eager(thesis_net, fuse):
    fast = optimize_for_inference(thesis_net, input_size=(64, 96), dtype=torch.bfloat16, fuse=fuse)
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    heads = {id(m) for m in fast.heads.modules()}
    fuse_blocks = {id(m) for b in fast.exits.values() for part in (b.fuse, b.fuse_skip) if part is not None
                   for m in part.modules()}
    float32 = heads | fuse_blocks                   # heatmaps and tags, and the features they are made of
    assert convs and all(c.weight.dtype == (torch.float32 if id(c) in float32 else torch.bfloat16) for c in convs)
    assert len(heads & {id(c) for c in convs}) == len(fast.heads)
    assert fuse_blocks & {id(c) for c in convs} and any(c.weight.dtype == torch.bfloat16 for c in convs
                                                         if id(c) not in float32)
    assert all(isinstance(c, PackedConv2d) for c in convs) == fuse
    x = torch.randn(2, 3, 64, 96)
    eel = str(fast.genotype.eels[0])
    after_eel = next(str(c.index) for c in fast.genotype.cells if c.layer == int(eel) + 1)
    with torch.no_grad():
        expected, got = output_tensors(thesis_net(x)), output_tensors(fast(x))
        seen = {}
        for name, m in [("first cell", fast.cells[next(iter(fast.cells))]), ("fuse", fast.exits[eel].fuse),
                        ("split", fast.exits[eel].split), ("cell after the EEL", fast.cells[after_eel])]:
            m.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o))
        fast(x[:1])
    seen["split"] = next(iter(seen["split"].values()))
    assert {k: v.dtype for k, v in seen.items()} == {      # features between exits stay bf16
        "first cell": torch.bfloat16, "fuse": torch.float32, "split": torch.bfloat16,
        "cell after the EEL": torch.bfloat16}
    assert len(expected) == len(got) == 6
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g.dtype == torch.float32, i                       # exits read float32 maps
        err = (e - g).abs().max().item() / e.abs().max().item()
        assert 0 < err <= BF16_TOL, (i, err)                     # rounded, but within 5% of scale


@native_bf16
def test_bf16_block_takes_and_passes_on_bf16_features():
    net = random_bn_stats_(Supernet(ModelConfig(rows=3, layers=4, channels=8, eels=[2], stem_blocks=1)))
    fuse = net.exits["4"].fuse
    xs = [torch.randn(1, 8 * 2 ** r, 32 // 2 ** r, 32 // 2 ** r).contiguous(memory_format=torch.channels_last)
          for r in range(3)]
    fast = optimize_for_inference(fuse, input_size=(32, 32), example_inputs=(xs, (32, 32)), dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = fuse(xs, (32, 32)), fast([x.bfloat16() for x in xs], (32, 32))
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert (got.float() - expected).abs().max() <= BF16_TOL * expected.abs().max()


def test_bf16_without_native_support_warns_and_serves_float32(thesis_net, monkeypatch):
    monkeypatch.setattr(deploy, "cpu_bf16_missing", lambda: "the CPU's bf16 instructions (avx512_bf16)")
    with pytest.warns(PrecisionWarning, match="avx512_bf16.*float32 form"):
        fast = optimize_for_inference(thesis_net, input_size=(32, 32), dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_same_outputs(thesis_net(x), fast(x))


def test_cpu_bf16_missing_names_the_missing_instructions(monkeypatch):
    monkeypatch.setattr(deploy, "cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(deploy.platform, "machine", lambda: "x86_64")
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert "avx512_bf16 or amx_bf16" in cpu_bf16_missing()
    monkeypatch.setattr(deploy, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert cpu_bf16_missing() is None
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert "oneDNN" in cpu_bf16_missing()


# --------------------------------------------------------------------------- #
# Predictor and threempose.infer run the optimized network by default
# --------------------------------------------------------------------------- #
def same_predictions(a, b, atol=1e-5) -> None:
    """Same exits, EEL scores and people (keypoints in pixels and scores within ``atol``;
    measured: keypoints 1.2e-7 px, person scores 1.1e-8, EEL confidences 2.8e-7)."""
    assert a.exit == b.exit and a.gflops == b.gflops and a.input_size == b.input_size
    assert a.scores.keys() == b.scores.keys()
    for layer, s in a.scores.items():
        assert s.detected == b.scores[layer].detected
        assert s.confidence == pytest.approx(b.scores[layer].confidence, abs=1e-5)
    assert len(a.people) == len(b.people)
    for p, q in zip(a.people, b.people):
        np.testing.assert_allclose(p.keypoints, q.keypoints, atol=atol)
        assert p.score == pytest.approx(q.score, abs=atol)


@pytest.mark.parametrize("exit", ["final", "dynamic"])
def test_predictor_optimized_equals_unoptimized(exit):
    net = loud_heads(random_bn_stats_(tiny_net()))
    images = [random_image(64, 80, 1), random_image(70, 64, 2), random_image(64, 84, 3)]
    cfg = tiny_infer(exit=exit)
    fast, plain = Predictor(net, cfg), Predictor(net, cfg, optimize=False)
    assert fast.net is not net and plain.net is net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.net.modules())
    got, expected = fast.predict_batch(images), plain.predict_batch(images)
    assert sum(len(p.people) for p in expected) > 0
    for g, e in zip(got, expected):
        same_predictions(g, e)


def test_infer_optimizes_unless_told_not_to(tmp_path, monkeypatch):
    model = tmp_path / "model.pt"
    save_model_file(model, loud_heads(random_bn_stats_(tiny_net())), dataclasses.asdict(tiny_infer()))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(random_image(64, 80, i)).save(folder / f"{i + 1}.png")
    # one thread whatever the machine: with two (OMP_NUM_THREADS=2 here, or the project's own choice
    # on 4+ cores) the fused convs sum in another order and a near-tied joint of this random
    # network moved 16 px
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    optimized = []
    real = predictor_module.optimize_for_inference
    monkeypatch.setattr(predictor_module, "optimize_for_inference",
                        lambda *a, **k: optimized.append(1) or real(*a, **k))
    results = {}
    for flag in ([], ["--no-optimize"]):
        out = tmp_path / f"results{len(flag)}.json"
        assert infer_main(["--checkpoint", str(model), "--images", str(folder), "--out", str(out),
                           "--no-progress", *flag]) == 0
        results[bool(flag)] = json.loads(out.read_text())
    assert optimized == [1]                               # once: the default run, not --no-optimize
    fast, plain = results[False], results[True]
    assert len(fast) == len(plain) > 0
    for f, p in zip(fast, plain):
        assert f["image_id"] == p["image_id"]
        np.testing.assert_allclose(f["keypoints"], p["keypoints"], atol=1e-5)   # measured 1.2e-7 px
        assert f["score"] == pytest.approx(p["score"], abs=1e-6)                # measured 1.1e-8
