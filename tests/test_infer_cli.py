"""python -m threempose.infer: results, per-image records, drawings, summary, and bad input."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from threempose.data.synthetic import generate
from threempose.engine.checkpoint import load_checkpoint, save_checkpoint
from threempose.data.coco_eval import evaluate_keypoints
from threempose.infer import main
from threempose.inference.folder_run import name_image_id
from threempose.nas.model_file import save_model_file

from test_predictor import tiny_infer, tiny_net


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model_file(path, tiny_net(), dataclasses.asdict(tiny_infer()))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three synthetic images with COCO annotations (ids 1..3, files 000001.jpg ...)."""
    root = tmp_path_factory.mktemp("synthetic")
    annotations = generate(root, 3, seed=6, min_size=64, max_size=96, max_people=2)
    return root / "images", annotations


@pytest.fixture
def images(tmp_path, data):
    """The synthetic images plus a text file and a truncated JPEG."""
    folder = tmp_path / "images"
    shutil.copytree(data[0], folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes((folder / "000001.jpg").read_bytes()[:150])
    return folder


def test_infer_writes_results_records_drawings_and_a_summary(model, images, data, tmp_path, capsys):
    out, draw = tmp_path / "out" / "results.json", tmp_path / "drawn"
    rc = main(["--checkpoint", str(model), "--images", str(images), "--out", str(out), "--draw", str(draw),
               "--annotations", str(data[1]), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0
    results = json.loads(out.read_text())
    meta = json.loads(out.with_suffix(".images.json").read_text())
    records = meta["images"]
    assert [r["image_id"] for r in records] == [1, 2, 3] and all(r["exit"] == 3 for r in records)
    assert {s["file"].split("/")[-1]: s["reason"] for s in meta["skipped"]} == {
        "notes.txt": "not an image of " + str(data[1]), "broken.jpg": "not an image of " + str(data[1])}
    assert sum(r["people"] for r in records) == len(results) > 0
    assert {r["image_id"] for r in results} <= {1, 2, 3}
    stats = evaluate_keypoints(data[1], out)                         # scoreable by threempose.evaluate
    assert 0.0 <= stats["AP"] <= 1.0
    for r in records:
        png = draw / f"{r['file'].split('/')[-1].split('.')[0]}.png"
        with Image.open(png) as im, Image.open(r["file"]) as src:
            assert im.format == "PNG" and im.size == src.size
    assert meta["summary"]["images"] == 3 and meta["summary"]["exits"] == {"3": 3}
    for line in ("images: 3 processed, 2 skipped", f"people found: {len(results)}", "exits taken: layer 3: 3",
                 "mean GFLOPs per image:", "images/s"):
        assert line in stdout


def test_unreadable_files_are_skipped_and_listed(model, images, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["--checkpoint", str(model), "--images", str(images), "--out", str(out), "--dynamic",
                 "--batch", "2", "--no-progress", "--benchmark"]) == 0
    captured = capsys.readouterr()
    meta = json.loads(out.with_suffix(".images.json").read_text())
    assert sorted(s["file"].split("/")[-1] for s in meta["skipped"]) == ["broken.jpg", "notes.txt"]
    assert "notes.txt: not an image" in captured.out and "broken.jpg: unreadable" in captured.out
    assert [r["image_id"] for r in meta["images"]] == [1, 2, 3]       # digit stems are the ids
    assert all(sorted(r["scores"]) == ["1", "2"] for r in meta["images"])  # thesis thresholds: never early
    [line] = [x for x in captured.out.splitlines() if x.startswith("benchmark: ")]
    seconds = {name: float(value) for name, value in re.findall(r"(load \(background\)|waiting for images|network|"
                                                               r"exit scoring|decode/group) ([\d.]+) s", line)}
    assert "3 images in" in line and "images/s" in line
    assert sorted(seconds) == sorted(["load (background)", "waiting for images", "network", "exit scoring",
                                      "decode/group"])
    # printed to 10 ms: the background load of three tiny images may round to 0.00
    assert seconds["network"] > 0 and all(v >= 0 for v in seconds.values())
    total = float(re.search(r"3 images in ([\d.]+) s", line).group(1))
    foreground = sum(v for k, v in seconds.items() if k != "load (background)")
    assert foreground <= total + 0.05                 # the parts the caller waited for fit in the wall time


@pytest.mark.parametrize("exit", ["2", "dynamic"])
def test_batches_give_the_same_results(model, data, tmp_path, exit):
    outs = []
    for batch in ("1", "3"):
        out = tmp_path / f"b{batch}.json"
        assert main(["--checkpoint", str(model), "--images", str(data[0]), "--out", str(out), "--exit", exit,
                     "--batch", batch, "--no-progress"]) == 0
        outs.append(json.loads(out.read_text()))
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(outs[0], outs[1]):
        assert a["image_id"] == b["image_id"]
        assert a["keypoints"] == pytest.approx(b["keypoints"], abs=1e-5)    # measured: identical


def test_one_file_and_name_based_ids(model, data, tmp_path):
    image = tmp_path / "street scene.png"
    with Image.open(data[0] / "000002.jpg") as im:
        im.save(image)
    out = tmp_path / "r.json"
    assert main(["--checkpoint", str(model), "--images", str(image), "--out", str(out), "--no-progress"]) == 0
    [record] = json.loads(out.with_suffix(".images.json").read_text())["images"]
    assert record["image_id"] == name_image_id("street scene.png") == name_image_id("street scene.png")
    assert 0 < record["image_id"] < 2 ** 53 and name_image_id("000139.jpg") == 139


@pytest.mark.parametrize("case", ["empty dir", "missing", "not a model", "search checkpoint", "mismatch",
                                  "id clash", "all unreadable", "bad exit"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, model, tmp_path, data, capsys):
    images, checkpoint, extra = data[0], model, []
    if case == "empty dir":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "missing":
        images = tmp_path / "nowhere"
    elif case == "not a model":
        checkpoint = tmp_path / "junk.pt"
        checkpoint.write_text("hello")
    elif case == "search checkpoint":
        checkpoint = tmp_path / "search.pt"
        save_checkpoint(checkpoint, {"kind": "search", "model": {}})
    elif case == "mismatch":
        state = load_checkpoint(model)
        state["genotype"] = {**state["genotype"], "channels": 8}
        checkpoint = tmp_path / "mismatch.pt"
        save_checkpoint(checkpoint, state)
    elif case == "id clash":
        images = tmp_path / "clash"
        images.mkdir()
        shutil.copy(data[0] / "000001.jpg", images / "1.jpg")
        shutil.copy(data[0] / "000001.jpg", images / "001.png")
    elif case == "all unreadable":
        images = tmp_path / "junk"
        images.mkdir()
        (images / "a.txt").write_text("x")
    elif case == "bad exit":
        extra = ["--exit", "9"]
    out = tmp_path / "results.json"
    rc = main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    expected = {"empty dir": "holds no files", "missing": "no such file or directory",
                "not a model": "junk.pt", "search checkpoint": "not a trained model file",
                "mismatch": "weights vs its genotype", "id clash": "same image id 1",
                "all unreadable": "could be processed", "bad exit": "infer.exit '9' is not an exit"}[case]
    assert rc == 2 and "error: " in err and expected in err
    assert not out.exists() and not out.with_suffix(".images.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results")]   # no temp files left


def test_contradicting_exit_flags_are_rejected(model, data, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(model), "--images", str(data[0]), "--out", str(tmp_path / "r.json"),
              "--dynamic", "--exit", "1"])
    assert e.value.code == 2


def test_module_entry_point(model, data, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "threempose.infer", "--checkpoint", str(model), "--images",
                           str(data[0] / "000003.jpg"), "--out", str(out), "--exit", "1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exits taken: layer 1: 1" in proc.stdout and out.is_file()


def test_background_loader_hands_errors_over_and_stops(model, data):
    """An unexpected error while reading ahead is raised in the caller, and the thread ends."""
    from threempose.inference.folder_run import BackgroundLoader
    from threempose.inference.predictor import Predictor

    class Failing(Predictor):
        def prepare(self, image):
            raise RuntimeError("disk on fire")

    predictor = Failing.from_checkpoint(model)
    files = sorted(data[0].iterdir())
    with pytest.raises(RuntimeError, match="disk on fire"):
        with BackgroundLoader(predictor, [files[:1], files[1:]], keep_arrays=False) as loader:
            list(loader)
    assert not loader._thread.is_alive()
    with BackgroundLoader(Predictor.from_checkpoint(model), [files[:2], files[2:]], keep_arrays=True) as loader:
        chunks = list(loader)
    assert [c[0] for c in chunks] == [files[:2], files[2:]] and chunks[0][1][0].shape[2] == 3
    assert all(x.shape[:2] == (1, 3) for c in chunks for x, _ in c[2]) and loader.seconds > 0


def test_resume_skips_the_images_a_killed_run_finished(model, data, tmp_path, capsys):
    """A journal holding image 1 (and a torn line, as a kill leaves it): --resume runs images 2
    and 3 only and writes the results of the uninterrupted run."""
    from threempose.inference.result_journal import ResultJournal

    args = ["--checkpoint", str(model), "--images", str(data[0]), "--annotations", str(data[1]), "--no-progress"]
    full = tmp_path / "full.json"
    assert main([*args, "--out", str(full)]) == 0
    meta = json.loads(full.with_suffix(".images.json").read_text())
    results = json.loads(full.read_text())
    out = tmp_path / "resumed.json"
    journal = ResultJournal(out)
    journal.open(resume=False)
    first = meta["images"][0]
    journal.append(first, [r for r in results if r["image_id"] == first["image_id"]])
    journal.close()
    with open(journal.path, "a") as f:
        f.write('{"record": {"file": "torn')                       # the image in flight at the kill
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert "images: 3 processed, 0 skipped (1 of them by the run resumed)" in capsys.readouterr().out
    assert json.loads(out.read_text()) == results
    resumed = json.loads(out.with_suffix(".images.json").read_text())
    assert resumed["images"] == meta["images"] and resumed["summary"]["images"] == 3
    assert not journal.path.exists()


def test_a_failed_run_keeps_its_journal_of_finished_images(model, data, tmp_path, monkeypatch):
    from threempose.inference import folder_run
    from threempose.inference.result_journal import ResultJournal

    calls = []
    real = folder_run.save_drawing

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt                   # as a kill between images
        return real(*a, **k)

    monkeypatch.setattr(folder_run, "save_drawing", crash_on_second)
    out = tmp_path / "r.json"
    assert main(["--checkpoint", str(model), "--images", str(data[0]), "--out", str(out), "--no-progress",
                 "--draw", str(tmp_path / "drawn")]) == 130          # Ctrl-C: one line, exit 130
    assert not out.exists()
    assert [e["record"]["image_id"] for e in ResultJournal(out).entries()] == [1, 2]
