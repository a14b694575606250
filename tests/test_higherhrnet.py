"""HigherHRNet-W32 teacher: official checkpoint layout, forward shapes, features, loading."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from threempose.config import TeacherConfig
from threempose.util.flops import count_params, model_gflops
from threempose.models.higherhrnet import (
    CheckpointError,
    HigherHRNet,
    StateDictMismatchError,
    higherhrnet_w32,
    load_weights,
    load_teacher,
    unwrap_state_dict,
)
from threempose.models.hrnet_blocks import HighResolutionModule

REFERENCE = Path(__file__).parent / "data" / "higherhrnet_w32_512_state_dict.txt"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """The official pose_higher_hrnet_w32_512.pth keys and shapes ("key<TAB>[d0, d1, ...]")."""
    out = {}
    for line in REFERENCE.read_text().splitlines():
        key, shape = line.split("\t")
        dims = shape.strip("[]").strip()
        out[key] = tuple(int(d) for d in dims.split(",")) if dims else ()
    return out


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BN statistic a distinct O(1)-scale random value
    (the official init makes outputs ~0, which would hide loading bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 4:  # conv weights, variance-preserving scale
                fan_in = t.shape[0] * 4 if name.startswith("deconv_layers.0.0.0") else t[0].numel()
                t.copy_(noise / math.sqrt(fan_in))
            elif name.endswith(".weight"):  # BN scale
                t.copy_(0.5 + 0.1 * noise)
            else:  # BN shift and mean, conv biases
                t.copy_(0.1 * noise)
    return model


@pytest.fixture(scope="module")
def model() -> HigherHRNet:
    return randomize_(higherhrnet_w32()).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "raw.pth"
    torch.save(model.state_dict(), path)
    return path


# --------------------------------------------------------------------------- #
# Layout
# --------------------------------------------------------------------------- #
def test_state_dict_keys_and_shapes_match_official_checkpoint():
    ref = reference_shapes()
    assert len(ref) == 1810
    ours = {k: tuple(v.shape) for k, v in higherhrnet_w32().state_dict().items()}
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: s for k, s in ours.items() if ref[k] != s} == {}


def test_parameter_count_matches_reference():
    ref_params = sum(math.prod(s) for k, s in reference_shapes().items()
                     if not k.endswith(BUFFER_SUFFIXES))
    assert ref_params == 28_645_331
    assert count_params(higherhrnet_w32()) == 28_645_331


def test_gflops_scale_to_the_codes_own_count_at_512(model):
    """46.2 G is this code's own count, not the paper's: torch's FlopCounterMode counts 92.4 G
    FLOPs for HigherHRNet-W32 at 512 x 512, halved to 46.2 G multiply-adds by model_gflops. The
    HigherHRNet paper (and the thesis after it) publishes "47.9 GFLOPs" for the same network;
    the 1.7 G gap is the paper's counter, not a different network (the parameter count above
    matches the official checkpoint exactly). All feature maps scale with the input area for
    multiples of 32, so 64 x 64 is exactly 1/64 of 512 x 512."""
    at_512 = model_gflops(model, (64, 64)) * 64
    assert at_512 == pytest.approx(46.2, abs=0.05), (
        f"{at_512:.2f} G multiply-adds at 512x512; expected our FlopCounterMode count 46.2 G "
        "(92.4 G FLOPs / 2), which the paper reports as 47.9 GFLOPs")


def test_fuse_unit_matches_hand_computed_exchange():
    """A 3-branch HighResolutionModule whose residual branches are the identity (zero convs,
    non-negative inputs) must sum upsampled 1x1 projections and strided 3x3 convs."""
    torch.manual_seed(0)
    mod = HighResolutionModule([2, 3, 4], [2, 3, 4], [1, 1, 1]).eval()
    with torch.no_grad():
        for p in mod.branches.parameters():  # residual branch = relu(0 + x) = x for x >= 0
            p.zero_()
        for row in mod.fuse_layers:
            for f in row:
                if f is not None:
                    for m in f.modules():
                        if isinstance(m, torch.nn.Conv2d):
                            m.weight.normal_()
    x = [torch.rand(1, c, 8 // 2 ** i, 8 // 2 ** i) for i, c in enumerate([2, 3, 4])]
    given = list(x)
    out = mod(x)
    assert all(a is b for a, b in zip(x, given))  # the input list is not modified
    s = 1 / math.sqrt(1 + 1e-5)  # BatchNorm in eval with fresh statistics

    def up(t, k):
        return t.repeat_interleave(k, -1).repeat_interleave(k, -2)

    def w(i, j, k=0):
        f = mod.fuse_layers[i][j]
        return (f[0] if j > i else f[k][0]).weight

    y0 = x[0] + up(F.conv2d(x[1], w(0, 1)) * s, 2) + up(F.conv2d(x[2], w(0, 2)) * s, 4)
    y1 = F.conv2d(x[0], w(1, 0), stride=2, padding=1) * s + x[1] + up(F.conv2d(x[2], w(1, 2)) * s, 2)
    mid = F.relu(F.conv2d(x[0], w(2, 0, 0), stride=2, padding=1) * s)
    y2 = (F.conv2d(mid, w(2, 0, 1), stride=2, padding=1) * s
          + F.conv2d(x[1], w(2, 1), stride=2, padding=1) * s + x[2])
    for got, want in zip(out, (y0, y1, y2)):
        torch.testing.assert_close(got, F.relu(want), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# Forward and features
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_forward_is_the_heads_composed_by_hand_on_the_stage4_features(model, hw):
    """The two outputs, written out with torch.nn.functional from the stage-4 features and the
    same weights: the 1x1 head at 1/4, then concat(features, 1/4 output) -> transposed conv ->
    BN -> ReLU -> the BasicBlocks -> the 1x1 head at 1/2. And each image of a batch is computed
    alone (eval-mode BatchNorm: no batch statistics). Measured differences: 0 (bit-identical) for
    the composition, <= 3.6e-6 for the batch split (outputs up to ~5); bounds 1e-6 and 1e-4."""
    h, w = hw
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(w))
    with torch.no_grad():
        out = model(x)
        stage4 = model.features(x, ["stage4"])["stage4"]                      # [2, 32, h/4, w/4]
        head, head_half = model.final_layers
        final = F.conv2d(stage4, head.weight, head.bias)
        tconv, bn, _ = model.deconv_layers[0][0]
        up = F.conv_transpose2d(torch.cat((stage4, final), 1), tconv.weight, stride=2, padding=1)
        up = F.relu(F.batch_norm(up, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))
        for block in model.deconv_layers[0][1:]:
            up = block(up)
        final_half = F.conv2d(up, head_half.weight, head_half.bias)
        alone = model(x[1:])
    assert isinstance(out, list) and len(out) == 2
    assert out[0].shape == (2, 34, h // 4, w // 4) and out[1].shape == (2, 17, h // 2, w // 2)
    assert final.abs().max() > 0.1 and final_half.abs().max() > 0.1             # not a trivial zero map
    torch.testing.assert_close(out[0], final, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], final_half, rtol=0, atol=1e-6)
    for a, b in zip(alone, out):
        torch.testing.assert_close(a, b[1:], rtol=0, atol=1e-4)


def test_non_multiple_of_32_is_the_padded_official_run(model):
    x = torch.randn(1, 3, 70, 50)
    padded = F.pad(x, (0, 64 - 50, 0, 96 - 70))  # the official net runs on multiples of 32
    with torch.no_grad():
        got = model(x)
        ref = model(padded)
    torch.testing.assert_close(got[0], ref[0][..., :18, :13])
    torch.testing.assert_close(got[1], ref[1][..., :35, :25])


def test_features_names_shapes_and_consistency(model):
    x = torch.randn(2, 3, 64, 96)
    specs = model.feature_specs()
    expected = {
        "stem": (256, 4), "stage2": (32, 4), "stage2.b0": (32, 4), "stage2.b1": (64, 8),
        "stage3": (32, 4), "stage3.b0": (32, 4), "stage3.b1": (64, 8), "stage3.b2": (128, 16),
        "stage4": (32, 4), "stage4.b0": (32, 4), "final": (34, 4), "deconv": (32, 2),
        "final_half": (17, 2),
    }
    assert specs == expected
    with torch.no_grad():
        feats = model.features(x, list(specs))
        out = model(x)
    assert list(feats) == list(specs)
    for name, (c, s) in specs.items():
        assert feats[name].shape == (2, c, 64 // s, 96 // s), name
    assert torch.equal(feats["stage3"], feats["stage3.b0"])
    torch.testing.assert_close(feats["final"], out[0], rtol=0, atol=0)
    torch.testing.assert_close(feats["final_half"], out[1], rtol=0, atol=0)


def test_features_crop_odd_sizes_and_stop_early(model):
    calls = []
    hook = model.stage2.register_forward_hook(lambda *a: calls.append("stage2"))
    try:
        with torch.no_grad():
            feats = model.features(torch.randn(1, 3, 70, 50), ["stem"])
            assert calls == []  # nothing past layer1 ran
            feats.update(model.features(torch.randn(1, 3, 70, 50), ["stage3.b2", "deconv"]))
    finally:
        hook.remove()
    assert feats["stem"].shape == (1, 256, 18, 13)
    assert feats["stage3.b2"].shape == (1, 128, 5, 4)
    assert feats["deconv"].shape == (1, 32, 35, 25)


def test_features_rejects_unknown_names_and_bad_input(model):
    with pytest.raises(KeyError, match="stage5"):
        model.features(torch.zeros(1, 3, 64, 64), ["stage2", "stage5"])
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        model(torch.zeros(1, 1, 64, 64))


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #
def test_round_trip_raw_and_official_training_wrapper(model, checkpoint, tmp_path):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    # The official trainer saves {'epoch', 'model': <name>, 'state_dict': DataParallel keys, ...}.
    wrapped = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "model": "pose_higher_hrnet", "perf": 0.5,
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, wrapped)
    for path in (checkpoint, wrapped):
        fresh = higherhrnet_w32(path).eval()
        with torch.no_grad():
            got = fresh(x)
        for g, w in zip(got, want):
            assert torch.equal(g, w), path.name
        assert fresh.state_dict()["bn1.num_batches_tracked"].item() == 7


def test_unwrap_state_dict_formats():
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    formats = [
        sd,
        {"state_dict": sd},
        {"model": sd},
        {"model": "name", "state_dict": {"module." + k: v for k, v in sd.items()}},
        {"model_state_dict": {"_orig_mod.module." + k: v for k, v in sd.items()}},
        {"checkpoint": 1, "model": {"state_dict": sd}},
        {"format": "threempose-checkpoint", "version": 1, "model": sd, "epoch": 3},  # engine.checkpoint
    ]
    for obj in formats:
        assert unwrap_state_dict(obj) == sd
    with pytest.raises(CheckpointError, match="no state_dict found.*optimizer"):
        unwrap_state_dict({"optimizer": 1, "epoch": 2}, "opt.pth")


def test_mismatched_checkpoint_lists_the_problems(model, tmp_path):
    sd = dict(model.state_dict())
    sd["final_layers.0.weight"] = torch.zeros(17, 32, 1, 1)  # a 17-output (no tags) head
    del sd["deconv_layers.0.4.0.bn2.running_var"]
    sd["extra_head.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(StateDictMismatchError) as info:
        load_weights(higherhrnet_w32(), bad)
    msg = str(info.value)
    assert str(bad) in msg
    assert "deconv_layers.0.4.0.bn2.running_var" in msg and "extra_head.weight" in msg
    assert "final_layers.0.weight: [17, 32, 1, 1] vs [34, 32, 1, 1]" in msg
    err = info.value
    assert err.missing == ["deconv_layers.0.4.0.bn2.running_var"]
    assert err.unexpected == ["extra_head.weight"]
    assert err.shape_mismatches == [("final_layers.0.weight", (17, 32, 1, 1), (34, 32, 1, 1))]


def test_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "nope" / "pose_higher_hrnet_w32_512.pth"
    with pytest.raises(FileNotFoundError, match="pose_higher_hrnet_w32_512.pth"):
        higherhrnet_w32(missing)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        higherhrnet_w32(junk)


# --------------------------------------------------------------------------- #
# Teacher
# --------------------------------------------------------------------------- #
def test_load_teacher_is_frozen_and_stays_in_eval(model, checkpoint):
    teacher = load_teacher(TeacherConfig(model="higherhrnet-w32", checkpoint=str(checkpoint)))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    holder = torch.nn.ModuleDict({"teacher": teacher})
    holder.train()  # a parent's train() must not put the teacher's BatchNorms in batch mode
    assert not any(m.training for m in teacher.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = teacher.features(x, ["stage2", "stage3", "stage4", "final"])
        assert torch.equal(got["final"], model(x)[0])


def test_load_teacher_errors(checkpoint):
    with pytest.raises(ValueError, match="loss.teacher.checkpoint"):
        load_teacher(TeacherConfig(model="higherhrnet-w32", checkpoint=None))
    with pytest.raises(ValueError, match="threempose.nas.derived"):
        load_teacher(TeacherConfig(model="threempose", checkpoint="model.pt"))
    with pytest.raises(ValueError, match="stage9"):
        load_teacher(TeacherConfig(checkpoint=str(checkpoint), layers=["stage2", "stage9"]))
