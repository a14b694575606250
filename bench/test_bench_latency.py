"""Latency tables vs measured latency: the thesis fabric (4x10, C = 32, 9 ops) at 512 x 512.

    pytest bench/test_bench_latency.py -s [--benchmark-json out.json]

On this machine's CPU with one thread and the CPU-time timer (:mod:`threempose.latency`;
tables made on a busy shared machine still predict the idle latency that way), blocks and
networks in the form inference runs (``"deploy"``, :func:`~threempose.measure.latency.inference_form`):

* builds the latency table and times 20 random genotypes
  (:func:`~threempose.measure.latency.random_genotypes`, preference 1, so they span cheap to costly
  networks) whole in the same interleaved rounds (``benchmark`` times both together), and
  checks predicted vs measured: Spearman >= 0.9, mean absolute error <= 15%; GFLOPs' own
  Spearman against the measured latency is reported beside it;
* GFLOPs- vs latency-constrained picks at similar cost: among 200 random genotypes whose
  GFLOPs lie within 2% of the pool's median, a GFLOPs constraint sees one cost; the table
  tells the fastest from the slowest. Both are then measured, interleaved with each other.

``extra_info`` holds every number printed. On a GPU the same runs with the wall timer.

``test_small_fabric_latency_prediction`` is the same check at a size a 2-core CI machine affords
(a 3x4 fabric, C = 16, at 64 x 64; it was a slow test in tests/test_latency.py).
"""
import statistics

import torch

from threempose.config import ModelConfig
from threempose.measure.latency import build_table_and_time, network_ms, prediction_accuracy, random_genotypes
from threempose.nas.derived import DerivedNet
from threempose.util.threads import torch_threads

SIZE = (512, 512)
SMALL = dict(rows=3, layers=4, channels=16, eels=[2], stem_blocks=0)    # the CI-sized fabric, at 64 x 64
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TIMER = "wall" if HAS_CUDA else "cpu"


def test_thesis_fabric_latency_prediction(benchmark):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ModelConfig()
        genotypes = random_genotypes(model, 20, seed=0, preference=1.0)
        nets = {str(i): DerivedNet(g) for i, g in enumerate(genotypes)}
        table, measured = benchmark.pedantic(build_table_and_time, args=(model, SIZE, nets, DEVICE),
                                             kwargs={"warmup": 2, "reps": 10, "timer": TIMER},
                                             rounds=1, iterations=1)

        pool = []                                   # (GFLOPs, predicted ms, genotype), nets not kept
        for g in random_genotypes(model, 200, seed=1000, preference=1.0):
            net = DerivedNet(g)
            pool.append((net.exit_gflops(SIZE)[10], net.exit_costs(table, SIZE)[10], g))
        median = statistics.median(p[0] for p in pool)
        band = sorted((p for p in pool if abs(p[0] / median - 1) <= 0.02), key=lambda p: p[1])
        pair = {"fastest at median GFLOPs": DerivedNet(band[0][2]),
                "slowest at median GFLOPs": DerivedNet(band[-1][2])}
        measured.update(network_ms(pair, SIZE, DEVICE, warmup=1, reps=7, progress="pair", timer=TIMER))
        nets.update(pair)
        predicted = {k: n.exit_costs(table, SIZE)[10] for k, n in nets.items()}
        flops = {k: n.exit_gflops(SIZE)[10] for k, n in nets.items()}
        random_keys = [str(i) for i in range(20)]
        acc = prediction_accuracy([predicted[k] for k in random_keys], [measured[k] for k in random_keys])
        by_gflops = prediction_accuracy([flops[k] for k in random_keys], [measured[k] for k in random_keys])
    finally:
        torch.set_num_threads(threads)
    print(f"\n{table.device_name}, 1 thread, timer {TIMER}, form {table.meta['form']}, "
          f"calibration x{table.calibration:.3f}")
    print(f"{'network':>26} {'GFLOPs':>7} {'predicted ms':>13} {'measured ms':>12} {'error':>7}")
    for k in nets:
        print(f"{k:>26} {flops[k]:>7.2f} {predicted[k]:>13.1f} {measured[k]:>12.1f} "
              f"{predicted[k] / measured[k] - 1:>+7.1%}")
    print(f"table vs measured: Spearman {acc['spearman']:.3f}, MAE {acc['mae']:.1%}, "
          f"bias {acc['bias']:+.1%}; GFLOPs vs measured: Spearman {by_gflops['spearman']:.3f}; "
          f"{len(band)} genotypes within 2% of {median:.2f} GFLOPs")
    benchmark.extra_info.update(
        device=table.device_name, timer=TIMER, form=table.meta["form"], calibration=table.calibration,
        spearman=acc["spearman"], mae=acc["mae"], bias=acc["bias"], gflops_spearman=by_gflops["spearman"],
        networks={k: {"gflops": flops[k], "predicted_ms": predicted[k], "measured_ms": measured[k]}
                  for k in nets})
    assert acc["spearman"] >= 0.9 and acc["mae"] <= 0.15, acc


def test_small_fabric_latency_prediction():
    """20 random genotypes of a small fabric at 64x64, one thread, CPU time, timed in the same
    interleaved rounds as the table's blocks (see :mod:`threempose.measure.latency`)."""
    model = ModelConfig(**SMALL)
    genotypes = random_genotypes(model, 20, seed=1, preference=1.0)
    nets = {str(i): DerivedNet(g, 17, 0) for i, g in enumerate(genotypes)}
    with torch_threads(1):
        table, measured = build_table_and_time(model, (64, 64), nets, reps=30, timer="cpu")
    predicted = [n.exit_costs(table, (64, 64))[4] for n in nets.values()]
    acc = prediction_accuracy(predicted, [measured[k] for k in nets])
    print(acc)
    assert acc["spearman"] >= 0.9 and acc["mae"] <= 0.15, acc
