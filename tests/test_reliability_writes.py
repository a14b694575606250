"""Writes the disk refuses (a fake full disk: the file object's write raises ENOSPC) and Ctrl-C:
one line naming the path and the cause, the previous file intact, no temporary file or empty
folder left, a checkpoint failure keeps the run resumable; Ctrl-C exits 130 with the resume hint."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import threempose.util.files as files
from threempose.config import load_config
from threempose.data import synthetic
from threempose.engine.checkpoint import CheckpointWriteError, load_checkpoint
from threempose.engine.distributed import DistContext
from threempose.nas.supernet import Supernet
from threempose.training.train_job import TrainJob
from threempose.util.errors import user_error_message
from threempose.util.files import atomic_open, atomic_torch_save, atomic_write_json

from test_reliability_validation import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


class _FullDisk:
    """A file object over ``f`` whose writes fail with ENOSPC once ``budget`` bytes are used."""

    def __init__(self, f, budget):
        self._f, self._left = f, budget

    def write(self, data):
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(predicate, budget=0)``: atomic writes whose temporary file name satisfies
    ``predicate`` (default: all) get a disk that is full after ``budget`` bytes."""
    def install(predicate=lambda name: True, budget=0):
        real_mkstemp, real_fdopen, names = files.tempfile.mkstemp, os.fdopen, {}

        def mkstemp(*args, **kwargs):
            fd, name = real_mkstemp(*args, **kwargs)
            names[fd] = name
            return fd, name

        def fdopen(fd, *args, **kwargs):
            f = real_fdopen(fd, *args, **kwargs)
            return _FullDisk(f, budget) if predicate(names.get(fd, "")) else f
        monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(files.os, "fdopen", fdopen)
    return install


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def test_a_full_disk_names_the_path_and_keeps_the_previous_file(tmp_path, full_disk):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"old": 1})
    full_disk(budget=3)
    with pytest.raises(OSError) as caught:
        atomic_write_json(target, {"new": list(range(100))})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert user_error_message(caught.value) == f"cannot write {target}: No space left on device"
    assert json.loads(target.read_text()) == {"old": 1} and _leftovers(tmp_path) == []


def test_a_torch_save_on_a_full_disk_is_the_same_one_line(tmp_path, full_disk):
    full_disk(budget=64)
    with pytest.raises(OSError) as caught:                  # torch.save wraps it in a RuntimeError
        atomic_torch_save(tmp_path / "ckpt.pt", {"w": torch.zeros(1000)})
    assert caught.value.filename == str(tmp_path / "ckpt.pt")
    assert user_error_message(caught.value) == f"cannot write {tmp_path / 'ckpt.pt'}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_no_empty_folders_are_left_behind(tmp_path, full_disk):
    (tmp_path / "kept").mkdir()
    full_disk()
    with pytest.raises(OSError), atomic_open(tmp_path / "kept" / "a" / "b" / "c.png", "wb") as f:
        f.write(b"png bytes")
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


def test_a_command_on_a_full_disk_is_one_line_and_exit_2(tmp_path, full_disk, capsys):
    full_disk(lambda name: "annotations" in name)           # the last file the command writes
    status = synthetic.main(["--out", str(tmp_path / "data"), "--images", "3", "--min-size", "64",
                             "--max-size", "64"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err                  # above: the progress bar
    assert err.splitlines()[-1] == f"error: cannot write {tmp_path / 'data' / 'annotations.json'}: No space left on device"
    assert list(tmp_path.iterdir()) == []                    # nothing half-written


def _train_config(tmp_path, epochs):
    return tiny_run_config(tmp_path, epochs, val_images=2, val_ap_images=0)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last_one(tmp_path, full_disk):
    cfg = load_config(_train_config(tmp_path, epochs=2))
    full_disk(lambda name: "epoch_002" in name, budget=100)
    job = TrainJob(cfg, DistContext(), Supernet(cfg.model).derive())
    with pytest.raises(CheckpointWriteError) as caught:
        job.run()
    run = job.run_dir.path
    assert str(caught.value) == (f"cannot write {run / 'checkpoints' / 'epoch_002.pt'}: No space left on "
                                 f"device; epoch 2 is lost, the earlier checkpoints are intact: free space "
                                 f"and resume with --resume {run}")
    assert load_checkpoint(job.run_dir.last_checkpoint)["epoch"] == 1
    assert _leftovers(run) == []


@pytest.mark.slow     # a search subprocess, interrupted
def test_ctrl_c_is_one_line_exit_130_and_the_last_checkpoint_is_whole(tmp_path):
    config = _train_config(tmp_path, epochs=100_000)    # far more than it can finish before the signal
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C handler:
    # give the child the default disposition a terminal's foreground process has.
    proc = subprocess.Popen([sys.executable, "-m", "threempose.search", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((tmp_path / "runs").glob("*/checkpoints/epoch_001.pt")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    run = next((tmp_path / "runs").iterdir())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.splitlines()[-1] == f"interrupted: resume with --resume {run}"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] >= 1
    assert _leftovers(run) == []
