"""Search and training runs end to end on tiny synthetic data: strategies, outputs, resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

import threempose.training.losses as losses_module
from threempose.config import load_config
from threempose.engine.distributed import DistContext
from threempose.engine.metrics import MetricsLogger, read_metrics
from threempose.engine.run_dir import RunDir
from threempose.nas.model_file import load_model_file
from threempose.nas.supernet import Supernet
from threempose.nas.genotype import Genotype
from threempose.training.losses import teacher_loss
from threempose.training.search_job import SearchJob
from threempose.nas.dyn_egs import step_seed
from threempose.training.train_job import TrainJob

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, cache: Path, **sections) -> Path:
    """A search config a 2-core CPU runs in seconds (64x64 crops, a 2x3 fabric, C=4)."""
    raw = {
        "extends": str(ROOT / "configs" / "search-small.json"),
        "run": {"out_dir": str(tmp_path / "runs"), "log_every": 1, "val_ap_images": 2, "progress": False},
        "data": {"input_size": 64, "batch_size": 4,
                 "synthetic": {"train_images": 24, "val_images": 4, "min_size": 64, "max_size": 96,
                               "max_people": 2, "cache_dir": str(cache)}},
        "model": {"rows": 2, "layers": 3, "channels": 4, "eels": [2], "stem_blocks": 0},
        "search": {"epochs": 2, "arch_lr_milestones": [1]},
        "infer": {"short_side": 64},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic-cache")


def run_search(config: Path, resume=None):
    job = SearchJob(load_config(config), DistContext())
    return job, job.run(resume=resume)


def arch_tensors(job):
    return [p.detach().clone() for p in job.supernet.arch_parameters()]


def complete_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_step_seed_depends_only_on_run_seed_step_and_phase():
    assert step_seed(3, 10, 0) == step_seed(3, 10, 0)
    assert len({step_seed(3, 10, 0), step_seed(3, 10, 1), step_seed(3, 11, 0), step_seed(4, 10, 0)}) == 4


def test_bilevel_search_writes_every_output_and_updates_arch(tmp_path, cache):
    job, artifacts = run_search(tiny_config(tmp_path, cache))
    run = job.run_dir
    genotype = Genotype.load(artifacts["genotype"])
    assert genotype.rows == 2 and genotype.layers == 3
    profile = json.loads(Path(artifacts["profile"]).read_text())
    assert profile["gflops"] > 0 and [e["layer"] for e in profile["exits"]] == [2, 3]
    assert (run.checkpoints_dir / "epoch_001.pt").is_file() and run.last_checkpoint.is_file()
    assert sorted(p.name for p in run.arch_dir.iterdir())[:2] == ["epoch_001.json", "epoch_002.json"]
    rows = read_metrics(run.metrics_path)
    steps = [r for r in rows if "total" in r]
    for key in ("heatmap", "push", "pull", "flops", "gflops", "tau", "lr", "arch_lr", "images_per_s"):
        assert key in steps[-1], key
    assert any("val/AP" in r for r in rows)
    assert steps[0]["tau"] > steps[-1]["tau"]                        # the temperature anneals
    # (each architecture step's size and direction: test_bilevel_steps_each_move_only_their_own_parameters)
    assert list(run.tensorboard_dir.iterdir())


def test_random_strategy_keeps_the_architecture_fixed(tmp_path, cache):
    job = SearchJob(load_config(tiny_config(tmp_path, cache, search={"strategy": "random", "epochs": 1})),
                    DistContext())
    before = arch_tensors(job)
    job.run()
    assert all(torch.equal(a, b) for a, b in zip(before, arch_tensors(job)))
    assert any(float(a.abs().sum()) > 0 for a in before)             # a random draw, not zeros


def test_synchronous_strategy_updates_arch_with_the_weights(tmp_path, cache):
    job = SearchJob(load_config(tiny_config(tmp_path, cache, search={"strategy": "synchronous", "epochs": 1})),
                    DistContext())
    assert len(job.weights.optimizer.param_groups) == 2 and job.opt.arch_opt is None
    first = []
    step = job.weights.step

    def recorded(loss):
        if not first:           # the first step: its gradient, and alpha/beta/m before and after
            before = arch_tensors(job)
            grads = torch.autograd.grad(loss, job.arch_params, retain_graph=True, allow_unused=True)
            step(loss)
            first.append((before, arch_tensors(job), grads))
        else:
            step(loss)

    job.weights.step = recorded
    job.run()
    # The weight optimizer's Adam moves alpha/beta/m (its group 1, lr search.arch_lr) by
    # ~-arch_lr * sign(g) at its first step; gradient clipping scales g, not its sign.
    before, after, grads = first[0]
    lr = job.cfg.search.arch_lr
    for a, b, g in zip(before, after, grads):
        g = torch.zeros_like(a) if g is None else g
        big = g.abs() > 1e-5
        torch.testing.assert_close((b - a)[big], -lr * g.sign()[big], rtol=1e-2, atol=0)
        assert torch.equal(b[g == 0], a[g == 0])
    assert sum(int((g.abs() > 1e-5).sum()) for g in grads if g is not None) > 0


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path, cache):
    cfg = load_config(tiny_config(tmp_path, cache, loss={"teacher_weight": 1.0,
                                                         "teacher": {"checkpoint": str(tmp_path / "nope.pth")}}))
    with pytest.raises(FileNotFoundError, match="nope.pth.*teacher_weight"):
        SearchJob(cfg, DistContext())


def teacher_reference(student, teacher) -> float:
    """``1 - mean_i max_j Pearson(pdist(teacher_i), pdist(student_j))`` in float64 numpy/scipy."""
    rs = [pdist(f.reshape(len(f), -1)) for f in student]
    rt = [pdist(f.reshape(len(f), -1)) for f in teacher]
    return 1.0 - float(np.mean([max(np.corrcoef(t, r)[0, 1] for r in rs) for t in rt]))


def test_teacher_loss_of_hand_computed_rdms():
    """Three images with one feature each: the student [0, 1, 3] has the RDM (1, 3, 2). A teacher
    [0, 2, 6] has the RDM (2, 6, 4), a multiple: Pearson 1, loss 0. A teacher [0, 1, 2] has
    (1, 2, 1): centred (-1, 1, 0) and (-1/3, 2/3, -1/3), Pearson 1 / (sqrt(2) sqrt(2/3)) =
    sqrt(3)/2. Two teachers average, and each takes its best student. (The loss comes back in
    float32: 1e-6 is its rounding, measured 1.6e-8 on sqrt(3)/2.)"""
    col = lambda *v: torch.tensor(v, dtype=torch.float64)[:, None]     # noqa: E731  [3, 1]
    student = col(0.0, 1.0, 3.0)
    assert teacher_loss([student], [col(0.0, 2.0, 6.0)]).item() == pytest.approx(0.0, abs=1e-6)
    assert teacher_loss([student], [student]).item() == pytest.approx(0.0, abs=1e-6)
    assert teacher_loss([student], [col(0.0, 1.0, 2.0)]).item() == pytest.approx(1 - 3 ** 0.5 / 2, abs=1e-6)
    both = teacher_loss([student, col(0.0, 1.0, 2.0)], [col(0.0, 2.0, 6.0), col(5.0, 6.0, 7.0)])
    assert both.item() == pytest.approx(0.0, abs=1e-6)                 # each teacher finds its twin
    mixed = teacher_loss([student], [col(0.0, 2.0, 6.0), col(0.0, 1.0, 2.0)])
    assert mixed.item() == pytest.approx(1 - (1 + 3 ** 0.5 / 2) / 2, abs=1e-6)


def test_search_with_a_threempose_teacher(tmp_path, cache, monkeypatch):
    """The teacher loss runs with a trained threempose model as the teacher: every step's loss is
    the float64 scipy reference of the features it was given, and the logged value is the
    weight step's."""
    config = tiny_config(tmp_path, cache, search={"epochs": 1})
    _, artifacts = run_search(config)
    train_job = TrainJob(load_config(config, overrides={"train": {"epochs": 1}}), DistContext(),
                         Genotype.load(artifacts["genotype"]))
    model = train_job.run()["model"]
    cfg = load_config(config, overrides={"loss": {"teacher_weight": 1.0, "teacher": {
        "model": "threempose", "checkpoint": str(model)}}})
    job = SearchJob(cfg, DistContext())
    calls = []

    def recorded(student_feats, teacher_feats):
        loss = teacher_loss(student_feats, teacher_feats)
        calls.append(([f.detach().double().numpy() for f in student_feats],
                      [f.detach().double().numpy() for f in teacher_feats], float(loss.detach())))
        return loss

    monkeypatch.setattr(losses_module, "teacher_loss", recorded)
    job.run()
    rows = [r for r in read_metrics(job.run_dir.metrics_path) if "teacher" in r]
    # Each step computes the loss twice, on the arch batch then on the weight batch; the weight
    # step's terms are the ones logged.
    assert rows and len(calls) == 2 * len(rows)
    assert len(calls[0][0]) == 6 and len(calls[0][1]) == 6               # 2x3 cells, student and teacher
    for student, teacher, got in calls:
        assert got == pytest.approx(teacher_reference(student, teacher), abs=1e-5)   # float32 vs float64
    assert [r["teacher"] for r in rows] == pytest.approx([c[2] for c in calls[1::2]], abs=1e-6)


def test_train_writes_a_loadable_model_and_checks_the_genotype_on_resume(tmp_path, cache):
    config = tiny_config(tmp_path, cache, train={"epochs": 2, "lr_milestones": [1]})
    cfg = load_config(config)
    small = Supernet(cfg.model).derive()
    job = TrainJob(load_config(config), DistContext(), small)
    artifacts = job.run()
    net, infer = load_model_file(artifacts["model"])
    assert net.genotype.to_dict() == small.prune().to_dict() and infer["short_side"] == 64
    assert job.scheduler.get_last_lr()[0] == pytest.approx(1e-4)     # /10 at epoch 1
    other = Genotype.from_dict({**small.to_dict(), "channels": 8})
    with pytest.raises(RuntimeError, match="different genotype"):
        TrainJob(load_config(config), DistContext(), other).run(resume=str(job.run_dir.path))


@pytest.mark.slow     # three search subprocesses, one killed and resumed
def test_killed_search_resumes_to_the_same_result(tmp_path, cache):
    """SIGKILL mid-epoch, --resume: same genotype and final metrics as an uninterrupted run."""
    config = tiny_config(tmp_path, cache, search={"epochs": 3, "arch_lr_milestones": [2]},
                         data={"synthetic": {"train_images": 48, "val_images": 4, "min_size": 64,
                                             "max_size": 96, "max_people": 2, "cache_dir": str(cache)}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "threempose" / "search.py"), "--config", str(config)]
    full = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    full_dir = Path(full.stdout.split("run directory: ")[1].strip())

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs"
    deadline = time.time() + 300
    killed_dir = None
    while time.time() < deadline and killed_dir is None:
        found = [d for d in runs.iterdir() if d != full_dir and (d / "checkpoints" / "epoch_001.pt").exists()]
        if found:
            killed_dir = found[0]
            # Let epoch 2 start, then kill mid-epoch.
            start = complete_lines(killed_dir / "metrics.jsonl")
            while complete_lines(killed_dir / "metrics.jsonl") < start + 2 and proc.poll() is None:
                time.sleep(0.05)
        time.sleep(0.05)
    assert killed_dir is not None and proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "genotype.json").exists()

    resumed = subprocess.run(cmd + ["--resume", str(killed_dir)], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    assert Genotype.load(killed_dir / "genotype.json").to_dict() == Genotype.load(full_dir / "genotype.json").to_dict()

    def last_values(run_dir):
        rows = read_metrics(run_dir / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in rows]

    assert last_values(killed_dir) == last_values(full_dir)


def test_resume_with_a_different_config_names_the_key(tmp_path, cache):
    config = tiny_config(tmp_path, cache, search={"epochs": 1})
    job, _ = run_search(config)
    cfg = load_config(config, overrides={"search": {"epochs": 2}})
    with pytest.raises(RuntimeError, match="search.epochs"):
        SearchJob(cfg, DistContext()).run(resume=str(job.run_dir.path))


def metric_values(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")}
            for r in read_metrics(run_dir / "metrics.jsonl")]


def test_resume_of_a_finished_run_and_from_a_truncated_last_pt(tmp_path, cache, capsys):
    """A finished run resumed says so (no "epoch 3/2"); a truncated last.pt (and its epoch file)
    falls back to the previous epoch's checkpoint and ends as the uninterrupted run did."""
    config = tiny_config(tmp_path, cache)
    job, _ = run_search(config)
    run = job.run_dir.path
    genotype, metrics = Genotype.load(run / "genotype.json").to_dict(), metric_values(run)
    capsys.readouterr()

    run_search(config, resume=str(run))
    err = capsys.readouterr().err
    assert "already ran all 2 epochs" in err and "epoch 3/2" not in err
    assert metric_values(run) == metrics

    for name in ("last.pt", "epoch_002.pt"):             # last.pt is a link to epoch_002.pt
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:1000])
    resumed, _ = run_search(config, resume=str(run))
    err = capsys.readouterr().err
    assert f"resuming from {run / 'checkpoints' / 'epoch_001.pt'} instead" in err
    assert "resuming" in err and "at epoch 2/2" in err
    assert Genotype.load(run / "genotype.json").to_dict() == genotype
    assert metric_values(run) == metrics                  # the same steps, once each


def test_run_killed_before_its_first_checkpoint_starts_over_cleanly(tmp_path, cache, capsys):
    config = tiny_config(tmp_path, cache, search={"epochs": 1})
    reference, _ = run_search(config)
    # What a run killed mid-epoch 1 leaves: config, some metric lines, a TensorBoard file and a
    # temporary file of an interrupted write.
    killed = RunDir.create(load_config(config))
    with MetricsLogger(killed) as log:
        for step in (1, 2, 3):
            log.log(step, loss=123.0)
    (killed.checkpoints_dir / ".epoch_001.pt.abc123.tmp").write_bytes(b"half")
    run_search(config, resume=str(killed.path))
    assert "has no checkpoint yet; starting it over" in capsys.readouterr().err
    assert metric_values(killed.path) == metric_values(reference.run_dir.path)
    assert len(list(killed.tensorboard_dir.glob("events.out.tfevents.*"))) == 1
    assert not list(killed.checkpoints_dir.glob(".*.tmp"))


def test_bilevel_steps_each_move_only_their_own_parameters(tmp_path, cache):
    """The arch step changes alpha/beta/m and no weight; the weight step changes weights and no
    alpha/beta/m (the BN running statistics, buffers, are not parameters of either step)."""
    cfg = load_config(tiny_config(tmp_path, cache, run={"val_ap_images": 0},
                                  search={"epochs": 1, "max_steps_per_epoch": 2}))
    job = SearchJob(cfg, DistContext())
    weights = job.supernet.weight_parameters()
    assert {id(p) for p in weights}.isdisjoint(id(p) for p in job.arch_params)
    assert len(weights) + len(job.arch_params) == len(list(job.supernet.parameters()))
    calls = []

    def snapshot():
        return [p.detach().clone() for p in job.arch_params], [p.detach().clone() for p in weights]

    arch_updates = []

    def checked(step, kind):
        def wrapper(loss):
            arch0, weights0 = snapshot()
            if kind == "arch":
                grads = torch.autograd.grad(loss, job.arch_params, retain_graph=True, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(job.arch_params, grads)]
            step(loss)
            arch1, weights1 = snapshot()
            moved_arch = any(not torch.equal(a, b) for a, b in zip(arch0, arch1))
            moved_weights = any(not torch.equal(a, b) for a, b in zip(weights0, weights1))
            calls.append((kind, moved_arch, moved_weights))
            if kind == "arch":
                arch_updates.append(([b - a for a, b in zip(arch0, arch1)], grads))
        return wrapper

    job.opt.arch_step = checked(job.opt.arch_step, "arch")
    job.weights.step = checked(job.weights.step, "weights")
    job.run()
    assert calls == [("arch", True, False), ("weights", False, True)] * 2
    # Adam's first step moves each parameter by -lr * g / (|g| + eps) (m_hat = g, v_hat = g^2):
    # -lr * sign(g) wherever |g| >> eps, and not at all where g = 0.
    lr, eps = cfg.search.arch_lr, 1e-8
    deltas, grads = arch_updates[0]
    for delta, g in zip(deltas, grads):
        torch.testing.assert_close(delta, -lr * g / (g.abs() + eps), rtol=1e-3, atol=1e-7 * lr)
    assert sum(int((g.abs() > 1e-6).sum()) for g in grads) > 0, "no architecture gradient at all"
