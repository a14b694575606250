"""The NVIDIA DALI backend against the torch backend, for the same (seed, epoch, index)."""
import dataclasses
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from threempose.config import ConfigError, DataConfig, SyntheticConfig, load_config
from threempose.data.augment import IMAGENET_STD, params_affine, transform_keypoints
from threempose.data.augment_gpu import augment_batch, collate_raw
from threempose.data.coco import CocoKeypoints
from threempose.data.keypoints import JOINT_NAMES
from threempose.data.sampler import EpochSampler
from threempose.data.loader import build_loaders, collate_samples
from threempose.data.synthetic import generate

from threempose.data.dali_pipeline import DaliLoader, decode, import_dali


def _has_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:                    # no "nvidia" package at all
        return False


needs_dali = pytest.mark.skipif(not _has_dali(), reason="the DALI extra is not installed: pip install -e '.[dali]'")

CFG = DataConfig(input_size=64, heatmap_stride=4, sigma=1.5, max_people=6, batch_size=4, num_workers=1)
gpu = pytest.mark.gpu(reason="DALI's mixed decode and gpu warp need a CUDA device")     # see tests/conftest.py
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GREY_LEVELS = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0      # normalised units -> 0..255


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    """(image dir, annotation file) of 12 images, 80-160 px, up to 3 people, crowds and masks."""
    out = tmp_path_factory.mktemp("dali")
    return out / "images", generate(out, 12, seed=4, min_size=80, max_size=160, max_people=3)


def _loader(synthetic_set, seed=3, gpu_ops=False, train=True, batch_size=CFG.batch_size):
    ds = CocoKeypoints(*synthetic_set, CFG, train=train, seed=seed)
    return DaliLoader(ds, EpochSampler(range(len(ds)), seed, shuffle=True), batch_size=batch_size,
                      drop_last=True, device=torch.device("cuda" if gpu_ops else "cpu"), gpu=gpu_ops,
                      num_threads=1)


def _keys(epoch=1, n=12):
    return [(i, epoch) for i in range(n)]


def _decode_files(blobs, gpu_ops=False):
    d = import_dali()
    pipe = d.Pipeline(batch_size=len(blobs), num_threads=1, device_id=0 if gpu_ops else None)
    with pipe:
        pipe.set_outputs(decode(d, d.fn.external_source(name="encoded", dtype=d.types.UINT8), gpu_ops))
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(b, np.uint8) for b in blobs])
    (out,) = pipe.run()
    out = out.as_cpu() if gpu_ops else out
    return [np.array(out[k]) for k in range(len(blobs))]


def _jpegs():
    """JPEG files as COCO has them: 4:2:0 (Pillow's default), 4:4:4, grayscale, progressive."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray((rng.random((24, 33, 3)) * 255).astype(np.uint8)).resize((131, 97))
    blobs = []
    for mode, kwargs in (("RGB", {}), ("RGB", {"subsampling": 0}), ("L", {}), ("RGB", {"progressive": True})):
        f = io.BytesIO()
        smooth.convert(mode).save(f, format="JPEG", quality=90, **kwargs)
        blobs.append(f.getvalue())
    return blobs


@needs_dali
def test_cpu_decode_is_pillows_bit_for_bit():
    blobs = _jpegs()
    for blob, got in zip(blobs, _decode_files(blobs)):
        want = np.array(Image.open(io.BytesIO(blob)).convert("RGB"))
        assert got.shape == want.shape and np.array_equal(got, want)


def _interior(affine, sizes, out_size, margin=1.0):
    """[B, S, S] bool: crop pixels whose source point lies >= margin px inside the image."""
    full = torch.cat([affine, affine.new_tensor([0.0, 0.0, 1.0]).expand(len(affine), 1, 3)], dim=1)
    inverse = torch.linalg.inv(full)[:, :2]
    axis = torch.arange(out_size, dtype=torch.float64)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    xy = torch.einsum("bij,hwj->bhwi", inverse[:, :, :2], torch.stack([u, v], -1)) + inverse[:, None, None, :, 2]
    wh = torch.tensor(sizes, dtype=torch.float64)[:, None, None, :]
    return ((xy >= margin) & (xy <= wh - 1 - margin)).all(-1)


@needs_dali
def test_dali_batches_match_the_torch_backend_for_the_same_keys(synthetic_set):
    loader = _loader(synthetic_set, batch_size=12)
    ds = loader.dataset
    raw_set = CocoKeypoints(*synthetic_set, CFG, train=True, seed=3, raw=True)
    keys = _keys()
    got = loader.augment(keys)
    pillow = collate_samples([ds[k] for k in keys])                       # torch backend, CPU path
    raw = collate_raw([raw_set[k] for k in keys])
    warped = augment_batch(raw, CFG, "cpu")                               # torch backend, device path

    assert got["flipped"].any() and not got["flipped"].all()
    assert torch.equal(got["image_id"], pillow["image_id"]) and torch.equal(got["flipped"], pillow["flipped"])
    assert (got["affine"] - pillow["affine"]).abs().max() < 1e-4
    want = transform_keypoints(raw["keypoints"], raw["affine"], raw["flipped"])   # float64 reference
    p = want.shape[1]
    assert torch.all(got["keypoints"][:, p:, :, 2] == 0)                  # padding people: no joint
    assert (got["keypoints"][:, :p, :, :2] - want[..., :2]).abs().max() < 1e-3
    assert torch.equal(got["keypoints"][:, :p, :, 2], want[..., 2])

    batch = loader._with_targets(dict(got))
    for ref in (pillow, warped):
        assert torch.equal(batch["joints"], ref["joints"])
        assert (batch["heatmaps"] - ref["heatmaps"]).abs().max() < 1e-4
        assert (batch["mask"] != ref["mask"]).float().mean() < 1e-3
        inside = _interior(ref["affine"], raw["size"].tolist(), CFG.input_size)[:, None].expand(-1, 3, -1, -1)
        diff = ((batch["image"] - ref["image"]) * GREY_LEVELS)[inside].abs()
        assert inside.float().mean() > 0.5 and diff.mean() < 0.5 and diff.max() <= 2.0
    assert (batch["mask"] == 0).any() and (batch["mask"] == 1).any()    # crowds and the outside


@needs_dali
def test_the_pixel_centre_border_rule_holds_on_the_whole_crop(synthetic_set):
    """Against the torch warp (float, no rounding): clamp within half a pixel, 0 beyond, everywhere."""
    loader = _loader(synthetic_set, train=False)                          # zoomed-out val crops have borders
    raw_set = CocoKeypoints(*synthetic_set, CFG, train=False, seed=3, raw=True)
    keys = _keys(0, 4)
    batch = loader._with_targets(loader.augment(keys))
    ref = augment_batch(collate_raw([raw_set[k] for k in keys]), CFG, "cpu")
    diff = ((batch["image"] - ref["image"]) * GREY_LEVELS).abs()
    assert diff.max() < 0.1 and torch.equal(batch["mask"], ref["mask"])


@needs_dali
def test_flipped_samples_swap_left_and_right_joints(synthetic_set):
    loader = _loader(synthetic_set, batch_size=12)
    ds = loader.dataset
    keys = _keys()
    got = loader.augment(keys)
    b = int(torch.nonzero(got["flipped"])[0])
    i, epoch = keys[b]
    source, _ = ds.annotations(i)
    params = ds.augment_params(i, epoch)
    assert params.flip
    mirror = params_affine(params, *Image.open(ds.image_path(i)).size, CFG.input_size).matrix
    left, right = JOINT_NAMES.index("left_wrist"), JOINT_NAMES.index("right_wrist")
    moved = source[..., :2] @ mirror[:, :2].T + mirror[:, 2]                # [P, J, 2], joints not renamed
    n = len(source)
    assert n > 0
    np.testing.assert_allclose(got["keypoints"][b, :n, left, :2].numpy(), moved[:, right], atol=1e-3)
    np.testing.assert_allclose(got["keypoints"][b, :n, right, :2].numpy(), moved[:, left], atol=1e-3)
    assert np.array_equal(got["keypoints"][b, :n, left, 2].numpy(), source[:, right, 2])
    assert np.array_equal(got["keypoints"][b, :n, right, 2].numpy(), source[:, left, 2])


@needs_dali
def test_a_run_killed_mid_epoch_and_resumed_gets_the_same_batches(synthetic_set):
    whole = _loader(synthetic_set)
    whole.set_epoch(2)
    expected = list(whole)
    assert len(expected) == 3

    killed = _loader(synthetic_set)
    killed.set_epoch(2)
    for step, batch in enumerate(killed):          # one step, a batch in flight, then the run dies
        break
    resumed = _loader(synthetic_set)               # a new process resumes after step 1
    resumed.set_epoch(2, skip_batches=1)
    again = [batch] + list(resumed)
    assert len(again) == 3
    for x, y in zip(expected, again):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    killed.set_epoch(2)                            # the abandoned pass's batch in flight is dropped
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(expected, killed))
    whole.set_epoch(3)
    epoch3 = list(whole)
    assert [b["image_id"].tolist() for b in epoch3] != [b["image_id"].tolist() for b in expected]
    early = iter(killed)                           # a pass left early and still referenced ...
    next(early)
    killed.set_epoch(3)
    later = iter(killed)
    got = [next(later)]                            # ... while the next pass runs, it cannot feed it
    with pytest.raises(RuntimeError, match="newer pass"):
        next(early)
    got += list(later)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(epoch3, got, strict=True))


@needs_dali
def test_undecodable_images_are_skipped_as_the_torch_backend_skips_them(synthetic_set, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic_set[0], images)
    garbage, truncated = images / "000003.jpg", images / "000008.jpg"
    garbage.write_bytes(b"not an image")                                  # Pillow cannot even open it
    truncated.write_bytes(truncated.read_bytes()[:3000])                 # header fine, data cut: DALI fails
    ds = CocoKeypoints(images, synthetic_set[1], CFG, train=True, seed=3)
    reference = [ds[k]["image_id"].item() for k in _keys()]
    loader = DaliLoader(ds, EpochSampler(range(12), 3, shuffle=False), batch_size=4, drop_last=True,
                        device=torch.device("cpu"), gpu=False, num_threads=1)
    loader.set_epoch(1)
    with pytest.warns(RuntimeWarning, match="000003.jpg.*000008.jpg"):
        ids = [i for batch in loader for i in batch["image_id"].tolist()]
    assert ids == reference and ids.count(4) == 2 and ids.count(9) == 2
    assert sorted(set(loader.skipped_files)) == [str(garbage), str(truncated)]
    with pytest.warns(RuntimeWarning, match="000008.jpg"):                # known now: no second failure
        assert [i for batch in loader for i in batch["image_id"].tolist()] == reference


@needs_dali
def test_build_loaders_switches_backend_and_the_stack_sees_the_same_batches(tmp_path):
    cfg = dataclasses.replace(CFG, batch_size=3, num_workers=0, synthetic=SyntheticConfig(
        train_images=10, val_images=4, min_size=80, max_size=128, max_people=3, cache_dir=str(tmp_path)))
    torch_data = build_loaders(cfg, seed=5, arch_fraction=0.3, progress=False)
    dali_data = build_loaders(dataclasses.replace(cfg, backend="dali"), seed=5, arch_fraction=0.3, progress=False)
    assert isinstance(dali_data.train, DaliLoader) and not dali_data.gpu_augment
    assert dali_data.val.dataset.coco.imgs.keys() == torch_data.val.dataset.coco.imgs.keys()
    for name in ("train", "arch", "val"):
        a, b = getattr(torch_data, name), getattr(dali_data, name)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            x, y = torch_data.prepare(x), dali_data.prepare(y)
            assert x.keys() == y.keys()
            assert all(x[k].shape == y[k].shape and x[k].dtype == y[k].dtype for k in x)
            assert torch.equal(x["image_id"], y["image_id"]) and torch.equal(x["joints"], y["joints"])
    assert [len(b["image_id"]) for b in dali_data.val] == [3, 1]          # the partial val batch is kept


def test_dali_backend_without_dali_is_one_clear_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)                 # import nvidia.dali -> ImportError
    cfg = dataclasses.replace(CFG, backend="dali", synthetic=SyntheticConfig(cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError) as e:
        build_loaders(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and 'data.backend is "dali"' in msg and '.[dali]' in msg
    assert not any(tmp_path.iterdir())                                    # failed before generating data


@needs_dali
def test_gpu_operators_need_a_cuda_run_device(synthetic_set):
    with pytest.raises(ConfigError, match="CUDA run device"):
        DaliLoader(CocoKeypoints(*synthetic_set, CFG, train=True), EpochSampler(range(4), 0, True),
                   batch_size=2, drop_last=True, device=torch.device("cpu"), gpu=True, num_threads=1)


@needs_dali
@gpu
def test_mixed_decode_and_gpu_warp_match_the_cpu_graph(synthetic_set):
    cpu, cuda = _loader(synthetic_set, batch_size=12), _loader(synthetic_set, gpu_ops=True, batch_size=12)
    keys = _keys()
    a, b = cpu.augment(keys), cuda.augment(keys)
    assert b["image"].is_cuda and b["mask"].is_cuda and b["keypoints"].is_cuda
    assert torch.equal(a["affine"], b["affine"].cpu()) and torch.equal(a["keypoints"], b["keypoints"].cpu())
    diff = ((a["image"] - b["image"].cpu()) * GREY_LEVELS).abs()
    assert diff.mean() < 1.0                       # nvJPEG's IDCT/upsampling differ from libjpeg-turbo's
    assert (a["mask"] != b["mask"].cpu()).float().mean() < 1e-3


@needs_dali
@gpu
def test_nvjpeg_decode_is_close_to_pillows():
    blobs = _jpegs()
    for blob, got in zip(blobs, _decode_files(blobs, gpu_ops=True)):
        want = np.array(Image.open(io.BytesIO(blob)).convert("RGB")).astype(int)
        assert got.shape == want.shape and np.abs(got - want).mean() < 1.0


def test_the_backend_switch_in_configs():
    assert load_config(CONFIGS / "search-small.json").data.backend == "torch"
    dali_cfg = load_config(CONFIGS / "search-small-dali.json")
    assert dali_cfg.data.backend == "dali" and dali_cfg.data.input_size == 128
    with pytest.raises(ConfigError, match="data.backend' must be one of"):
        load_config(CONFIGS / "search-small.json", overrides={"data": {"backend": "opencv"}})
    with pytest.raises(ConfigError, match="PNFS mode"):
        load_config(CONFIGS / "pnfs-small.json", overrides={"data": {"backend": "dali"}})


@needs_dali
def test_images_needing_conversion_reach_dali_as_the_one_reader_reads_them(tmp_path):
    """16-bit, RGBA and EXIF-rotated files: DALI decodes what read_encoded feeds it to exactly
    CocoKeypoints.decode's pixels (the image_io reader), not to its own reading of the file."""
    rng = np.random.default_rng(1)
    rgb = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((rng.random((20, 30)) * 65535).astype(np.uint16)).save(images / "deep.png")
    Image.fromarray(np.dstack([rgb, (rng.random((20, 30)) * 255).astype(np.uint8)])).save(images / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                    # rotate 90 clockwise to view: 20 x 30 upright
    Image.fromarray(rgb).save(images / "rotated.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray(rgb).save(images / "plain.jpg", quality=95)
    names = [("deep.png", 30, 20), ("alpha.png", 30, 20), ("rotated.jpg", 20, 30), ("plain.jpg", 30, 20)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, (n, w, h) in enumerate(names)],
        "annotations": [], "categories": [{"id": 1, "name": "person", "keypoints": JOINT_NAMES, "skeleton": []}]}))
    ds = CocoKeypoints(images, ann, CFG, train=False)
    encoded = [ds.read_encoded(i) for i in range(len(ds))]
    assert np.array_equal(encoded[3][0], np.fromfile(images / "plain.jpg", np.uint8))   # passed as its file
    for (blob, width, height), got, i in zip(encoded, _decode_files([e[0].tobytes() for e in encoded]), range(4)):
        want = np.array(ds.decode(i))
        assert (width, height) == (want.shape[1], want.shape[0]) and np.array_equal(got, want)
