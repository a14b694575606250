"""Batched dynamic inference: a batch of 8 images vs the same 8 one at a time (thesis network).

    pytest bench/test_bench_batched_dynamic.py -s [--benchmark-json out.json]

The thesis' Table A.1 network (random weights, heads rescaled so heatmaps reach ~1 and every
image gets a confidence), flip test on, dynamic exits with thresholds picked from the images'
own Eq. 3.4 confidences so that 3 of the 8 images leave at layer 4, 1 at layer 7 and 4 at
layer 10 (about Table 4.3's mix: 38.7 % / 8 % / 53 %). Inputs: 8 random RGB images, 256 x 256
on a CPU (512 x 512 on a GPU). Both ways run interleaved in one process, round after round; a
round is ``Predictor.predict_batch(images)`` (one batch of 8, images dropped as they exit) vs
``[predictor.predict(image) for image in images]``. Both include resizing, scoring and
decoding (``network_speedup`` compares the exit segments' time alone); outputs must be identical
(same exits, same people). Issue target: >= 1.5x images/s.
"""
import platform
import time
from pathlib import Path

import numpy as np
import torch

from threempose.config import EELConfig, InferConfig
from threempose.nas.derived import DerivedNet
from threempose.nas.genotype import Genotype
from threempose.inference.predictor import Predictor, image_passes, with_flips

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DEVICE_NAME = (torch.cuda.get_device_name() if HAS_CUDA
               else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
SIZE = 512 if HAS_CUDA else 256
BATCH, ROUNDS = 8, 3
MIX = {4: 3, 7: 1}                       # images leaving at each EEL; the rest reach layer 10
THESIS = Path(__file__).resolve().parents[1] / "configs" / "genotypes" / "3m-pose-thesis.json"


def thesis_predictor(size: int = SIZE, device: str = DEVICE) -> tuple[Predictor, list[np.ndarray]]:
    """The thesis network with dynamic exits set to :data:`MIX` on 8 random images."""
    torch.manual_seed(0)
    net = DerivedNet(Genotype.load(THESIS)).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(BATCH)]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                # heads loud enough that keypoints are detected
        for out in net(x):
            net.heads[str(out.layer)].conv.weight[:net.num_joints] *= 1.0 / out.heatmaps.abs().max()
    eels = [EELConfig(layer=4, c0=0.05), EELConfig(layer=7, c0=0.05)]
    probe = Predictor(net, InferConfig(short_side=size, exit="dynamic", eels=eels), device)
    conf = {4: [], 7: []}
    for image in images:
        x, info = probe.prepare(image)
        with torch.no_grad():
            for out in net(with_flips(x.to(device), True))[:2]:
                conf[out.layer].append(probe.score(image_passes(out.heatmaps, 0, 1, True), info, out.layer).confidence)
    c4 = sorted(conf[4])
    t4 = (c4[-MIX[4]] + c4[-MIX[4] - 1]) / 2
    c7 = sorted(c for c, c_4 in zip(conf[7], conf[4]) if c_4 < t4)
    t7 = (c7[-MIX[7]] + c7[-MIX[7] - 1]) / 2
    eels = [EELConfig(layer=4, c0=0.05, threshold=t4), EELConfig(layer=7, c0=0.05, threshold=t7)]
    return Predictor(net, InferConfig(short_side=size, exit="dynamic", eels=eels), device), images


def compare(predictor: Predictor, images: list[np.ndarray], rounds: int = ROUNDS) -> dict:
    """Interleaved rounds of batch-8 vs one-at-a-time; medians and the images/s ratio."""
    batched = predictor.predict_batch(images)                 # warm-up, and the outputs to compare
    single = [predictor.predict(image) for image in images]
    assert [p.exit for p in batched] == [p.exit for p in single]
    for b, s in zip(batched, single):
        assert len(b.people) == len(s.people)
        assert all(np.allclose(p.keypoints, q.keypoints, atol=1e-3) for p, q in zip(b.people, s.people))
    times = {"batch": [], "single": []}
    network = {"batch": [], "single": []}
    for _ in range(rounds):
        for way, run in (("batch", lambda: predictor.predict_batch(images)),
                         ("single", lambda: [predictor.predict(image) for image in images])):
            before = predictor.timings["network"]
            start = time.perf_counter()
            run()
            times[way].append(time.perf_counter() - start)
            network[way].append(predictor.timings["network"] - before)
    median = {way: sorted(t)[len(t) // 2] for way, t in times.items()}
    net_median = {way: sorted(t)[len(t) // 2] for way, t in network.items()}
    exits = sorted(p.exit for p in batched)
    return {"device": DEVICE_NAME, "input_size": predictor.cfg.short_side, "batch": len(images),
            "exits": exits, "batch_images_per_s": len(images) / median["batch"],
            "single_images_per_s": len(images) / median["single"], "speedup": median["single"] / median["batch"],
            "network_speedup": net_median["single"] / net_median["batch"]}


def test_batched_dynamic_vs_one_at_a_time(benchmark):
    benchmark.group = "batched-dynamic"
    predictor, images = thesis_predictor()
    result = compare(predictor, images)
    assert result["exits"] == [4] * MIX[4] + [7] * MIX[7] + [10] * (BATCH - MIX[4] - MIX[7])
    benchmark.extra_info.update(result)
    benchmark.pedantic(predictor.predict_batch, args=(images,), rounds=1, iterations=1)
    print(f"\nbatched dynamic on {result['device']} at {result['input_size']}, exits {result['exits']}: "
          f"batch 8 {result['batch_images_per_s']:.2f} images/s, one at a time "
          f"{result['single_images_per_s']:.2f} images/s ({result['speedup']:.2f}x; target >= 1.5x; "
          f"network alone {result['network_speedup']:.2f}x)")
