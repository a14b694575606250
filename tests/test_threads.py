"""The thread policy: usable cores, intra-op threads and loader workers, recorded and checked on resume."""
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from threempose.util.threads import (cgroup_cpu_limit, plan_threads, ranks_per_machine, single_threaded_worker, usable_cores)


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_limit(tmp_path) is None


def test_usable_cores_respects_affinity_quota_and_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert usable_cores({}, tmp_path) == 8                       # no quota files
    (tmp_path / "cpu.max").write_text("250000 100000")           # 2.5 CPUs -> 3
    assert usable_cores({}, tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000")
    assert usable_cores({"LOCAL_WORLD_SIZE": "4"}, tmp_path) == 2
    assert usable_cores({"LOCAL_SIZE": "3"}, tmp_path) == 2      # DeepSpeed's launcher
    assert usable_cores({"LOCAL_WORLD_SIZE": "16"}, tmp_path) == 1
    assert ranks_per_machine({}) == 1


@pytest.mark.parametrize("cores, workers, threads, env, expected", [
    (2, 0, 0, {}, (1, 0, "cores")),            # a 2-core laptop, small config: 1 thread
    (2, 2, 0, {}, (1, 1, "cores")),            # the main process keeps a core
    (16, 2, 0, {}, (7, 2, "cores")),           # half of what the workers leave
    (1, 4, 0, {}, (1, 0, "cores")),
    (16, 2, 0, {"OMP_NUM_THREADS": "3"}, (3, 2, "OMP_NUM_THREADS")),
    (16, 2, 5, {"OMP_NUM_THREADS": "3"}, (5, 2, "run.threads")),
])
def test_plan_threads(cores, workers, threads, env, expected):
    plan = plan_threads(threads, workers, env=env, cores=cores)
    assert (plan.intra_op, plan.workers, plan.source) == expected and plan.cores == cores


class _WorkerThreads(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return torch.tensor([torch.get_num_threads(), int(os.environ["OMP_NUM_THREADS"])])


def test_loader_workers_run_single_threaded(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    torch.set_num_threads(2)
    try:
        loader = DataLoader(_WorkerThreads(), num_workers=1, worker_init_fn=single_threaded_worker)
        assert next(iter(loader)).tolist() == [[1, 1]]
    finally:
        torch.set_num_threads(1)


def test_runs_record_their_threads_and_a_resume_with_others_warns(tmp_path, monkeypatch, capsys):
    from test_cli import tiny
    from threempose import search

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    config = tiny(tmp_path, run={"threads": 1}, search={"epochs": 1, "arch_lr_milestones": [1]})
    assert search.main(["--config", str(config)]) == 0
    out = capsys.readouterr()
    assert "threads: 1 intra-op thread (run.threads)" in out.err
    run = out.out.split("run directory: ")[1].strip()
    assert json.load(open(f"{run}/config.json"))["run"]["threads"] == 1

    raw = json.loads(config.read_text())
    raw["run"]["threads"] = 2
    config.write_text(json.dumps(raw))
    assert search.main(["--config", str(config), "--resume", run]) == 0
    err = capsys.readouterr().err
    assert "ran with 1 intra-op thread(s), this continuation uses 2" in err and "not be bit-identical" in err
    assert torch.get_num_threads() == 1        # a command called from Python leaves the caller's setting
