"""threempose.calibrate: the threshold search against a brute-force reference on controlled
records (in memory and read back from a journal on disk), and the CLI on a tiny model (config
written, table printed, AP drop within budget recomputed from the saved records, live dynamic
inference takes the replayed exits; a killed run resumed gives the uninterrupted run's output;
another run's journal is refused)."""
import contextlib
import dataclasses
import io
import itertools
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from threempose.inference.calibration import (ImageRecord, SettingEvaluator, candidate_thresholds, journal_records,
                                              records_journal, search_thresholds, val_split)
from threempose.calibrate import main
from threempose.config import load_config
from threempose.inference.dynamic_exit import NEVER, ExitScore
from threempose.data.coco_eval import evaluate_keypoints
from threempose.data.synthetic import ensure_synthetic
from threempose.nas.model_file import save_model_file
from threempose.inference.predictor import Predictor

from test_predictor import tiny_infer, tiny_net


# --------------------------------------------------------------------------- #
# The search on controlled records
# --------------------------------------------------------------------------- #
def person(image_id: int, rng) -> dict:
    xy = rng.uniform(20, 80, (17, 2))
    kps = np.concatenate([xy, np.full((17, 1), 2.0)], axis=1)
    x0, y0 = xy.min(0)
    w, h = xy.max(0) - xy.min(0)
    return {"id": image_id, "image_id": image_id, "category_id": 1, "keypoints": kps.ravel().tolist(),
            "num_keypoints": 17, "area": float(w * h), "bbox": [float(x0), float(y0), float(w), float(h)],
            "iscrowd": 0}


def ground_truth(n: int) -> COCO:
    rng = np.random.default_rng(0)
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(1, n + 1)],
                    "annotations": [person(i, rng) for i in range(1, n + 1)],
                    "categories": [{"id": 1, "name": "person", "keypoints": [str(j) for j in range(17)],
                                    "skeleton": []}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detection(coco: COCO, image_id: int, shift: float) -> list[dict]:
    kps = np.asarray(coco.imgToAnns[image_id][0]["keypoints"], float).reshape(17, 3)
    kps[:, :2] += shift
    kps[:, 2] = 0.9
    return [{"image_id": image_id, "category_id": 1, "keypoints": kps.ravel().tolist(), "score": 0.9}]


def controlled_records(coco: COCO, scores: list[tuple], good_at: list[tuple]) -> list[ImageRecord]:
    """Image i: EEL scores ``scores[i] = (score at 1, score at 2)``; its results are exact at the
    exits in ``good_at[i]`` and 25 px off elsewhere (layer 3 is always exact)."""
    records = []
    for i, (s1, s2) in enumerate(scores):
        image_id = i + 1
        results = {layer: ([] if layer in (1, 2) and (s1, s2)[layer - 1].detected == 0 else
                           detection(coco, image_id, 0.0 if layer in good_at[i] + (3,) else 25.0))
                   for layer in (1, 2, 3)}
        records.append(ImageRecord(image_id, (64, 64), {1: 1.0, 2: 2.0, 3: 3.0}, {1: s1, 2: s2}, results))
    return records


def brute_force(coco, records, budget):
    """Independent reference: every pair of candidate thresholds, the rule written out again."""
    ids = [r.image_id for r in records]

    def ap(exits):
        return evaluate_keypoints(coco, [e for r, x in zip(records, exits) for e in r.results[x]], image_ids=ids)["AP"]

    def exit_of(r, t1, t2):
        for layer, t in ((1, t1), (2, t2)):
            s = r.scores[layer]
            if s.detected == 0 or s.confidence >= t:
                return layer
        return 3

    reference = ap([3] * len(records))
    best = None
    values = {layer: sorted({r.scores[layer].confidence for r in records if r.scores[layer].confidence is not None}
                            | {NEVER}) for layer in (1, 2)}
    for t1, t2 in itertools.product(values[1], values[2]):
        exits = [exit_of(r, t1, t2) for r in records]
        cost = np.mean([r.gflops[x] for r, x in zip(records, exits)])
        if reference - ap(exits) <= budget + 1e-12 and (best is None or cost < best):
            best = cost
    return best


S = ExitScore
SCORES = [(S(5, 0.40), S(5, 0.45)), (S(5, 0.42), S(5, 0.45)), (S(5, 0.10), S(5, 0.35)),
          (S(5, 0.20), S(5, 0.38)), (S(5, 0.30), S(5, 0.15)), (S(5, 0.25), S(5, 0.10))]
GOOD_AT = [(1, 2), (1, 2), (2,), (2,), (), ()]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("budget", [0.0, 0.2, 1.0])
def test_search_finds_the_cheapest_setting_within_budget(budget):
    coco = ground_truth(len(SCORES))
    records = controlled_records(coco, SCORES, GOOD_AT)
    choice = search_thresholds(SettingEvaluator(coco, records), [1, 2], 3, budget)
    assert choice is not None and choice.ap_drop <= budget + 1e-12
    assert choice.gflops == pytest.approx(brute_force(coco, records, budget))
    if budget == 0.0:
        # easy images leave at layer 1, medium at 2, hard at 3: (1 + 1 + 2 + 2 + 3 + 3) / 6
        assert choice.exits == (1, 1, 2, 2, 3, 3) and choice.gflops == pytest.approx(2.0)
    if budget == 1.0:
        assert choice.exits == (1,) * 6


@pytest.mark.filterwarnings("ignore")
def test_search_over_records_read_back_from_a_journal(tmp_path):
    """The controlled records written to a journal (as calibrate's network pass writes them) and
    streamed back: the hand-known answer, and every static exit's AP is COCOeval's on its results."""
    coco = ground_truth(len(SCORES))
    records = controlled_records(coco, SCORES, GOOD_AT)
    journal = records_journal(tmp_path / "infer.json", {"records": "test"})
    journal.open(resume=False)
    for r in records:
        journal.add(r.to_dict())
    journal.close()
    evaluator = SettingEvaluator(coco, journal_records(journal))
    assert [r.image_id for r in evaluator.records] == [1, 2, 3, 4, 5, 6]
    assert all(r.results is None for r in evaluator.records)          # the people stay on disk
    choice = search_thresholds(evaluator, [1, 2], 3, 0.0)
    assert choice.exits == (1, 1, 2, 2, 3, 3) and choice.gflops == pytest.approx(2.0)
    for layer in (1, 2, 3):
        expected = evaluate_keypoints(coco, [e for r in records for e in r.results[layer]], image_ids=range(1, 7))
        assert evaluator.stats((layer,) * 6) == expected


@pytest.mark.filterwarnings("ignore")
def test_no_setting_when_the_n0_rule_alone_breaks_the_budget():
    """Image 1 detects nothing at EEL 1 (so it always stops there, with no people) although the
    last exit finds its person exactly: no threshold can keep AP."""
    coco = ground_truth(3)
    scores = [(S(0, None), S(5, 0.4)), (S(5, 0.3), S(5, 0.3)), (S(5, 0.2), S(5, 0.2))]
    records = controlled_records(coco, scores, [(), (), ()])
    assert search_thresholds(SettingEvaluator(coco, records), [1, 2], 3, 0.05) is None


def test_candidate_thresholds_are_observed_values_plus_never():
    records = [ImageRecord(i, (64, 64), {}, {1: S(1, c)}, {}) for i, c in enumerate([0.3, 0.1, None, 0.3, 0.2])]
    assert candidate_thresholds(records, 1, grid=8) == [0.1, 0.2, 0.3, NEVER]
    assert candidate_thresholds(records, 1, grid=2) == [0.1, 0.3, NEVER]


# --------------------------------------------------------------------------- #
# The CLI on a tiny model
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    model = root / "model.pt"
    net = tiny_net(seed=2)
    save_model_file(model, net, dataclasses.asdict(tiny_infer()))
    config = root / "config.json"
    config.write_text(json.dumps({
        "data": {"dataset": "synthetic", "synthetic": {"train_images": 0, "val_images": 5, "seed": 3, "min_size": 64,
                                                       "max_size": 96, "max_people": 2, "cache_dir": str(root / "cache")}},
        "infer": dataclasses.asdict(tiny_infer(eels=[]))}))     # no eels: calibrate uses c = (1, 1, 1)
    return model, config


@pytest.mark.filterwarnings("ignore")
def test_calibrate_writes_a_loadable_config_within_budget(setup, tmp_path, capsys):
    model, config = setup
    out, records_file = tmp_path / "infer.json", tmp_path / "records.json"
    budget = 0.05
    rc = main(["--checkpoint", str(model), "--config", str(config), "--out", str(out), "--records",
               str(records_file), "--max-ap-drop", str(budget), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    for row in ("layer 1 ", "layer 2 ", "layer 3 (final)", "dynamic (config)", "dynamic (calibrated)", "GFLOPs",
                "AP(M)", "AP(L)", "note: infer.eels has no entry for EEL 1"):
        assert row in stdout, row

    infer = load_config(out).infer
    assert infer.exit == "dynamic" and [e.layer for e in infer.eels] == [1, 2]
    assert all((e.c0, e.c1, e.c2) == (1.0, 1.0, 1.0) for e in infer.eels)
    saved = json.loads(records_file.read_text())
    thresholds = {int(k): v for k, v in saved["thresholds"].items()}
    assert thresholds == {e.layer: e.threshold for e in infer.eels}

    # The AP drop, recomputed from the recorded per-exit results with the rule written out again.
    records = saved["records"]
    assert len(records) == 5

    def exit_of(r):
        for layer in (1, 2):
            s = r["scores"][str(layer)]
            if s["detected"] == 0 or s["confidence"] >= thresholds[layer]:
                return layer
        return 3

    dataset = val_split(load_config(config).data)
    ids = [r["image_id"] for r in records]

    def ap(choose):
        return evaluate_keypoints(dataset.coco, [e for r in records for e in r["results"][str(choose(r))]],
                                  image_ids=ids)["AP"]

    assert ap(lambda r: 3) - ap(exit_of) <= budget + 1e-12
    assert any(r["results"]["3"] for r in records)                    # the loud net does decode people

    # Live dynamic inference with the written config takes exactly the replayed exits.
    predictor = Predictor.from_checkpoint(model, config=out)
    live = [predictor.predict(dataset.image_dir / dataset.coco.imgs[i]["file_name"]) for i in ids]
    assert [p.exit for p in live] == [exit_of(r) for r in records]
    for p, r in zip(live, records):
        assert p.gflops == pytest.approx(r["gflops"][str(p.exit)])
        assert len(p.people) == len(r["results"][str(p.exit)])


def test_calibrate_errors(setup, tmp_path, capsys):
    model, config = setup
    junk = tmp_path / "junk.pt"
    junk.write_text("x")
    out = tmp_path / "infer.json"
    assert main(["--checkpoint", str(junk), "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    assert main(["--checkpoint", str(model), "--config", str(tmp_path / "none.json"), "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "none.json" in err and not out.exists()
    assert main(["--checkpoint", str(model), "--config", str(config), "--out", str(out), "--records",
                 str(tmp_path / "infer.json.partial"), "--no-progress"]) == 2
    assert "is the journal of --out" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unreadable_val_images_are_left_out_with_one_warning(setup, tmp_path, capsys):
    model, config = setup
    raw = json.loads(config.read_text())
    raw["data"]["synthetic"]["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "c.json").write_text(json.dumps(raw))
    images = ensure_synthetic(load_config(tmp_path / "c.json").data.synthetic, progress=False).val_images
    (images / "000002.jpg").write_bytes(b"")
    records = tmp_path / "records.json"
    with pytest.warns(RuntimeWarning, match=r"^1 calibration image reads failed to decode .*000002\.jpg"):
        assert main(["--checkpoint", str(model), "--config", str(tmp_path / "c.json"), "--out",
                     str(tmp_path / "infer.json"), "--records", str(records), "--no-progress"]) == 0
    assert [r["image_id"] for r in json.loads(records.read_text())["records"]] == [1, 3, 4, 5]
    for f in images.iterdir():
        f.write_bytes(b"")
    assert main(["--checkpoint", str(model), "--config", str(tmp_path / "c.json"), "--out",
                 str(tmp_path / "infer2.json"), "--no-progress"]) == 2
    assert capsys.readouterr().err.endswith("none of the 5 val images of "
                                            f"{images.parent / 'annotations.json'} can be read\n")


def calibrate_args(model, config, out, *extra):
    return ["--checkpoint", str(model), "--config", str(config), "--out", str(out), "--records",
            str(out.with_suffix(".records.json")), "--max-ap-drop", "0.05", "--no-progress", *extra]


def kill_after(monkeypatch, images: int) -> list:
    """Make the val set's image reads raise KeyboardInterrupt (a kill) after ``images`` reads;
    returns the list of reads made."""
    from threempose.data.coco import CocoKeypoints
    reads, real = [], CocoKeypoints.decode

    def decode(self, index):
        reads.append(index)
        if len(reads) > images:
            raise KeyboardInterrupt
        return real(self, index)

    monkeypatch.setattr(CocoKeypoints, "decode", decode)
    return reads


@pytest.mark.filterwarnings("ignore")
def test_resume_after_a_kill_gives_the_uninterrupted_output(setup, tmp_path, capsys, monkeypatch):
    model, config = setup
    full = tmp_path / "full.json"
    assert main(calibrate_args(model, config, full)) == 0
    expected = capsys.readouterr().out.replace(str(full), "OUT")

    out = tmp_path / "resumed.json"
    with monkeypatch.context() as m:
        kill_after(m, 2)
        assert main(calibrate_args(model, config, out)) == 130
    journal = records_journal(out, {})
    assert not out.exists() and journal.path.is_file()
    assert [r["image_id"] for r in journal.entries()] == [1, 2]          # header line left out
    with open(journal.path, "a") as f:
        f.write('{"image_id": 3, "input_si')                             # the image in flight at the kill
    with monkeypatch.context() as m:
        reads = kill_after(m, 99)
        assert main(calibrate_args(model, config, out, "--resume")) == 0
    assert len(reads) == 3                                                # images 3, 4, 5 only
    assert capsys.readouterr().out.replace(str(out), "OUT") == expected
    assert out.read_text() == full.read_text()
    assert out.with_suffix(".records.json").read_text() == full.with_suffix(".records.json").read_text()
    assert not journal.path.exists()


@pytest.mark.filterwarnings("ignore")
def test_resume_refuses_the_journal_of_another_run(setup, tmp_path, capsys, monkeypatch):
    model, config = setup
    out = tmp_path / "infer.json"
    with monkeypatch.context() as m:
        kill_after(m, 2)
        assert main(calibrate_args(model, config, out)) == 130
    journal = records_journal(out, {}).path
    before = journal.read_bytes()
    other = tmp_path / "other.pt"
    save_model_file(other, tiny_net(seed=5), dataclasses.asdict(tiny_infer()))
    capsys.readouterr()
    assert main(calibrate_args(other, config, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {journal} holds another run's results (checkpoint_sha256: ")
    assert main(calibrate_args(model, config, out, "--resume", "--max-images", "4")) == 2
    assert "(max_images: 0 vs 4)" in capsys.readouterr().err
    raw = json.loads(config.read_text())
    raw["infer"]["short_side"] += 32
    (tmp_path / "c.json").write_text(json.dumps(raw))
    assert main(calibrate_args(model, tmp_path / "c.json", out, "--resume")) == 2
    assert f"(infer.short_side: {raw['infer']['short_side'] - 32} vs {raw['infer']['short_side']})" in capsys.readouterr().err
    assert journal.read_bytes() == before and not out.exists()
