"""The random-baseline protocol: matched sampling, statistics, a tiny end-to-end run and resume."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from threempose import random_baseline
from threempose.config import load_config
from threempose.engine.distributed import DistContext
from threempose.engine.metrics import read_metrics
from threempose.nas.genotype import Genotype
from threempose.nas.random_genotype import MatchedSamplingError, genotype_cost, sample_matched_genotypes
from threempose.training.baseline_report import bootstrap_difference, markdown_table, summarize
from threempose.training.random_baseline import BaselineError, BaselineSettings, RandomBaseline

ROOT = Path(__file__).resolve().parents[1]

DATA = {"input_size": 64, "batch_size": 4,
        "synthetic": {"train_images": 16, "val_images": 3, "min_size": 64, "max_size": 80, "max_people": 2}}
MODEL = {"rows": 2, "layers": 3, "channels": 4, "eels": [2], "stem_blocks": 0}


def write_config(path: Path, extends: str, cache: Path, **sections) -> Path:
    raw = {"extends": str(ROOT / "configs" / extends),
           "run": {"out_dir": str(path.parent / "runs"), "log_every": 1, "val_ap_images": 0, "progress": False},
           "data": {**DATA, "synthetic": {**DATA["synthetic"], "cache_dir": str(cache)}},
           "infer": {"short_side": 64, "eels": []}, **sections}
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A 1-epoch search of a 2x3 fabric (C = 4) and a 1-epoch training, 64 px, 16 images."""
    folder = tmp_path_factory.mktemp("baseline-configs")
    cache = tmp_path_factory.mktemp("baseline-synthetic")
    search = write_config(folder / "search.json", "search-small.json", cache, model=MODEL,
                          search={"epochs": 1, "arch_lr_milestones": []})
    train = write_config(folder / "train.json", "train-small.json", cache, model={"stem_blocks": 0},
                         train={"epochs": 1, "lr_milestones": []})
    return search, train


@pytest.fixture(scope="module")
def finished(configs, tmp_path_factory):
    """The tiny protocol (K = 2, one seed) run once through the command."""
    search, train = configs
    out = tmp_path_factory.mktemp("protocol") / "baseline"
    status = random_baseline.main(["--search-config", str(search), "--train-config", str(train),
                                   "--random", "2", "--seeds", "1", "--out", str(out)])
    assert status == 0
    return out


def model_config(configs):
    cfg = load_config(configs[0])
    cfg.model.stem_blocks = 0
    return cfg.model


# ---- rejection sampling ------------------------------------------------------ #
def test_matched_genotypes_lie_in_the_window_are_distinct_and_reproducible(configs):
    model = model_config(configs)
    first = sample_matched_genotypes(model, (64, 64), 0.02, 3, tolerance=0.5, max_draws=200, seed=3)
    again = sample_matched_genotypes(model, (64, 64), 0.02, 3, tolerance=0.5, max_draws=200, seed=3)
    assert [c.genotype.to_json() for c in first] == [c.genotype.to_json() for c in again]
    assert len({c.genotype.to_json() for c in first}) == 3
    for c in first:
        assert 0.01 <= c.gflops <= 0.03
        assert c.gflops == pytest.approx(genotype_cost(c.genotype, (64, 64), 17, 0).gflops)
        assert (c.genotype.rows, c.genotype.layers, c.genotype.eels) == (2, 3, [2])


def test_matched_sampling_names_the_range_it_reached(configs):
    model = model_config(configs)
    with pytest.raises(MatchedSamplingError, match=r"only 0 of 2 .* in 5 draws; the draws reached "
                                                   r"[0-9.e-]+ to [0-9.e-]+ GFLOPs"):
        sample_matched_genotypes(model, (64, 64), 1000.0, 2, max_draws=5)


# ---- statistics ---------------------------------------------------------------- #
def test_bootstrap_matches_the_enumerated_distribution():
    # searched [0.5] against random means [0.1, 0.3]: the resampled random mean is 0.1, 0.2 or
    # 0.3 with probability 1/4, 1/2, 1/4, so the difference is 0.4, 0.3 or 0.2 likewise.
    assert bootstrap_difference([0.5], [0.1, 0.3], samples=20000, level=0.95) == pytest.approx((0.2, 0.4))
    assert bootstrap_difference([0.5], [0.1, 0.3], samples=20000, level=0.4) == pytest.approx((0.3, 0.3))
    assert bootstrap_difference([0.5], [0.1, 0.3], seed=7) == bootstrap_difference([0.5], [0.1, 0.3], seed=7)


def test_summary_by_hand():
    s = summarize([0.30, 0.40], [[0.1, 0.3], [0.5, 0.5], [0.2, 0.2]], samples=2000)
    # seed means: searched 0.35; random 0.2, 0.5, 0.2 -> mean 0.3, sample std sqrt(0.06 / 2)
    assert s["searched_mean"] == pytest.approx(0.35)
    assert s["random_mean"] == pytest.approx(0.3)
    assert s["random_std"] == pytest.approx(np.sqrt(0.03))
    assert (s["rank"], s["of"]) == (2, 4)
    assert s["difference"] == pytest.approx(0.05)
    low, high = s["ci"]
    assert 0.35 - 0.5 - 1e-9 <= low < 0.05 < high <= 0.35 - 0.2 + 0.05 + 1e-9
    table = markdown_table({"name": "searched", "gflops": 1.0, "params_m": 0.1, "ap": [0.3, 0.4]},
                           [{"name": f"random-0{i}", "gflops": 1.0, "params_m": 0.1, "ap": ap}
                            for i, ap in enumerate([[0.1, 0.3], [0.5, 0.5], [0.2, 0.2]])], s)
    assert "| **searched** | 1.0000 | 0.1000 | 0.300 | 0.400 | 0.350 |" in table
    assert "rank 2 of 4" in table


# ---- the protocol ---------------------------------------------------------------- #
def test_tiny_protocol_end_to_end(finished):
    report = json.loads((finished / "baseline.json").read_text())
    searched = report["searched"]
    assert Genotype.from_dict(searched["genotype"]).to_dict() == \
        Genotype.load(finished / "search" / "genotype.json").to_dict()
    assert len(report["random"]) == 2
    names = ["searched", "random-01", "random-02"]
    for entry, name in zip([searched, *report["random"]], names):
        assert entry["name"] == name and entry["seeds"] == [0] and len(entry["ap"]) == 1
        assert abs(entry["gflops"] - searched["gflops"]) <= 0.05 * searched["gflops"] + 1e-12
        result = json.loads((finished / "runs" / f"{name}-seed0" / "result.json").read_text())
        assert result["ap"] == entry["ap"][0] and 0.0 <= result["ap"] <= 1.0
        assert (finished / "runs" / f"{name}-seed0" / "model.pt").is_file()
    assert len({json.dumps(e["genotype"]) for e in [searched, *report["random"]]}) == 3
    expected = summarize(searched["ap"], [e["ap"] for e in report["random"]])
    assert report["summary"]["ci"] == pytest.approx(expected["ci"])
    assert {k: v for k, v in report["summary"].items() if k != "ci"} == \
        pytest.approx({k: v for k, v in expected.items() if k != "ci"})
    assert "| **searched** |" in (finished / "baseline.md").read_text()
    assert Image.open(finished / "baseline.png").size == (720, 480)


def test_resume_keeps_finished_trainings_and_redoes_the_killed_ones(finished, configs, capsys):
    runs = finished / "runs"
    kept = (runs / "searched-seed0" / "result.json").read_text()
    mtime = (runs / "searched-seed0" / "result.json").stat().st_mtime_ns
    (runs / "random-02-seed0" / "result.json").unlink()      # killed after training, before its result
    shutil.rmtree(runs / "random-01-seed0")                    # killed while its run directory was made
    (runs / "random-01-seed0" / "checkpoints").mkdir(parents=True)
    (finished / "baseline.json").unlink()
    lines = []
    settings = BaselineSettings(search_config=str(configs[0]), train_config=str(configs[1]), random=2, seeds=1)
    report = RandomBaseline(finished, settings, DistContext(), say=lines.append).run(resume=True)
    assert "[baseline] 1 of 3 trainings already finished; kept" in lines
    started = [line for line in lines if line.startswith("[baseline] training ") and "done" not in line]
    assert started == [f"[baseline] training {i}/3: {name} seed 0 ({entry['gflops']:.4g} GFLOPs) in "
                       f"{runs / (name + '-seed0')}"
                       for i, name, entry in ((2, "random-01", report["random"][0]),
                                              (3, "random-02", report["random"][1]))]
    assert not any("searching" in line for line in lines)
    assert (runs / "searched-seed0" / "result.json").read_text() == kept
    assert (runs / "searched-seed0" / "result.json").stat().st_mtime_ns == mtime
    for name in ("random-01", "random-02"):
        assert json.loads((runs / f"{name}-seed0" / "result.json").read_text())["ap"] == \
            report["random"][int(name[-1]) - 1]["ap"][0]
    assert (finished / "baseline.json").is_file()
    # random-01 trained again from scratch: its epoch line shows the epoch's mean heatmap loss
    heatmap = [row["heatmap"] for row in read_metrics(runs / "random-01-seed0" / "metrics.jsonl") if "heatmap" in row]
    assert len(heatmap) == 4                                    # 16 images / batch 4, logged every step
    err = capsys.readouterr().err
    assert "[threempose] epoch 1/1 done in" in err and f"heatmap loss {np.mean(heatmap):.4g}" in err
    assert "already ran all 1 epochs" in err                    # random-02 was not trained again


def test_resume_refuses_other_arguments_and_a_fresh_run_a_used_directory(finished, configs, capsys):
    settings = BaselineSettings(search_config=str(configs[0]), train_config=str(configs[1]), random=3, seeds=1)
    with pytest.raises(BaselineError, match="random was 2, now 3"):
        RandomBaseline(finished, settings, DistContext()).run(resume=True)
    train, original = configs[1], configs[1].read_text()
    try:
        train.write_text(original.replace('"epochs": 1', '"epochs": 2'))
        settings.random = 2
        with pytest.raises(BaselineError, match="the train config now reads differently"):
            RandomBaseline(finished, settings, DistContext()).run(resume=True)
    finally:
        train.write_text(original)
    argv = ["--search-config", str(configs[0]), "--train-config", str(configs[1]), "--random", "2",
            "--seeds", "1", "--out", str(finished)]
    assert random_baseline.main(argv) == 2
    assert "is not an empty directory; pass --resume" in capsys.readouterr().err
