"""PCKh@0.5 / @0.1 on a hand-made two-person case, the CLI, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from threempose.pnfs.pckh import MPII_JOINT_NAMES, PCKhInputError, evaluate_pckh, main

J = {name: i for i, name in enumerate(MPII_JOINT_NAMES)}

# Person A: head box 30 x 40 -> diagonal 50 -> head size 0.6 * 50 = 30 px: @0.5 within 15 px, @0.1 within 3.
# Person B: head box 60 x 80 -> head size 60 px: @0.5 within 30 px, @0.1 within 6.
ERRORS_A = {"right_ankle": (2.0, 0.0),      # 2:    @0.5 yes, @0.1 yes
            "right_knee": (0.0, 10.0),      # 10:   yes, no
            "right_hip": (9.6, 12.8),       # 16:   no, no
            "left_hip": (14.9, 0.0),        # 14.9: yes, no
            "right_wrist": (12.0, 16.0),    # 20:   no, no
            "pelvis": (100.0, 0.0)}         # no, no (not in the mean)
ERRORS_B = {"right_ankle": (31.0, 0.0),     # 31:   no, no
            "right_knee": (3.0, 4.0),       # 5:    yes, yes
            "right_wrist": (0.0, 20.0),     # 20:   yes, no
            "left_hip": (500.0, 0.0)}       # not annotated: ignored


def _write_case(tmp_path):
    rng = np.random.default_rng(0)
    annotations, predictions = [], []
    for k, (errors, headbox) in enumerate([(ERRORS_A, [[10, 20], [40, 60]]), (ERRORS_B, [[0, 0], [60, 80]])]):
        joints = rng.uniform(50, 400, size=(16, 2)).round(2)
        visible = [1] * 16
        if k == 1:
            visible[J["left_hip"]] = 0
        predicted = joints.copy()
        for name, offset in errors.items():
            predicted[J[name]] += offset
        annotations.append({"image": f"{k:09d}.jpg", "joints": joints.tolist(), "joints_vis": visible,
                            "headbox": headbox, "center": [200.0, 200.0], "scale": 2.0})
        predictions.append(np.concatenate([predicted, np.ones((16, 1))], axis=1).tolist())
    ann_path, pred_path = tmp_path / "annotations.json", tmp_path / "predictions.json"
    ann_path.write_text(json.dumps(annotations))
    pred_path.write_text(json.dumps(predictions))
    return ann_path, pred_path


def test_hand_made_case(tmp_path):
    table = evaluate_pckh(*_write_case(tmp_path))
    per_joint = table["per_joint"]
    assert per_joint["right_ankle"] == 50.0 and per_joint["right_knee"] == 100.0
    assert per_joint["right_hip"] == 50.0 and per_joint["left_hip"] == 100.0   # one annotated, correct
    assert per_joint["right_wrist"] == 50.0 and per_joint["pelvis"] == 50.0
    assert all(v == 100.0 for name, v in per_joint.items()
               if name not in ("right_ankle", "right_hip", "right_wrist", "pelvis"))
    at_01 = table["per_joint@0.1"]
    assert (at_01["right_ankle"], at_01["right_knee"], at_01["right_hip"], at_01["left_hip"],
            at_01["right_wrist"], at_01["pelvis"], at_01["head_top"]) == (50.0, 50.0, 50.0, 0.0, 0.0, 50.0, 100.0)
    assert (table["Head"], table["Shoulder"], table["Elbow"], table["Wrist"], table["Hip"], table["Knee"],
            table["Ankle"]) == (100.0, 100.0, 100.0, 75.0, 75.0, 100.0, 75.0)
    # Mean over the 14 joints other than pelvis and thorax, weighted by annotated counts:
    # 27 annotated (left hip once); correct @0.5: 27 - 3 = 24; @0.1: 27 - 6 = 21.
    assert table["Mean"] == pytest.approx(100 * 24 / 27)
    assert table["Mean@0.1"] == pytest.approx(100 * 21 / 27)


def test_cli(tmp_path, capsys):
    ann_path, pred_path = _write_case(tmp_path)
    assert main(["--annotations", str(ann_path), "--predictions", str(pred_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["Mean"] == pytest.approx(100 * 24 / 27)
    done = subprocess.run([sys.executable, "-m", "threempose.pnfs.pckh", "--annotations", str(ann_path),
                           "--predictions", str(pred_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    header, values = done.stdout.strip().splitlines()
    assert header.split() == ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1"]
    assert values.split()[-2:] == ["88.9", "77.8"]
    assert main(["--annotations", str(tmp_path / "missing.json"), "--predictions", str(pred_path)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_bad_input_names_file_and_key(tmp_path):
    ann_path, pred_path = _write_case(tmp_path)
    annotations = json.loads(ann_path.read_text())
    broken = tmp_path / "no_headbox.json"
    broken.write_text(json.dumps([{k: v for k, v in a.items() if k != "headbox"} for a in annotations]))
    with pytest.raises(PCKhInputError, match="no_headbox.json: entry 0 lacks headbox"):
        evaluate_pckh(broken, pred_path)
    broken.write_text(json.dumps([dict(annotations[0], joints=annotations[0]["joints"][:15])]))
    with pytest.raises(PCKhInputError, match=r"entry 0: 'joints' must be .*\[16, 2\]"):
        evaluate_pckh(broken, pred_path)
    broken.write_text(json.dumps([dict(annotations[0], headbox=[5, 5, 5, 5])]))
    with pytest.raises(PCKhInputError, match="zero size"):
        evaluate_pckh(broken, pred_path)
    short = tmp_path / "short.json"
    short.write_text(json.dumps(json.loads(pred_path.read_text())[:1]))
    with pytest.raises(PCKhInputError, match="short.json: 1 predictions for 2"):
        evaluate_pckh(ann_path, short)
    short.write_text(json.dumps([[[0, 0]] * 16, [[0, 0]] * 15]))
    with pytest.raises(PCKhInputError, match="short.json: prediction 1"):
        evaluate_pckh(ann_path, short)
    short.write_text("{}")
    with pytest.raises(PCKhInputError, match="non-empty JSON list"):
        evaluate_pckh(ann_path, short)
