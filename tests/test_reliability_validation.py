"""Per-epoch validation skips unreadable val images as training does, and runs after the epoch's
checkpoint, so nothing in validation loses an epoch."""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import threempose.training.train_job as train_job_module
import threempose.training.validate as validate_module
from threempose.config import DataConfig, InferConfig, SyntheticConfig, load_config
from threempose.data.loader import build_loaders
from threempose.data.synthetic import ensure_synthetic
from threempose.engine.checkpoint import load_checkpoint
from threempose.engine.distributed import DistContext
from threempose.engine.metrics import read_metrics
from threempose.nas.supernet import Supernet
from threempose.training.train_job import TrainJob
from threempose.training.validate import validation_ap


def _no_people(x):
    """An exit that finds nobody: zero heatmaps ``[B, 17, h, w]`` and tags ``[B, 17, h, w, 1]``."""
    b, _, h, w = x.shape
    return torch.zeros(b, 17, h // 4, w // 4), torch.zeros(b, 17, h // 4, w // 4, 1)


@pytest.fixture
def loaders(tmp_path):
    syn = SyntheticConfig(train_images=4, val_images=4, min_size=64, max_size=80, max_people=2,
                          cache_dir=str(tmp_path / "cache"))
    cfg = DataConfig(input_size=64, batch_size=2, num_workers=0, synthetic=syn)
    return build_loaders(cfg, progress=False)


def test_unreadable_val_images_are_skipped_warned_once_and_counted(loaders, monkeypatch):
    dataset = loaders.val.dataset
    zero_byte, truncated = dataset.image_path(1), dataset.image_path(2)
    zero_byte.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:100])
    scored = []

    def evaluate(coco, results, image_ids):
        scored.append(list(image_ids))
        return {"AP": 0.5, "AR": 0.25}
    monkeypatch.setattr(validate_module, "evaluate_keypoints", evaluate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = validation_ap(_no_people, loaders, InferConfig(short_side=64), count=0)
    messages = [str(w.message) for w in caught if "image reads" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("2 validation image reads failed")
    assert str(zero_byte) in messages[0] and str(truncated) in messages[0]
    ids = loaders.val_image_ids
    assert scored == [[ids[0], ids[3]]]                             # AP over the images read
    assert stats["skipped"] == 2 and stats["AP"] == 0.5 and stats["people"] == 0


def test_a_wholly_unreadable_subset_gives_nan_metrics_not_an_error(loaders):
    dataset = loaders.val.dataset
    for i in range(2):
        dataset.image_path(i).write_bytes(b"not an image")
    with pytest.warns(RuntimeWarning, match="2 validation image reads failed"):
        stats = validation_ap(_no_people, loaders, InferConfig(short_side=64), count=2)
    assert math.isnan(stats["AP"]) and stats["skipped"] == 2


ROOT = Path(__file__).resolve().parents[1]


def tiny_run_config(tmp_path, epochs, val_images=3, val_ap_images=3) -> Path:
    """A train/search config of ``epochs`` epochs a 2-core CPU runs in seconds (64x64 crops, a
    2x2 fabric, C=4), written to ``tmp_path / "tiny.json"``; its path."""
    raw = {"extends": str(ROOT / "configs" / "search-small.json"),
           "run": {"out_dir": str(tmp_path / "runs"), "log_every": 1, "val_ap_images": val_ap_images,
                   "progress": False},
           "data": {"input_size": 64, "batch_size": 4,
                    "synthetic": {"train_images": 8, "val_images": val_images, "min_size": 64, "max_size": 80,
                                  "max_people": 2, "cache_dir": str(tmp_path / "cache")}},
           "model": {"rows": 2, "layers": 2, "channels": 4, "eels": [], "stem_blocks": 0},
           "train": {"epochs": epochs, "lr_milestones": [1]},
           "search": {"epochs": epochs, "arch_lr_milestones": [1]}, "infer": {"short_side": 64}}
    (tmp_path / "tiny.json").write_text(json.dumps(raw))
    return tmp_path / "tiny.json"


def _train_config(tmp_path, epochs):
    return load_config(tiny_run_config(tmp_path, epochs))


def _train_job(cfg):
    return TrainJob(cfg, DistContext(), Supernet(cfg.model).derive())


def test_a_train_run_with_an_empty_val_image_keeps_its_epochs_and_logs_the_skip(tmp_path):
    cfg = _train_config(tmp_path, epochs=1)
    splits = ensure_synthetic(cfg.data.synthetic, progress=False)
    (splits.val_images / "000002.jpg").write_bytes(b"")
    job = _train_job(cfg)
    with pytest.warns(RuntimeWarning, match="1 validation image reads failed .*000002.jpg"):
        job.run()
    assert (job.run_dir.path / "checkpoints" / "epoch_001.pt").is_file()
    val = [r for r in read_metrics(job.run_dir.path / "metrics.jsonl") if "val/AP" in r]
    assert len(val) == 1 and val[0]["val/skipped"] == 1


def test_a_failure_in_validation_comes_after_the_epochs_checkpoint(tmp_path, monkeypatch):
    cfg = _train_config(tmp_path, epochs=2)

    def broken(*args, **kwargs):
        raise RuntimeError("validation broke")
    monkeypatch.setattr(train_job_module, "validation_ap", broken)
    job = _train_job(cfg)
    with pytest.raises(RuntimeError, match="validation broke"):
        job.run()
    assert load_checkpoint(job.run_dir.last_checkpoint)["epoch"] == 1      # epoch 1's training is kept
    monkeypatch.undo()
    resumed = _train_job(_train_config(tmp_path, epochs=2))
    resumed.run(resume=str(job.run_dir.path))
    assert load_checkpoint(job.run_dir.last_checkpoint)["epoch"] == 2
    assert (job.run_dir.path / "model.pt").is_file()
