"""Mixed precision (``run.amp``) on the CPU: torch's CPU autocast runs the same bf16/fp16 code
paths a GPU run takes, so a dtype bug in search or training shows up without a GPU."""
import pytest
import torch
from test_pnfs_jobs import config as pnfs_config
from test_search import tiny_config

from threempose.config import ConfigError, load_config
from threempose.engine.distributed import DistContext
from threempose.engine.metrics import read_metrics
from threempose.engine.weights import WeightOptimizer
from threempose.nas.supernet import Supernet
from threempose.pnfs.jobs import PnfsSearchJob
from threempose.training.search_job import SearchJob
from threempose.training.train_job import TrainJob

TWO_STEPS = {"epochs": 1, "max_steps_per_epoch": 2}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic-cache")


def conv_output_dtypes(net: torch.nn.Module) -> set:
    """Record the output dtype of every training-mode Conv2d forward of ``net`` (the set fills as
    it runs; the final profile's eval-mode forwards run without autocast)."""
    seen = set()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype) if mod.training else None)
    return seen


def arch_and_weights(job):
    return ([p.detach().clone() for p in job.arch_params],
            [p.detach().clone() for p in job.supernet.weight_parameters()])


def one_search_step(tmp_path, cache, amp):
    """A one-step bilevel search; returns (logged step row, weight update, arch update, conv
    output dtypes) for ``run.amp`` = ``amp``."""
    tmp_path.mkdir()
    cfg = load_config(tiny_config(tmp_path, cache, run={"amp": amp, "val_ap_images": 0},
                                  search={"epochs": 1, "max_steps_per_epoch": 1, "strategy": "bilevel"}))
    job = SearchJob(cfg, DistContext())
    dtypes = conv_output_dtypes(job.supernet)
    arch0, weights0 = arch_and_weights(job)
    job.run()
    arch1, weights1 = arch_and_weights(job)
    (row,) = [r for r in read_metrics(job.run_dir.metrics_path) if "total" in r]
    flat = lambda before, after: torch.cat([(b - a).flatten() for a, b in zip(before, after)])  # noqa: E731
    return row, flat(weights0, weights1), flat(arch0, arch1), dtypes


def test_bf16_search_step_is_the_fp32_step_within_bf16_rounding(tmp_path, cache):
    """The same first bilevel step (same seed, batch and architecture draw) in fp32 and under
    bf16 autocast. Measured on this tiny fabric (2-core CPU, torch 2.13): loss terms within
    3.5e-4 relative (total), 3.1e-4 (arch step's total); Adam's first weight update
    (~ -lr * sign(g)) agrees in sign on 91% of the weights fp32 moves by > 0.1 lr, with a mean
    |difference| of 0.12 lr (an unrelated update: ~1 lr); the arch update differs by 0.10 of its
    norm. Bounds: 15x the loss differences, 2-3x the update differences."""
    ref, ref_weights, ref_arch, ref_dtypes = one_search_step(tmp_path / "fp32", cache, "none")
    got, weights, arch, dtypes = one_search_step(tmp_path / "bf16", cache, "bf16")
    assert ref_dtypes == {torch.float32} and dtypes == {torch.bfloat16}       # autocast was on, only there
    assert got["total"] == pytest.approx(ref["total"], rel=5e-3)
    assert got["arch/total"] == pytest.approx(ref["arch/total"], rel=5e-3)
    lr = load_config(tmp_path / "fp32" / "tiny.json").search.weight_lr
    moved = ref_weights.abs() > 0.1 * lr
    assert moved.float().mean() > 0.5
    assert (torch.sign(weights) == torch.sign(ref_weights))[moved].float().mean() > 0.8
    assert (weights - ref_weights).abs().mean() < 0.3 * lr
    assert (arch - ref_arch).norm() < 0.3 * ref_arch.norm()


@pytest.mark.parametrize("amp, strategy", [("fp16", "bilevel"), ("bf16", "synchronous")])
def test_search_steps_under_cpu_autocast(tmp_path, cache, amp, strategy):
    cfg = load_config(tiny_config(tmp_path, cache, run={"amp": amp, "val_ap_images": 0},
                                  search={**TWO_STEPS, "strategy": strategy}))
    job = SearchJob(cfg, DistContext())
    dtypes = conv_output_dtypes(job.supernet)
    arch0, weights0 = arch_and_weights(job)
    job.run()
    arch1, weights1 = arch_and_weights(job)
    assert dtypes == {dict(bf16=torch.bfloat16, fp16=torch.float16)[amp]}   # autocast was on
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in arch1 + weights1)
    assert any(not torch.equal(a, b) for a, b in zip(arch0, arch1))         # alpha/beta/m stepped
    assert any(not torch.equal(a, b) for a, b in zip(weights0, weights1))
    scaler = job.opt.arch_scaler
    if amp == "fp16" and strategy == "bilevel":     # the arch step scales its loss too
        assert scaler is not None and job.weights.scaler is not None and scaler.get_scale() > 0
        assert torch.load(job.run_dir.last_checkpoint, weights_only=False)["arch_scaler"]["scale"] > 0
    else:
        assert scaler is None


def test_train_steps_under_cpu_bf16_autocast(tmp_path, cache):
    cfg = load_config(tiny_config(tmp_path, cache, run={"amp": "bf16", "val_ap_images": 0},
                                  train={"epochs": 1, "max_steps_per_epoch": 2}))
    job = TrainJob(cfg, DistContext(), Supernet(cfg.model).derive())
    dtypes = conv_output_dtypes(job.net)
    before = [p.detach().clone() for p in job.net.parameters()]
    job.run()
    assert dtypes == {torch.bfloat16}
    after = list(job.net.parameters())
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_pnfs_bilevel_search_steps_under_cpu_bf16_autocast(tmp_path, cache):
    small = {"cache_dir": str(cache), "train_images": 16, "val_images": 2, "min_size": 96, "max_size": 128}
    cfg = load_config(pnfs_config(tmp_path, cache, run={"amp": "bf16", "val_ap_images": 0},
                                  data={"batch_size": 4, "synthetic": small},
                                  search={**TWO_STEPS, "strategy": "bilevel", "arch_val_fraction": 0.5}))
    job = PnfsSearchJob(cfg, DistContext())
    dtypes = conv_output_dtypes(job.net)
    arch0 = [p.detach().clone() for p in job.arch_params]
    job.run()
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in job.net.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(arch0, job.arch_params))


def test_fp16_under_the_deepspeed_launcher_is_refused(tmp_path, cache):
    cfg = load_config(tiny_config(tmp_path, cache, run={"amp": "fp16"}))
    with pytest.raises(ConfigError, match="fp16.*DeepSpeed.*bf16"):
        WeightOptimizer(torch.nn.Linear(2, 2), [{"params": [torch.nn.Parameter(torch.zeros(1))]}], cfg,
                        DistContext(launched=True))
