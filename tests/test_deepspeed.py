"""Multi-rank search on the CPU: real 2-rank DeepSpeed launches (gloo) and the rank-sync guard.

``test_deepspeed_search_two_ranks_keep_identical_arch_and_resume`` runs
``deepspeed --num_gpus 2 threempose/search.py --config tiny.json`` once (bilevel strategy,
ZeRO stage 1: sharded optimizer state, all-reduced arch gradients, per-rank data shards,
validation on rank 0 only) and compares the per-rank ``arch/final_rank<R>.pt`` files; then
the same launch again, killed once its epoch-1 checkpoint exists, and resumed under the
launcher: it must end with the uninterrupted run's architecture. ``test_deepspeed_pnfs_search_two_ranks``
runs a PNFS search (synchronous, dense) the same way. The first DeepSpeed launch on a machine
JIT-builds its shm comm op (~40 s, then cached).
"""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from threempose.engine.distributed import DistContext
from threempose.engine.metrics import read_metrics
from threempose.training.search_optim import ArchDivergenceError, SearchOptimizers
from threempose.training.search_job import ARCH_NAMES

ROOT = Path(__file__).resolve().parents[1]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def two_rank_config(tmp_path: Path) -> Path:
    """Bilevel search, ZeRO 1, on the CPU: 48 images -> 24 train + 24 arch, 12 per rank,
    batch 4: 3 steps per epoch on each rank, 2 epochs."""
    raw = {
        "extends": str(ROOT / "configs" / "search-small.json"),
        "run": {"device": "cpu", "out_dir": str(tmp_path / "runs"), "log_every": 1, "val_ap_images": 2,
                "progress": False},
        "data": {"input_size": 64, "batch_size": 4, "num_workers": 0,
                 "synthetic": {"train_images": 48, "val_images": 4, "min_size": 64, "max_size": 96,
                               "max_people": 2, "cache_dir": str(tmp_path / "cache")}},
        "model": {"rows": 2, "layers": 3, "channels": 4, "eels": [2], "stem_blocks": 0},
        "search": {"strategy": "bilevel", "epochs": 2, "arch_lr_milestones": [1], "grad_clip": 1.0},
        "deepspeed": {"zero_optimization": {"stage": 1}},
        "infer": {"short_side": 64},
    }
    path = tmp_path / "tiny-ds.json"
    path.write_text(json.dumps(raw))
    return path


def launch_command(config: Path, *args: str) -> list[str]:
    """``deepspeed --num_gpus 2 threempose/search.py --config config *args`` on the CPU."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
            str(free_port()), str(ROOT / "threempose" / "search.py"), "--config", str(config), *args]


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def launch(config: Path, *args: str) -> tuple[Path, str]:
    """Run a 2-rank launch to the end; ``(run directory, a report of its output tails)``."""
    try:
        proc = subprocess.run(launch_command(config, *args), cwd=ROOT, env=LAUNCH_ENV, capture_output=True,
                              text=True, timeout=420)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"2-rank DeepSpeed launch did not finish in {e.timeout} s; stderr tail:\n{tail(err)}")
    report = f"stdout tail:\n{tail(proc.stdout, 20)}\nstderr tail:\n{tail(proc.stderr)}"
    assert proc.returncode == 0, f"deepspeed exited with {proc.returncode}\n{report}"
    assert "run directory: " in proc.stdout, report
    return Path(proc.stdout.split("run directory: ")[1].splitlines()[0].strip()), report


def launch_and_kill_after_epoch_1(config: Path, runs: Path, known: set[Path]) -> Path:
    """Start a 2-rank launch, SIGKILL its whole process group once a new run directory under
    ``runs`` holds its epoch-1 checkpoint; returns that run directory."""
    log = runs.parent / "killed-launch.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(launch_command(config), cwd=ROOT, env=LAUNCH_ENV, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        deadline, run = time.time() + 420, None
        try:
            while time.time() < deadline and proc.poll() is None and run is None:
                found = [d for d in runs.iterdir() if d not in known and (d / "checkpoints" / "epoch_001.pt").exists()]
                run = found[0] if found else None
                time.sleep(0.05)
            alive = proc.poll() is None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert run is not None and alive, (f"the launch ended before its epoch-1 checkpoint could be killed:\n"
                                       f"{tail(log.read_text())}")
    return run


@pytest.mark.slow     # a 2-rank DeepSpeed launch, killed and resumed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="the deepspeed package (and its launcher) is not installed")
def test_deepspeed_search_two_ranks_keep_identical_arch_and_resume(tmp_path):
    config = two_rank_config(tmp_path)
    run, _ = launch(config)

    finals = [torch.load(run / "arch" / f"final_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [f["rank"] for f in finals] == [0, 1] and all(f["world_size"] == 2 for f in finals)
    assert finals[0]["global_step"] == finals[1]["global_step"] == 6       # 2 epochs x 3 steps per rank
    for name in ARCH_NAMES:
        a, b = finals[0][name], finals[1][name]
        assert torch.equal(a, b), f"{name} differs between ranks: max |diff| {float((a - b).abs().max())}"
    # The arch optimizer really stepped (alpha/beta/m start at zero) on the averaged gradients.
    assert any(float(finals[0][name].abs().sum()) > 0 for name in ARCH_NAMES)
    snapshot = json.loads((run / "arch" / "epoch_002.json").read_text())
    assert torch.equal(torch.tensor(snapshot["alpha"]), finals[0]["alpha"])

    # Per-rank data shards: 6 global steps (a single process would take 12); rank 0 alone logs.
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "total" in r]
    assert steps == list(range(1, 7))
    # ZeRO 1: one optimizer shard per rank, saved collectively each epoch; rank 0's artifacts.
    for epoch in (1, 2):
        shards = sorted(p.name for p in (run / "checkpoints" / "deepspeed" / f"epoch_{epoch:03d}").glob("*optim*"))
        assert len(shards) == 2, shards
        assert (run / "checkpoints" / f"epoch_{epoch:03d}.pt").is_file()
    assert (run / "genotype.json").is_file() and (run / "profile.json").is_file()

    # Killed after the epoch-1 checkpoint, resumed under the launcher: the same final
    # architecture on both ranks as the uninterrupted run, and the same step count.
    killed = launch_and_kill_after_epoch_1(config, run.parent, {run})
    assert not (killed / "genotype.json").exists()
    resumed, report = launch(config, "--resume", str(killed))
    assert resumed == killed, report
    for r in (0, 1):
        again = torch.load(killed / "arch" / f"final_rank{r}.pt", weights_only=True)
        assert again["global_step"] == finals[r]["global_step"]
        for name in ARCH_NAMES:
            assert torch.equal(again[name], finals[r][name]), f"rank {r}: resumed {name} differs"
    assert json.loads((killed / "genotype.json").read_text()) == json.loads((run / "genotype.json").read_text())


# --------------------------------------------------------------------------- #
# DistContext's collectives on a real 2-rank gloo group (no DeepSpeed): the per-epoch guard's
# divergence, and the arch-gradient average on the strided views autograd returns (a bare
# dist.all_reduce of such a view reduces the wrong memory and the ranks drift apart).

def _collectives_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, launched=True)
    try:
        same = [torch.arange(6.0).reshape(2, 3), torch.ones(4)]
        drift = [torch.arange(6.0).reshape(2, 3), torch.ones(4) + (0.25 if rank == 1 else 0.0)]
        nan = [torch.full((3,), float("nan")) if rank == 1 else torch.zeros(3)]
        result = {"same": ctx.divergence(same), "drift": ctx.divergence(drift), "nan": ctx.divergence(nan)}
        # all_reduce_mean_ on what autograd hands back for arch params: strided views included.
        base = torch.arange(12.0).reshape(3, 4)
        grads = [(base * (rank + 1))[:, :2], (base * (rank + 1)).t(), None]
        ctx.all_reduce_mean_(grads)
        result["mean"] = [g for g in grads if g is not None]
        view = torch.zeros(3, 4)[:, 1:3]
        if rank == 0:
            view.copy_(base[:, :2])
        ctx.broadcast_([view])
        result["broadcast"] = view
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        ctx.close()


@pytest.mark.slow     # two spawned gloo ranks
def test_collectives_on_two_gloo_ranks(tmp_path):
    mp.spawn(_collectives_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key in ("same", "drift", "nan"):                  # every rank gets the same answer
        assert results[0][key] == results[1][key], key
    assert results[0]["same"] == [0.0, 0.0]
    assert results[0]["drift"] == [0.0, 0.25]
    assert results[0]["nan"] == [float("inf")]
    base = torch.arange(12.0).reshape(3, 4)
    for r in (0, 1):                                      # mean of x1 and x2 = x1.5, on both ranks
        strided, transposed = results[r]["mean"]
        assert torch.equal(strided, 1.5 * base[:, :2]) and torch.equal(transposed, 1.5 * base.t())
        assert torch.equal(results[r]["broadcast"], base[:, :2])


def test_divergence_is_zero_in_one_process():
    assert DistContext().divergence([torch.ones(3), torch.zeros(2)]) == [0.0, 0.0]


class _FakeCtx:
    world_size = 2

    def __init__(self, gaps):
        self.gaps = gaps

    def divergence(self, tensors):
        assert len(tensors) == len(ARCH_NAMES)
        return self.gaps


def _guard(gaps) -> SearchOptimizers:
    """A SearchOptimizers whose check_in_sync reads ``gaps`` from a fake context."""
    opt = SearchOptimizers.__new__(SearchOptimizers)
    opt.ctx, opt.arch_params, opt.arch_names = _FakeCtx(gaps), [torch.zeros(2) for _ in ARCH_NAMES], ARCH_NAMES
    return opt


def test_arch_guard_names_the_diverged_parameter():
    _guard([0.0, 0.0, 0.0, 0.0]).check_in_sync(epoch=0, step=12)
    with pytest.raises(ArchDivergenceError, match=r"after epoch 3 \(step 12\).*beta by up to 0\.5") as e:
        _guard([0.0, 0.5, 0.0, 0.0]).check_in_sync(epoch=2, step=12)
    assert "alpha by" not in str(e.value)                 # only the parameters that differ


@pytest.mark.slow     # a 2-rank DeepSpeed launch
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="the deepspeed package (and its launcher) is not installed")
def test_deepspeed_pnfs_search_two_ranks(tmp_path):
    """PNFS' synchronous dense search (alpha/beta in the weight optimizer, so DeepSpeed's own
    gradient all-reduce averages them) under the launcher: 2 steps per rank, ZeRO 1."""
    raw = {
        "extends": str(ROOT / "configs" / "pnfs-small.json"),
        "run": {"device": "cpu", "out_dir": str(tmp_path / "runs"), "log_every": 1, "val_ap_images": 2,
                "progress": False},
        "data": {"batch_size": 4, "num_workers": 0,
                 "synthetic": {"train_images": 16, "val_images": 2, "min_size": 96, "max_size": 128,
                               "cache_dir": str(tmp_path / "cache")}},
        "search": {"epochs": 1, "max_steps_per_epoch": 2},
        "deepspeed": {"zero_optimization": {"stage": 1}},
    }
    config = tmp_path / "pnfs-ds.json"
    config.write_text(json.dumps(raw))
    run, report = launch(config)
    finals = [torch.load(run / "arch" / f"final_rank{r}.pt", weights_only=True) for r in (0, 1)]
    names = [k for k in finals[0] if k.startswith("arch[")]
    assert names and all(f["global_step"] == 2 and f["world_size"] == 2 for f in finals)
    for name in names:
        assert torch.equal(finals[0][name], finals[1][name]), f"{name} differs between ranks"
    assert any(float(finals[0][name].abs().sum()) > 0 for name in names)     # synchronous: alpha/beta moved
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert len(list((run / "checkpoints" / "deepspeed" / "epoch_001").glob("*optim*"))) == 2
    assert (run / "architecture.json").is_file() and (run / "model.pt").is_file(), report
