"""Per-epoch validation skips unreadable val images as training does, and runs after the epoch's
checkpoint, so nothing in validation loses an epoch."""
import math
import warnings

import pytest
import torch

import threempose.training.validate as validate_module
from threempose.config import DataConfig, InferConfig, SyntheticConfig
from threempose.data.loader import build_loaders
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
