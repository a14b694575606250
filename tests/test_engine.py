"""Run directories, atomic checkpoints, RNG capture/restore, metrics and the progress bar."""
from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from threempose.config import Config, config_from_dict, config_to_dict, load_config
from threempose.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from threempose.engine.metrics import MetricsLogger, read_metrics
from threempose.engine.progress import EpochProgress, progress_enabled
from threempose.engine.run_dir import RunDir, RunDirError
from threempose.engine.seeding import capture_rng_state, restore_rng_state, seed_everything


def _draw() -> tuple:
    """A few numbers from every global RNG (python, numpy legacy + normal cache, torch)."""
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(3).tolist(), torch.randn(2).tolist())


def _cfg(tmp_path, **run) -> Config:
    return config_from_dict({"run": {"out_dir": str(tmp_path / "runs"), "name": "small", **run}})


# --------------------------------------------------------------------------- #
# seeding
# --------------------------------------------------------------------------- #
def test_capture_restore_reproduces_python_numpy_torch(tmp_path):
    seed_everything(123)
    _draw()
    np.random.standard_normal()                 # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    first = _draw()
    # through a checkpoint file, as a resumed run does
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    _draw()                                     # move every RNG on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == first


def test_seed_everything_is_deterministic_and_seed_dependent():
    seed_everything(7)
    a = _draw()
    seed_everything(7)
    assert _draw() == a
    seed_everything(8)
    assert _draw() != a


# --------------------------------------------------------------------------- #
# checkpoints
# --------------------------------------------------------------------------- #
def test_checkpoint_round_trip_with_optimizer_and_scheduler(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [20, 25], 0.5)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    state = {"model": model.state_dict(), "optimizers": {"arch": opt.state_dict()},
             "schedulers": {"arch": sched.state_dict()}, "epoch": 3, "step_in_epoch": 17,
             "data_order": {"seed": 5, "position": 136}}
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt", required=("model", "epoch"))
    assert back["epoch"] == 3 and back["step_in_epoch"] == 17 and back["data_order"]["position"] == 136
    assert torch.equal(back["model"]["weight"], model.weight.detach())
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    opt2.load_state_dict(back["optimizers"]["arch"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match=r"lacks \['arch'\]"):
        load_checkpoint(tmp_path / "c.pt", required=("arch",))


def test_exception_mid_save_keeps_previous_last_pt(tmp_path, monkeypatch):
    run = RunDir.create(_cfg(tmp_path))
    run.save_checkpoint({"epoch": 1, "w": torch.arange(4.0)})
    before = run.last_checkpoint.read_bytes()

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip file")              # a partial write, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        run.save_checkpoint({"epoch": 2, "w": torch.zeros(4)})
    monkeypatch.undo()
    assert run.last_checkpoint.read_bytes() == before
    assert load_checkpoint(run.last_checkpoint)["epoch"] == 1
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["last.pt"]   # no temp left


def test_epoch_checkpoint_survives_later_last_pt_saves(tmp_path):
    run = RunDir.create(_cfg(tmp_path))
    run.save_checkpoint({"epoch": 0, "step_in_epoch": 0}, epoch=0)
    assert load_checkpoint(run.epoch_checkpoint(0))["epoch"] == 0
    assert load_checkpoint(run.last_checkpoint)["epoch"] == 0
    run.save_checkpoint({"epoch": 1, "step_in_epoch": 5})     # mid-epoch: last.pt only
    assert load_checkpoint(run.last_checkpoint)["step_in_epoch"] == 5
    assert load_checkpoint(run.epoch_checkpoint(0))["step_in_epoch"] == 0
    assert run.epoch_checkpoint(0).name == "epoch_000.pt"


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a threempose checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "ok.pt", {"epoch": 0})
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:60])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", {"format": "mine"})


# --------------------------------------------------------------------------- #
# run directory
# --------------------------------------------------------------------------- #
def test_run_dir_layout_and_config_round_trip(tmp_path):
    cfg = _cfg(tmp_path)
    a, b = RunDir.create(cfg), RunDir.create(cfg)             # same second: distinct directories
    assert a.path != b.path
    assert a.path.parent == tmp_path / "runs" and a.path.name.startswith("small-")
    assert a.checkpoints_dir.is_dir() and a.arch_dir.is_dir()
    assert config_to_dict(load_config(a.config_path)) == config_to_dict(cfg)
    assert json.loads(a.write_json("genotype.json", {"cells": []}).read_text()) == {"cells": []}
    assert json.loads(a.write_arch_snapshot("epoch_000", {"alpha": [[0.5]]}).read_text()) == {"alpha": [[0.5]]}
    with pytest.raises(RunDirError, match="not empty"):
        RunDir.create(cfg, path=a.path)


def test_resume_accepts_same_config_and_allow_listed_changes(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunDir.create(cfg, path=tmp_path / "r")
    assert RunDir.open_for_resume(run.path, cfg).path == run.path
    quiet = _cfg(tmp_path, progress=False)
    assert RunDir.open_for_resume(run.path, quiet).path == run.path


def test_resume_with_different_config_names_the_key(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunDir.create(cfg, path=tmp_path / "r")
    other = config_from_dict({"run": {"out_dir": cfg.run.out_dir, "name": "small"},
                              "search": {"epochs": 3}})
    with pytest.raises(RunDirError, match=r"different config: key search\.epochs differs \(35 vs 3\)"):
        RunDir.open_for_resume(run.path, other)
    two = config_from_dict({"run": {"out_dir": cfg.run.out_dir, "name": "small", "seed": 4},
                            "loss": {"teacher_weight": 0.0}})
    with pytest.raises(RunDirError, match=r"key loss\.teacher_weight differs \(1\.0 vs 0\.0\) "
                                          r"\(and 1 more: run\.seed\)"):
        RunDir.open_for_resume(run.path, two)
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir.open_for_resume(tmp_path / "missing", cfg)


# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #
def test_metrics_jsonl_lines_parse_and_rank_nonzero_writes_nothing(tmp_path):
    run = RunDir.create(_cfg(tmp_path))
    with MetricsLogger(run, rank=0, tensorboard=False) as log:
        log.log(1, loss=torch.tensor(0.25), gflops=np.float32(16.5), tau=10)
        log.log(2, loss=float("nan"), lr=1e-3)
    lines = run.metrics_path.read_text().splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]                 # strict JSON per line
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 0.25 and rows[0]["gflops"] == 16.5
    assert rows[0]["tau"] == 10.0 and isinstance(rows[0]["time"], float)
    assert rows[1]["loss"] is None and rows[1]["lr"] == 1e-3
    assert read_metrics(run.path) == rows

    other = RunDir(tmp_path / "rank1")
    MetricsLogger(other, rank=1).log(1, loss=1.0)
    assert not other.path.exists()
    with pytest.raises(ValueError, match="must be a scalar"):
        MetricsLogger(run, tensorboard=False).log(3, loss=torch.ones(2))


def test_metrics_resume_purges_steps_to_be_rerun(tmp_path):
    run = RunDir.create(_cfg(tmp_path))
    with MetricsLogger(run, tensorboard=False) as log:
        for s in range(6):
            log.log(s, loss=float(s))
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 6, "lo')                              # torn line of a killed process
    with MetricsLogger(run, tensorboard=False, purge_from_step=4) as log:
        log.log(4, loss=40.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(run.path)] == \
        [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_metrics_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir.create(_cfg(tmp_path))
    with MetricsLogger(run) as log:
        log.log(3, **{"loss/total": 0.5})
        log.log(4, **{"loss/total": 0.25})
    acc = EventAccumulator(str(run.tensorboard_dir))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [(3, 0.5), (4, 0.25)]


# --------------------------------------------------------------------------- #
# progress
# --------------------------------------------------------------------------- #
class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_enabled_only_on_rank0_tty_with_progress_on():
    assert progress_enabled(True, 0, _FakeTTY())
    assert not progress_enabled(True, 0, io.StringIO())         # not a terminal (CI, a log file)
    assert not progress_enabled(False, 0, _FakeTTY())
    assert not progress_enabled(True, 1, _FakeTTY())


def test_progress_bar_shows_losses_gflops_and_images_per_second():
    now = [100.0]
    out = _FakeTTY()
    bar = EpochProgress(epoch=2, epochs=35, steps=10, enabled=True, stream=out, clock=lambda: now[0])
    now[0] = 102.0
    bar.update(images=8, losses={"total": torch.tensor(0.5), "heatmap": 0.001}, gflops=16.63)
    assert bar.images_per_second() == pytest.approx(4.0)
    bar.close()                                                 # draws the final state
    text = out.getvalue()
    for piece in ("epoch 3/35", "1/10", "total=0.5", "heatmap=0.001", "GFLOPs=16.63", "img/s=4.0"):
        assert piece in text, (piece, text)
    silent = EpochProgress(epoch=0, epochs=1, steps=3, enabled=False, stream=out)
    silent.update(images=4, losses={"total": 1.0})
    assert silent.bar is None and silent.images == 4
