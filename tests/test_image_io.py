"""The one image reader: 16-bit, palette, alpha, CMYK and EXIF-rotated files as a viewer shows them."""
import numpy as np
import pytest
from PIL import Image

from threempose.data.image_io import ImageReadError, read_image, to_rgb
from threempose.inference.predictor import Predictor

from test_predictor import random_image, same_people, tiny_infer, tiny_net


def pixels(path) -> np.ndarray:
    return np.asarray(read_image(path))


def test_a_16_bit_png_gives_the_same_people_as_its_8_bit_version(tmp_path):
    gray = np.asarray(Image.fromarray(random_image(72, 88, seed=3)).convert("L"))
    Image.fromarray(gray, "L").save(tmp_path / "8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")        # really stored as 16 bits
    assert np.array_equal(pixels(tmp_path / "16.png"), pixels(tmp_path / "8.png"))
    predictor = Predictor(tiny_net(), tiny_infer())
    eight, sixteen = predictor.predict(tmp_path / "8.png"), predictor.predict(tmp_path / "16.png")
    assert eight.people, "the loud tiny net should find someone"
    assert same_people(sixteen.people, eight.people, atol=0)


def test_16_bit_values_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "ramp.png")
    # round(v * 255 / 65535): 0, 1, 127.5 -> 128, 255
    assert pixels(tmp_path / "ramp.png")[0, :, 0].tolist() == [0, 1, 128, 255]


def test_palette_alpha_and_cmyk(tmp_path):
    rgb = random_image(20, 30, seed=1)
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(tmp_path / "p.png")
    lut = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)
    assert np.array_equal(pixels(tmp_path / "p.png"), lut[np.asarray(palette)])

    la = np.zeros((1, 3, 2), np.uint8)
    la[0, :, 0] = 100
    la[0, :, 1] = [0, 255, 51]                    # transparent, opaque, 20% opaque
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    # over white: 100 * a + 255 * (1 - a): 255, 100, 100 * 0.2 + 255 * 0.8 = 224
    assert pixels(tmp_path / "la.png")[0, :, 0].tolist() == [255, 100, 224]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = pixels(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [255, 255, 255] and np.array_equal(out[1:], rgb[1:])

    cmyk = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [255, 0, 0, 0]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    assert pixels(tmp_path / "c.tif")[0].tolist() == [[255, 255, 255], [0, 0, 0], [0, 255, 255]]


@pytest.mark.parametrize("orientation, upright", [(3, lambda a: a[::-1, ::-1]),      # 180 degrees
                                                   (6, lambda a: np.rot90(a, -1)),    # 90 clockwise
                                                   (8, lambda a: np.rot90(a, 1))])    # 90 counter-clockwise
def test_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path, orientation, upright):
    raw = random_image(10, 16, seed=2)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(raw).save(tmp_path / "o.png", exif=exif.tobytes())
    assert np.array_equal(pixels(tmp_path / "o.png"), upright(raw))


def test_images_without_a_faithful_rgb_form_are_errors(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match="f.tif: F image"):
        read_image(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match="no faithful 8-bit form"):
        to_rgb(Image.fromarray(np.array([[70000]], np.int32), "I"))


def test_the_coco_loader_reads_through_the_same_reader(tmp_path):
    """A 16-bit copy of a data set image loads as the 8-bit original (raw samples)."""
    from threempose.config import DataConfig
    from threempose.data.coco import CocoKeypoints
    from threempose.data.synthetic import generate

    ann = generate(tmp_path / "set", 1, seed=0, min_size=64, max_size=64, max_people=1, progress=False)
    cfg = DataConfig(input_size=64)
    dataset = CocoKeypoints(ann.parent / "images", ann, cfg, train=False, raw=True)
    original = dataset[0]["image"]
    path = dataset.image_path(0)
    gray = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(path, format="PNG")   # decoded by content
    assert np.array_equal(dataset[0]["image"].numpy(), np.stack([gray] * 3))
    assert original.shape == dataset[0]["image"].shape
