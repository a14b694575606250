"""The Predictor API: image inputs, settings, batching, flip merging; shared tiny-model helpers.

The helpers here (``tiny_net``, ``loud_heads``, ``tiny_infer``) are imported by the other
inference test modules (test_dynamic_exit, test_infer_cli, test_calibrate, test_export).
"""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from threempose.config import ConfigError, EELConfig, InferConfig, ModelConfig
from threempose.decode.decoder import merge_flip
from threempose.decode.resize import plan_resize
from threempose.nas.model_file import save_model_file
from threempose.nas.derived import DerivedNet
from threempose.nas.supernet import Supernet
from threempose.inference.predictor import (ImageReadError, Predictor, image_region, infer_settings, load_image, merged_heatmaps, predict_people)

TINY_MODEL = dict(rows=2, layers=3, channels=4, eels=[1, 2], stem_blocks=0)   # exits at layers 1, 2, 3


def loud_heads(net: DerivedNet, peak: float = 1.0, tag_scale: float = 1.0) -> DerivedNet:
    """Rescale every head so its heatmaps reach about ``peak`` (and its tags about ``tag_scale``)
    on a fixed 64 x 64 input. A fresh network's heads output ~1e-3 (HigherHRNet init), where
    nothing is ever detected; scaled up, decoding finds keypoints and the confidences vary.
    A head feeds nothing else, so each exit is scaled independently."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for out in net(x):
            conv = net.heads[str(out.layer)].conv
            joints = net.num_joints
            conv.weight[:joints] *= peak / out.heatmaps.abs().max()
            conv.weight[joints:] *= tag_scale / out.tags.abs().max()
    return net


def tiny_net(seed: int = 0, loud: bool = True) -> DerivedNet:
    """A derived network of a 2-row, 3-layer, C = 4 fabric with EELs at layers 1 and 2."""
    torch.manual_seed(seed)
    genotype = Supernet(ModelConfig(**TINY_MODEL)).derive()
    torch.manual_seed(seed)
    net = DerivedNet(genotype, 17, TINY_MODEL["stem_blocks"]).eval()
    return loud_heads(net) if loud else net


def tiny_infer(**overrides) -> InferConfig:
    """Test-time settings for 64-pixel inputs, with an EELConfig for each of the tiny net's EELs."""
    base = InferConfig(short_side=64, project_to_input=False, nms_kernel=3,
                       eels=[EELConfig(layer=1, c0=1.0, threshold=1.0), EELConfig(layer=2, c0=2.0, threshold=0.6)])
    return dataclasses.replace(base, **overrides)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def same_people(a, b, atol=1e-6) -> bool:
    return len(a) == len(b) and all(
        np.allclose(p.keypoints, q.keypoints, atol=atol) and abs(p.score - q.score) <= atol for p, q in zip(a, b))


@pytest.fixture(scope="module")
def net():
    return tiny_net()


def test_predict_accepts_arrays_pil_images_and_paths(net, tmp_path):
    image = random_image(70, 90)
    path = tmp_path / "a.png"
    Image.fromarray(image).save(path)
    predictor = Predictor(net, tiny_infer())
    results = [predictor.predict(x) for x in (image, Image.fromarray(image), path, str(path))]
    assert results[0].people, "the loud tiny net should find someone"
    for r in results[1:]:
        assert same_people(r.people, results[0].people, atol=0) and r.exit == 3
    assert all(p.keypoints.shape == (17, 3) for p in results[0].people)
    assert results[0].input_size == plan_resize(90, 70, 64).input_size


def test_final_exit_equals_predict_people_on_the_last_exit(net):
    """The Predictor's static path gives what search/train validation's predict_people gives."""
    image = random_image(64, 80, seed=3)
    cfg = tiny_infer()

    def last_exit(x):
        out = net(x)[-1]
        return out.heatmaps, out.tags

    expected = predict_people(last_exit, image, cfg)
    assert expected and same_people(Predictor(net, cfg, optimize=False).predict(image).people, expected, atol=0)


def test_batches_of_mixed_sizes_equal_one_image_at_a_time(net):
    images = [random_image(64, 80, 1), random_image(70, 64, 2), random_image(64, 84, 3)]
    predictor = Predictor(net, tiny_infer(exit="2"))
    batched = predictor.predict_batch(images)
    single = [predictor.predict(im) for im in images]
    assert [b.exit for b in batched] == [2, 2, 2]
    for b, s in zip(batched, single):
        assert same_people(b.people, s.people) and b.gflops == s.gflops and b.input_size == s.input_size


def test_merged_heatmaps_match_the_decoders_flip_merge():
    maps = torch.rand(2, 17, 6, 8)
    tags = torch.rand(2, 17, 6, 8)
    expected, _ = merge_flip(maps[0], tags[0], maps[1], tags[1])
    assert np.allclose(merged_heatmaps(maps).numpy(), expected, atol=1e-7)
    assert torch.equal(merged_heatmaps(maps[:1]), maps[0])


def test_image_region_drops_the_padding():
    info = plan_resize(100, 60, short_side=64)            # 107 x 64 scaled, padded to 128 x 64
    assert info.input_size == (128, 64) and info.resized_size == (107, 64)
    assert image_region(torch.zeros(17, 16, 32), info).shape == (17, 16, 27)   # ceil(107 / 4)


def test_bad_images_are_clear_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with pytest.raises(ImageReadError, match="notes.txt: not an image"):
        load_image(text)
    broken = tmp_path / "broken.jpg"
    buf = tmp_path / "ok.jpg"
    Image.fromarray(random_image(40, 40)).save(buf)
    broken.write_bytes(buf.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_image(broken)
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match=r"uint8 image array \[H, W, 3\]"):
        load_image(np.zeros((8, 8), np.uint8))


def test_settings_precedence_and_validation(net, tmp_path):
    model = tmp_path / "model.pt"
    save_model_file(model, net, dataclasses.asdict(tiny_infer(flip_test=False)))
    p = Predictor.from_checkpoint(model)
    assert p.cfg.short_side == 64 and not p.cfg.flip_test and p.mode == 3 and p.passes == 1
    p = Predictor.from_checkpoint(model, exit="dynamic", flip_test=True)
    assert p.mode == "dynamic" and sorted(p.rules) == [1, 2] and p.passes == 2
    config = tmp_path / "infer.json"
    config.write_text('{"infer": {"exit": "1", "short_side": 96}}')
    p = Predictor.from_checkpoint(model, config=config)
    assert p.mode == 1 and p.cfg.short_side == 96 and p.cfg.flip_test      # defaults fill the rest
    with pytest.raises(ConfigError, match="unknown key 'infer.shortside'"):
        Predictor.from_checkpoint(model, shortside=3)
    with pytest.raises(ConfigError, match="infer.exit '5' is not an exit"):
        Predictor.from_checkpoint(model, exit="5")
    with pytest.raises(ConfigError, match=r"configures layers \[4, 7\].*EELs are at \[1, 2\]"):
        Predictor(net, InferConfig(exit="dynamic"))
    assert infer_settings({}, None).short_side == 512


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
def test_cuda_without_a_gpu_is_a_clear_error(net):
    with pytest.raises(ValueError, match="CUDA is not available"):
        Predictor(net, tiny_infer(), device="cuda")
