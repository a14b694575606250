"""PNFS on MPII: the MPII JSON reader and its errors, the synthetic MPII form, MPII crops, the
16-joint network (Table I's MPII column) and a tiny search + training run reporting PCKh."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from threempose.util.errors import UserError
from threempose.config import load_config
from threempose.data.synthetic import ensure_synthetic, mpii_people
from threempose.engine.metrics import read_metrics
from threempose.pnfs import infer as infer_cli
from threempose.pnfs import search as search_cli
from threempose.pnfs import train as train_cli
from threempose.pnfs.mpii_data import MpiiDataError, TopDownMpiiDataset, read_mpii_annotations
from threempose.pnfs.model import PnfsNet, load_pnfs_model
from threempose.pnfs.parts import TABLE_I_MPII_ORDER
from threempose.pnfs.pckh import MPII_JOINT_NAMES, evaluate_pckh
from threempose.pnfs.topdown_data import transform_points
from threempose.pnfs.topdown_decode import flip_back

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def person(**changes) -> dict:
    entry = {"image": "a.jpg", "joints": [[10.0 + j, 20.0 + 2 * j] for j in range(16)], "joints_vis": [1] * 16,
             "center": [30.0, 40.0], "scale": 0.5, "headbox": [[0, 0], [10, 10]]}
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize("change, message", [
    ({"joints": [[0.0, 0.0]] * 17}, "'joints' must be 16 [x, y] pairs"),
    ({"scale": None}, "lacks 'scale'"),
    ({"scale": 0}, "'scale' must be a positive number"),
    ({"joints_vis": [1] * 15}, "'joints_vis' must be 16 flags"),
    ({"center": [1.0]}, "'center' must be [x, y]"),
])
def test_bad_mpii_entries_are_one_line_user_errors(tmp_path, change, message):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([person(), person(**change)]))
    with pytest.raises(MpiiDataError) as e:
        read_mpii_annotations(path)
    assert isinstance(e.value, UserError)
    text = str(e.value)
    assert message in text and f"{path}: person 1" in text and "\n" not in text


def test_search_command_reports_bad_mpii_file_in_one_line(tmp_path, capsys):
    (tmp_path / "mpii" / "annot").mkdir(parents=True)
    (tmp_path / "mpii" / "images").mkdir()
    (tmp_path / "mpii" / "annot" / "train.json").write_text(json.dumps([person(joints_vis=[1] * 14)]))
    (tmp_path / "mpii" / "annot" / "valid.json").write_text(json.dumps([person()]))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"extends": str(CONFIGS / "pnfs-mpii-small.json"),
                               "run": {"out_dir": str(tmp_path / "runs"), "progress": False},
                               "data": {"dataset": "mpii", "root": str(tmp_path / "mpii"),
                                        "train_split": "train", "val_split": "valid"}}))
    assert search_cli.main(["--config", str(cfg)]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[threempose]")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "'joints_vis' must be 16 flags" in errors[0], errors


def test_mpii_people_builds_the_mpii_form_from_coco_joints():
    """Hand-made COCO person: limb joints copied into MPII order, pelvis / thorax midpoints,
    the head disc from the ears (centre (50, 10), radius 5), thorax straight below it."""
    k = np.zeros((17, 3))
    k[:, 2] = 2
    k[3, :2], k[4, :2] = (55, 10), (45, 10)           # ears
    k[5, :2], k[6, :2] = (60, 30), (40, 30)           # shoulders -> thorax (50, 30)
    k[11, :2], k[12, :2] = (56, 60), (44, 60)         # hips -> pelvis (50, 60)
    for c in (7, 8, 9, 10, 13, 14, 15, 16):
        k[c, :2] = (c, 100 + c)
    k[15, 2] = 0                                      # left ankle unlabelled
    ann = {"image_id": 1, "iscrowd": 0, "num_keypoints": 16, "keypoints": k.reshape(-1).tolist(),
           "bbox": [30, 0, 40, 120]}
    [p] = mpii_people([{"id": 1, "file_name": "x.jpg"}], [ann])
    j = dict(zip(MPII_JOINT_NAMES, p["joints"]))
    vis = dict(zip(MPII_JOINT_NAMES, p["joints_vis"]))
    assert j["right_knee"] == [14, 114] and j["left_wrist"] == [9, 109] and j["right_shoulder"] == [40, 30]
    assert j["pelvis"] == [50, 60] and j["thorax"] == [50, 30]
    assert j["head_top"] == [50, 5] and j["upper_neck"] == [50, 15]
    assert vis["left_ankle"] == 0 and j["left_ankle"] == [0, 0] and sum(p["joints_vis"]) == 15
    assert p["headbox"] == [[45, 5], [55, 15]] and p["center"] == [50, 60] and p["scale"] == 120 / 200


def test_mpii_crops_place_joints_and_flip_left_right(tmp_path):
    cfg = load_config(CONFIGS / "pnfs-mpii-small.json", overrides={"data": {"synthetic": {
        "cache_dir": str(tmp_path), "train_images": 8, "val_images": 4}}})
    splits = ensure_synthetic(cfg.data.synthetic, progress=False)
    td = cfg.pnfs.topdown
    plain = TopDownMpiiDataset(splits.mpii_annotations("train"), splits.train_images, td, train=False)
    sample = plain[0]
    p = plain.people[0]
    expected = transform_points(p["joints"], sample["matrix"].numpy())
    assert sample["target"].shape == (16, td.input_height // 4, td.input_width // 4)
    np.testing.assert_allclose(sample["joints"][:, :2].numpy(), expected, atol=1e-4)
    # the square 200 * scale box around the centre maps its centre to the crop centre
    centre = transform_points(p["center"][None], sample["matrix"].numpy())[0]
    np.testing.assert_allclose(centre, [td.input_width / 2 - 0.5, td.input_height / 2 - 0.5], atol=1e-6)
    flipped = TopDownMpiiDataset(splits.mpii_annotations("train"), splits.train_images,
                                 td.__class__(**{**td.__dict__, "scale_min": 1.0, "scale_max": 1.0,
                                                 "rotation": 0.0}), train=True)
    for epoch in range(8):
        s = flipped[(0, epoch)]
        if s["flipped"]:
            break
    assert s["flipped"]
    mirrored = td.input_width - 1 - expected[:, 0]
    right, left = MPII_JOINT_NAMES.index("right_wrist"), MPII_JOINT_NAMES.index("left_wrist")
    assert s["joints"][right, 0].item() == pytest.approx(mirrored[left], abs=1e-4)


def test_mpii_network_has_16_joints_and_table_i_groups(tmp_path):
    cfg = load_config(CONFIGS / "pnfs-mpii-small.json", overrides={"pnfs": {"num_parts": 5}})
    net = PnfsNet(cfg).eval()
    names = [[MPII_JOINT_NAMES[j] for j in g] for g in net.groups]
    assert names[3] == ["left_hip", "right_hip", "pelvis"]            # Table I P=5 "thigh": 9, 10, 15
    assert sorted(names[0]) == sorted(TABLE_I_MPII_ORDER[:5])         # "head-shoulder": 0-4
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 48))
    assert out.scores.shape == (2, 16, 16, 12)
    # flip_back on 16 maps swaps MPII's left and right joints
    maps = torch.zeros(1, 16, 4, 4)
    maps[0, MPII_JOINT_NAMES.index("left_ankle"), 0, 0] = 1
    assert flip_back(maps)[0, MPII_JOINT_NAMES.index("right_ankle"), 0, 3] == 1
    bad = load_config(CONFIGS / "pnfs-mpii-small.json", overrides={"model": {"num_joints": 17}})
    with pytest.raises(UserError, match="num_joints must be 16 for MPII"):
        PnfsNet(bad)


def test_small_search_and_training_on_synthetic_mpii_report_pckh(tmp_path, capsys):
    """A one-epoch search then one epoch of training on the synthetic MPII-form data: PCKh@0.5
    and @0.1 on held-out people in both runs' metrics, a 16-joint model file."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "extends": str(CONFIGS / "pnfs-mpii-small.json"),
        "run": {"out_dir": str(tmp_path / "runs"), "progress": False, "val_ap_images": 4, "log_every": 1},
        "data": {"batch_size": 4, "synthetic": {"cache_dir": str(tmp_path / "cache"), "train_images": 8,
                                                "val_images": 3, "min_size": 96, "max_size": 160}},
        "search": {"epochs": 1, "max_steps_per_epoch": 2}, "train": {"epochs": 1, "max_steps_per_epoch": 2}}))
    assert search_cli.main(["--config", str(path)]) == 0
    searched = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    rows = read_metrics(Path(searched["run directory"]) / "metrics.jsonl")
    [val] = [r for r in rows if "val/PCKh@0.5" in r]
    assert 0.0 <= val["val/PCKh@0.1"] <= val["val/PCKh@0.5"] <= 100.0
    assert json.loads(Path(searched["architecture"]).read_text())["dataset"] == "mpii"
    assert train_cli.main(["--config", str(path), "--architecture", searched["architecture"],
                           "--init", searched["model"]]) == 0
    trained = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    rows = read_metrics(Path(trained["run directory"]) / "metrics.jsonl")
    assert any("val/PCKh@0.5" in r for r in rows)
    net, cfg = load_pnfs_model(trained["model"])
    assert net(torch.zeros(1, 3, 64, 48)).scores.shape[1] == 16
    # the infer command on the MPII val file: one 16 x [x, y, score] per person, the PCKh table
    splits = ensure_synthetic(cfg.data.synthetic, progress=False)
    out = tmp_path / "preds.json"
    assert infer_cli.main(["--checkpoint", trained["model"], "--annotations", str(splits.mpii_annotations("val")),
                           "--images", str(splits.val_images), "--out", str(out), "--evaluate"]) == 0
    preds = np.asarray(json.loads(out.read_text()))
    assert preds.shape == (len(read_mpii_annotations(splits.mpii_annotations("val"))), 16, 3)
    table = evaluate_pckh(splits.mpii_annotations("val"), out)
    assert f"{table['Mean']:8.1f}" in capsys.readouterr().out


def test_table_i_mpii_numbering_is_pnfs_footnote_3():
    footnote = ("head top, upper neck, thorax, l-shoulder, r-shoulder, l-elbow, r-elbow, l-wrist, r-wrist, "
                "l-hip, r-hip, l-knee, r-knee, l-ankle, r-ankle, pelvis")            # PNFS footnote 3, verbatim
    names = [n.strip().replace("l-", "left_").replace("r-", "right_").replace(" ", "_") for n in footnote.split(",")]
    assert list(TABLE_I_MPII_ORDER) == names and sorted(names) == sorted(MPII_JOINT_NAMES)


def test_mpii_data_is_pnfs_only():
    with pytest.raises(UserError, match='"mpii" is for PNFS mode'):
        load_config(CONFIGS / "search-small.json", overrides={"data": {"dataset": "mpii"}})


def test_synthetic_command_writes_the_mpii_form(tmp_path):
    from threempose.data.synthetic import main as synthetic_main
    out = tmp_path / "syn"
    assert synthetic_main(["--out", str(out), "--images", "6", "--min-size", "96", "--max-size", "160",
                           "--format", "mpii"]) == 0
    people = read_mpii_annotations(out / "mpii.json")
    coco = json.loads((out / "annotations.json").read_text())
    labelled = [a for a in coco["annotations"] if not a["iscrowd"] and a["num_keypoints"]]
    assert 0 < len(people) <= len(labelled)
    assert all(p["joints"].shape == (16, 2) and p["headbox"] is not None for p in people)
