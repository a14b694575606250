"""int8 quantization of exported segments (threempose.inference.quantize) and the agreement
measure (threempose.inference.agreement): calibration input errors, the QDQ model's form
(int8 per-channel weights, uint8 per-tensor activations, float32 heads), its outputs near the
float32 segments', and OKS matching against hand-computed cases."""
import json
import math

import numpy as np
import pytest
import torch

from threempose.data.keypoints import OKS_SIGMAS
from threempose.decode.decoder import Person
from threempose.inference import deploy
from threempose.inference.agreement import agreement, match_people, oks
from threempose.inference.predictor import Predictor
from threempose.inference.quantize import (PrecisionError, QuantizeInputError, calibration_images,
                                           calibration_inputs, check_precision)

from test_predictor import random_image, tiny_infer, tiny_net


# --------------------------------------------------------------------------- #
# OKS and matching
# --------------------------------------------------------------------------- #
def person(xy, score=1.0) -> Person:
    kp = np.zeros((17, 3))
    kp[:, :2] = xy
    kp[:, 2] = score
    return Person(kp, score, np.zeros(1))


def spread(x0=0.0, y0=0.0) -> np.ndarray:
    """17 joints on a 40 x 80 px box (area 3200)."""
    xy = np.stack([np.linspace(0, 40, 17), np.linspace(0, 80, 17)], 1)
    return xy + [x0, y0]


def test_oks_matches_the_coco_formula_by_hand():
    a = person(spread())
    b = person(spread() + [3.0, 4.0])                         # every joint 5 px away
    k = 2 * np.asarray(OKS_SIGMAS)
    expected = np.mean(np.exp(-25.0 / (2 * 3200.0 * k ** 2)))
    assert oks(a.keypoints, b.keypoints) == pytest.approx(expected, rel=1e-12)
    assert oks(a.keypoints, a.keypoints) == 1.0
    a.keypoints[5:, 2] = 0                                     # only joints 0-4 found: their box
    xy = spread()[:5]
    area = np.prod(xy.max(0) - xy.min(0))
    assert oks(a.keypoints, b.keypoints) == pytest.approx(np.mean(np.exp(-25.0 / (2 * area * k[:5] ** 2))))


def test_matching_pairs_people_by_oks_and_counts_lost_and_extra():
    ref = [person(spread()), person(spread(200, 0))]
    other = [person(spread(201, 0)), person(spread(500, 500))]     # one moved 1 px, one elsewhere
    pairs = match_people(ref, other)
    assert len(pairs) == 1 and pairs[0] == pytest.approx(oks(ref[1].keypoints, other[0].keypoints))

    class P:                                                   # Prediction's fields used
        def __init__(self, people, exit):
            self.people, self.exit = people, exit

    report = agreement([P(ref, 4), P(ref[:1], 4), P([], 7)],
                       [P(other, 4), P([person(spread(), 0.05)], 7), P([], 7)], min_score=0.1)
    assert (report.pairs, report.lost, report.extra) == (1, 2, 1)   # image 2's weak person is left out
    assert report.same_people == pytest.approx(1 / 3) and report.same_exit == pytest.approx(2 / 3)
    assert report.mean_oks == pytest.approx(pairs[0])


# --------------------------------------------------------------------------- #
# Calibration inputs
# --------------------------------------------------------------------------- #
def test_calibration_folder_errors_are_one_line(tmp_path):
    with pytest.raises(QuantizeInputError, match="not a directory"):
        calibration_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(QuantizeInputError, match=r"no readable image \(2 unreadable") as e:
        calibration_images(tmp_path)
    assert "\n" not in str(e.value)


def test_calibration_inputs_are_the_predictors_network_inputs(tmp_path):
    from PIL import Image

    from threempose.inference.predictor import prepare_image

    for i, (h, w) in enumerate([(100, 140), (120, 90)]):
        Image.fromarray(random_image(h, w, seed=i)).save(tmp_path / f"{i}.png")
    (tmp_path / "z.txt").write_text("skipped")
    images = calibration_images(tmp_path)
    assert [im.shape for im in images] == [(100, 140, 3), (120, 90, 3)]
    inputs = calibration_inputs(images, 96)
    assert [x.shape for x in inputs] == [(1, 3, 96, 160), (1, 3, 128, 96)]
    np.testing.assert_array_equal(inputs[1], prepare_image(images[1], 96, "cpu")[0].numpy())


# --------------------------------------------------------------------------- #
# Predictor precisions (tiny network; agreement at full size: bench/test_bench_precision.py)
# --------------------------------------------------------------------------- #


def test_precision_errors_are_one_line_and_name_what_is_missing(monkeypatch):
    with pytest.raises(PrecisionError, match="needs --calibration-images"):
        check_precision("int8")
    with pytest.raises(PrecisionError, match="unknown precision 'fp8'"):
        check_precision("fp8")
    monkeypatch.setattr(deploy, "cpu_bf16_missing", lambda: "the CPU's bf16 instructions (avx512_bf16 or amx_bf16)")
    with pytest.raises(PrecisionError, match="bf16 cannot run on this machine: it needs the CPU's bf16 "
                                             "instructions") as e:
        Predictor(tiny_net(), tiny_infer(), precision="bf16")
    assert "\n" not in str(e.value)


def test_int8_predictor_runs_quantized_onnx_segments_with_float32_maps():
    pytest.importorskip("onnxruntime.quantization")
    pytest.importorskip("onnxscript")
    import onnx

    cfg = tiny_infer(short_side=96, exit="dynamic")
    calib = [random_image(96, 128, seed=s) for s in range(3)]
    int8 = Predictor(tiny_net(), cfg, precision="int8", calibration_images=calib)
    fp32 = Predictor(tiny_net(), cfg)
    assert int8.net.meta["precision"] == "int8" and int8.net.meta["quantization"]["calibration_inputs"] == 3
    x = torch.from_numpy(calibration_inputs([random_image(96, 160, seed=7)], 96)[0])
    outs = list(int8.net.iter_exits(x))
    assert [o.layer for o in outs] == [1, 2, 3] and all(o.heatmaps.dtype == torch.float32 for o in outs)
    with torch.no_grad():
        ref = list(fp32.net.iter_exits(x))
    for o, r in zip(outs, ref):                                  # quantized, yet the same maps roughly
        assert 0 < (o.tags - r.tags).abs().max() <= 0.1 * r.tags.abs().max()
    pred = int8.predict(random_image(100, 130, seed=8))
    assert pred.exit in (1, 2, 3)
    with pytest.raises(PrecisionError, match="needs --calibration-images"):
        Predictor(tiny_net(), cfg, precision="int8")


def test_quantized_model_has_int8_per_channel_weights_and_float_heads(tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    pytest.importorskip("onnxscript")
    import onnx
    from onnx import numpy_helper

    from threempose.inference.segments import export_segments
    from threempose.inference.quantize import quantize_export

    net = tiny_net()
    src = export_segments(net, tmp_path / "fp32", formats=["onnx"])
    out = quantize_export(src, tmp_path / "int8", calibration_inputs([random_image(96, 96)], 96))
    meta = json.loads((out / "threempose.json").read_text())
    assert meta["precision"] == "int8" and meta["formats"] == ["onnx"]
    model = onnx.load(str(out / "exit1.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    quantized = [c for c in convs if c.input[1] in producer and producer[c.input[1]].op_type == "DequantizeLinear"]
    assert len(quantized) >= len(convs) - 1                      # all but the head's conv
    for c in quantized:
        dq = producer[c.input[1]]
        w, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],)          # per output channel
        act = producer[c.input[0]]
        assert act.op_type == "DequantizeLinear" and inits[act.input[1]].size == 1   # per tensor
        assert inits[act.input[0]].dtype == np.uint8 if act.input[0] in inits else True
    head = [c for c in convs if c not in quantized]
    assert len(head) == 1 and head[0].input[1] in inits and inits[head[0].input[1]].dtype == np.float32
