"""Mixed precision (``run.amp``) on the CPU: torch's CPU autocast runs the same bf16/fp16 code
paths a GPU run takes, so a dtype bug in search or training shows up without a GPU."""
import pytest
import torch
from test_pnfs_jobs import config as pnfs_config
from test_search import tiny_config

from threempose.config import ConfigError, load_config
from threempose.engine.distributed import DistContext
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


@pytest.mark.parametrize("amp, strategy", [("bf16", "bilevel"), ("fp16", "bilevel"), ("bf16", "synchronous")])
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
