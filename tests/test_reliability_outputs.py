"""Outputs checked before any work, command-line values checked by argparse, and no parsing of
image file names beyond ASCII digits."""
import argparse

import pytest
from PIL import Image

from threempose.calibrate import main as calibrate_main
from threempose.infer import main as infer_main
from threempose.inference.folder_run import InferInputError, image_ids, name_image_id
from threempose.util.cli import parse_device


def _image(path):
    Image.new("RGB", (32, 32)).save(path)
    return path


def test_draw_into_a_folder_holding_a_folder_of_a_drawings_name_fails_before_work(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    _image(images / "a.jpg")
    (tmp_path / "draw" / "a.png").mkdir(parents=True)
    status = infer_main(["--checkpoint", str(tmp_path / "never-read.pt"), "--images", str(images),
                         "--out", str(tmp_path / "r.json"), "--draw", str(tmp_path / "draw")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --draw {tmp_path / 'draw'}: {tmp_path / 'draw' / 'a.png'} is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draw", "images"]


def test_calibrate_records_that_is_a_folder_fails_before_work(tmp_path, capsys):
    (tmp_path / "records").mkdir()
    status = calibrate_main(["--checkpoint", str(tmp_path / "never-read.pt"), "--config", "never-read.json",
                             "--out", str(tmp_path / "c.json"), "--records", str(tmp_path / "records")])
    err = capsys.readouterr().err
    assert status == 2 and err == f"error: --records {tmp_path / 'records'} is a directory; give a file name\n"


def test_calibrate_records_and_out_must_differ(tmp_path, capsys):
    assert calibrate_main(["--checkpoint", "x.pt", "--config", "c.json", "--out", str(tmp_path / "c.json"),
                           "--records", str(tmp_path / "c.json")]) == 2
    assert "is also --out" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu", "cpu:0", "cuda:x", "cuda:²", ""])
def test_a_device_that_is_not_cpu_cuda_or_cuda_n_is_refused(device):
    with pytest.raises(argparse.ArgumentTypeError, match="choose cpu, cuda or cuda:N"):
        parse_device(device)


def test_infer_refuses_device_tpu_with_argparse_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        infer_main(["--checkpoint", "m.pt", "--images", str(tmp_path), "--out", "r.json", "--device", "tpu"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("argument --device: choose cpu, cuda or cuda:N, not 'tpu'")


def test_image_ids_read_only_ascii_digit_stems(tmp_path):
    assert name_image_id("000000397133.jpg") == 397133
    hashed = name_image_id("².jpg")                    # str.isdigit("²") is True, int("²") fails
    assert hashed == int(__import__("hashlib").sha1("².jpg".encode()).hexdigest()[:12], 16)
    assert name_image_id("٣.jpg") != 3 and name_image_id("1e3.jpg") != 1000
    assert name_image_id("9" * 30 + ".jpg") < 2**63                # too long for int64: hashed
    files = [_image(tmp_path / "².jpg"), _image(tmp_path / "2.jpg")]
    ids, skipped = image_ids(files, None)
    assert ids == {files[0]: hashed, files[1]: 2} and skipped == []


@pytest.mark.parametrize("images, message", [
    ([{"id": 1, "file_name": "a/x.jpg"}, {"id": 2, "file_name": "b/x.jpg"}], "two images are named 'x.jpg'"),
    ([{"id": 1, "file_name": "x.jpg"}, {"id": 1, "file_name": "y.jpg"}], "share the id 1"),
])
def test_infer_annotations_with_ambiguous_images_are_refused(tmp_path, images, message):
    (tmp_path / "a.json").write_text(__import__("json").dumps({"images": images}))
    with pytest.raises(InferInputError, match=message):
        image_ids([tmp_path / "x.jpg"], tmp_path / "a.json")
    (tmp_path / "b.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(InferInputError, match=r"b\.json: not a JSON file \(binary"):
        image_ids([tmp_path / "x.jpg"], tmp_path / "b.json")
