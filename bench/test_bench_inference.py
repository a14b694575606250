"""Inference speed at 512 x 512: the thesis network vs HigherHRNet-W32, eager vs optimized.

    pytest bench/test_bench_inference.py -s [--benchmark-json out.json]
    OMP_NUM_THREADS=1 pytest bench/test_bench_inference.py -s     # on a CPU other jobs share

Networks (random weights; speed does not depend on them): the thesis' Table A.1 network
(``configs/genotypes/3m-pose-thesis.json``, all three exits computed, as ``net(images)`` does)
and HigherHRNet-W32, each eager (``net.eval()`` under ``torch.no_grad()``) and optimized
(:func:`threempose.inference.deploy.optimize_for_inference` with its defaults for the device; on CUDA
also in float16). Batch 1 and batch 8, on the CPU and, where present, on CUDA.

One benchmark per (device, batch) runs the networks **interleaved** (each round runs every
network once, in turn), so a machine whose load changes during the run slows all of them
alike; the benchmark's own time is a whole round. Its ``extra_info`` holds ``ms_per_image``
(median over rounds) per network and the ratios next to the issue's targets (thesis optimized
vs HigherHRNet-W32 eager >= 2.8x, vs thesis eager >= 1.5x, at batch 1 on the CPU); ``-s``
prints them as a table. Before timing, each optimized network's outputs are checked against
its eager network's on the benchmark input.
"""
import platform
import time
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from threempose.inference.deploy import optimize_for_inference, output_tensors
from threempose.models.higherhrnet import higherhrnet_w32
from threempose.nas.derived import DerivedNet
from threempose.nas.genotype import Genotype

THESIS = Path(__file__).resolve().parents[1] / "configs" / "genotypes" / "3m-pose-thesis.json"
SIZE = 512
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]
ROUNDS = {1: 5, 8: 2}          # per batch size; plus one warm-up round
TARGETS = {("thesis optimized", "higherhrnet-w32 eager"): 2.8, ("thesis optimized", "thesis eager"): 1.5}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@lru_cache(maxsize=None)
def networks(device: str) -> dict[str, torch.nn.Module]:
    """``{name: network}`` in the order they run in a round."""
    torch.manual_seed(0)
    thesis = DerivedNet(Genotype.load(THESIS)).eval()
    hrnet = higherhrnet_w32().eval()
    nets = {"thesis eager": thesis.to(device),
            "thesis optimized": optimize_for_inference(thesis, (SIZE, SIZE), device),
            "higherhrnet-w32 eager": hrnet.to(device),
            "higherhrnet-w32 optimized": optimize_for_inference(hrnet, (SIZE, SIZE), device)}
    if device == "cuda":
        nets["thesis optimized fp16"] = optimize_for_inference(thesis, (SIZE, SIZE), device, dtype=torch.float16)
        nets["higherhrnet-w32 optimized fp16"] = optimize_for_inference(hrnet, (SIZE, SIZE), device,
                                                                       dtype=torch.float16)
    return nets


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_network_inference_interleaved(benchmark, device, batch):
    nets = networks(device)
    images = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        for name, net in nets.items():             # the optimized networks compute the same maps
            if "optimized" in name and "fp16" not in name:
                eager = nets[name.replace("optimized", "eager")]
                for e, o in zip(output_tensors(eager(images[:1])), output_tensors(net(images[:1]))):
                    torch.testing.assert_close(o, e, rtol=1e-3, atol=1e-4 * max(1.0, e.abs().max().item()))
    times: dict[str, list[float]] = {name: [] for name in nets}

    def round_robin():
        with torch.no_grad():
            for name, net in nets.items():
                _sync(device)
                start = time.perf_counter()
                net(images)
                _sync(device)
                times[name].append(time.perf_counter() - start)

    benchmark.group = f"inference {device} batch {batch}"
    benchmark.pedantic(round_robin, rounds=ROUNDS[batch], iterations=1, warmup_rounds=1)
    rounds = ROUNDS[batch] if benchmark.stats is not None else 1     # --benchmark-disable: 1 call
    ms = {name: sorted(t[-rounds:])[len(t[-rounds:]) // 2] * 1e3 / batch for name, t in times.items()}
    ratios = {f"{a} vs {b}": ms[b] / ms[a] for a, b in
              [("thesis optimized", "higherhrnet-w32 eager"), ("thesis optimized", "thesis eager"),
               ("higherhrnet-w32 optimized", "higherhrnet-w32 eager"), ("thesis eager", "higherhrnet-w32 eager")]}
    benchmark.extra_info.update(device=device_name(device), input_size=SIZE, batch=batch, rounds=rounds,
                                ms_per_image=ms, ratios=ratios,
                                targets={f"{a} vs {b}": t for (a, b), t in TARGETS.items()})
    print(f"\n{device_name(device)}, {SIZE}x{SIZE}, batch {batch}, median of {rounds} interleaved rounds:")
    for name, v in ms.items():
        print(f"  {name:32s} {v:9.1f} ms/image")
    for name, r in ratios.items():
        target = next((t for (a, b), t in TARGETS.items() if name == f"{a} vs {b}"), None)
        print(f"  {name:55s} {r:5.2f}x" + (f"  (target >= {target}x)" if target else ""))


# End-to-end `python -m threempose.infer` images/s on synthetic images (image loading, the
# network, decoding and grouping; static and dynamic exits, one at a time and batched) belongs
# here too: it comes with the batched dynamic exits (issue 16's second half).
