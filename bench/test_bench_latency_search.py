"""Latency-constrained search on a small fabric (3x4, C = 16, 64 x 64, CPU time, one thread):
two searches that differ only in ``loss.cost.target`` end ordered by measured latency and
within their bound. A timing check, so it lives here rather than in tests/ (it was a slow test
in tests/test_latency.py).

    pytest bench/test_bench_latency_search.py -s
"""
import json
from pathlib import Path

import pytest

from test_bench_latency import SMALL
from threempose.config import ModelConfig, load_config
from threempose.engine.distributed import DistContext
from threempose.engine.metrics import read_metrics
from threempose.measure.latency import build_table, network_ms, random_genotypes
from threempose.nas.derived import DerivedNet
from threempose.nas.genotype import CellGene, Genotype
from threempose.nas.latency_table import LatencyTable
from threempose.nas.supernet import Supernet
from threempose.training.search_job import SearchJob
from threempose.util.threads import torch_threads


@pytest.fixture(scope="module")
def small_table(tmp_path_factory) -> Path:
    """A CPU-time table of the SMALL fabric at 64x64, measured here (one thread)."""
    path = tmp_path_factory.mktemp("lut") / "small.json"
    with torch_threads(1):
        build_table(ModelConfig(**SMALL), (64, 64), reps=30, timer="cpu").save(path)
    return path


def test_searches_with_two_latency_targets_end_ordered_and_within_bound(tmp_path, small_table):
    """Two searches that differ only in loss.cost.target: a low one (1.25x the all-identity
    network) and a high one (3x the costliest of 20 random genotypes). With w = 8 the
    constraint is a soft budget (README). Measured ms are put back on the table's time base
    with the all-identity network timed beside them (a shared machine's speed drifts between
    the table and the end of the searches; on a quiet one ``drift`` is ~1)."""
    with torch_threads(1):      # timed as the table is: one thread
        table = LatencyTable.load(small_table)
        model = ModelConfig(**SMALL)
        sampled = sorted(DerivedNet(g, 17, 0).exit_costs(table, (64, 64))[4]
                         for g in random_genotypes(model, 20, seed=7))
        cells = [CellGene(c.index, c.layer, c.row, ["parallel" if "parallel" in c.inputs else "above"],
                          [["identity"]] * 3) for c in Supernet(model).genotype.cells]
        floor_net = DerivedNet(Genotype(rows=3, layers=4, hidden=2, channels=16, eels=[2], cells=cells), 17, 0)
        floor = floor_net.exit_costs(table, (64, 64))[4]      # every op the identity, one input per cell
        targets = {"low": 1.25 * floor, "high": 3.0 * sampled[-1]}
        root = Path(__file__).resolve().parents[1]
        genotypes, runs = {}, {}
        for name, target in targets.items():
            raw = {"extends": str(root / "configs" / "search-small.json"),
                   "run": {"out_dir": str(tmp_path / name), "log_every": 1, "val_ap_images": 0,
                           "progress": False},
                   "data": {"input_size": 64, "batch_size": 4,
                            "synthetic": {"train_images": 64, "val_images": 4, "min_size": 64, "max_size": 96,
                                          "cache_dir": str(tmp_path / "synthetic")}},
                   "model": SMALL,
                   "loss": {"flops_weight": 10.0, "flops_exponent": 8.0, "flops_scale_start": 1.0,
                            "cost": {"metric": "latency", "target": target, "lut": str(small_table)}},
                   "search": {"epochs": 4, "arch_lr": 0.05, "arch_lr_milestones": [], "max_steps_per_epoch": 8}}
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(raw))
            job = SearchJob(load_config(path), DistContext())
            genotypes[name] = Genotype.load(job.run()["genotype"])
            runs[name] = read_metrics(job.run_dir.metrics_path)
        for rows in runs.values():
            steps = [r for r in rows if "total" in r]
            assert all("latency_ms" in r and "latency" in r for r in steps)
            assert sum("val/latency_ms_argmax" in r for r in rows) == 4
        nets = {"floor": floor_net, **{k: DerivedNet(g, 17, 0) for k, g in genotypes.items()}}
        measured = network_ms(nets, (64, 64), reps=30, timer="cpu")
        drift = measured["floor"] / floor     # this machine now vs when the table was made (load)
        predicted = {k: DerivedNet(g, 17, 0).exit_costs(table, (64, 64))[4] for k, g in genotypes.items()}
        print(f"drift {drift}, floor {floor}, sampled {sampled[0]}..{sampled[-1]}, targets {targets}, "
              f"measured {measured}, predicted {predicted}")
        assert measured["low"] < measured["high"]
        for name, target in targets.items():
            assert measured[name] / drift <= 1.2 * target, (name, measured[name], drift, target)
