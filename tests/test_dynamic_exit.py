"""Dynamic inference (thesis §3.1.4): Eq. 3.4 against scipy, the exit rule, and that the network
really stops -- later cells never run and the GFLOPs are the profiler's figure for the exit."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from threempose.config import ConfigError, EELConfig
from threempose.inference.dynamic_exit import (NEVER, ExitScore, choose_exit, confidence_floor, eq34_confidence, resolve_exit, resolve_rules, score_exit, should_exit)
from threempose.inference.predictor import Predictor, decode_image, image_passes, with_flips
from threempose.measure.profile import profile_network

from test_predictor import random_image, same_people, tiny_infer, tiny_net


def smooth_maps(joints: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Broad random bumps (moderate skew/kurtosis, so Eq. 3.4 does not saturate)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w]
    maps = np.zeros((joints, h, w))
    for j in range(joints):
        for _ in range(3):
            cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 8)
            maps[j] += rng.uniform(0.1, 0.6) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
    return torch.from_numpy(maps).float()


def hand_confidence(maps: np.ndarray, threshold: float, c0: float, c1: float, c2: float):
    """Eq. 3.1-3.4 by hand: scipy's population skew and plain kurtosis of each detected map, the
    mean over detected maps, then the sigmoid."""
    detected = [j for j in range(maps.shape[0]) if maps[j].max() > threshold]
    if not detected:
        return 0, None
    skew = np.mean([scipy.stats.skew(maps[j].ravel(), bias=True) for j in detected])
    kurt = np.mean([scipy.stats.kurtosis(maps[j].ravel(), fisher=False, bias=True) for j in detected])
    return len(detected), 1.0 / (1.0 + math.exp(-c0 * (c1 * skew + c2 * kurt) / 2)) - 0.5


@pytest.mark.parametrize("c", [(0.05, 1.0, 1.0), (0.1, 2.0, 0.5), (0.02, -1.0, 1.0)])
def test_confidence_matches_a_hand_computation_with_scipy(c):
    maps = smooth_maps(17, 24, 32, seed=1)
    maps[3] *= 0.1                                   # some joints below the detection threshold
    maps[9] *= 0.05
    n, expected = hand_confidence(maps.double().numpy(), 0.2, *c)
    score = score_exit(maps, EELConfig(1, *c), detection_threshold=0.2)
    assert 0 < n < 17 and score.detected == n
    assert -0.49 < expected < 0.49                   # unsaturated: the test can see a wrong formula
    assert score.confidence == pytest.approx(expected, abs=2e-6)


def test_nothing_detected_gives_no_confidence():
    maps = smooth_maps(17, 16, 16, seed=2) * 0.01
    assert score_exit(maps, EELConfig(1), detection_threshold=0.1) == ExitScore(0, None)
    assert should_exit(ExitScore(0, None), NEVER)


def test_the_thesis_thresholds_can_never_be_met():
    """conf = sigmoid(.) - 0.5 <= 0.5 < 0.6 < 1 (= 0.5 only where the sigmoid rounds to 1), even
    for extreme moments; and Pearson's bound kurt >= skew^2 + 1 keeps every real map above
    confidence_floor."""
    extreme = eq34_confidence(torch.tensor([1e6, -1e6, 0.0]), torch.tensor([1e9, 1.0, 0.0]), 2.0, 1.0, 1.0)
    assert extreme.tolist() == [0.5, -0.5, 0.0]
    rule4, rule7 = EELConfig(4, 1, 1, 1, threshold=1.0), EELConfig(7, 2, 1, 1, threshold=0.6)
    for seed in range(5):
        maps = smooth_maps(17, 16, 20, seed) ** (1 + 2 * seed)      # from smooth to very peaked
        for rule in (rule4, rule7):
            s = score_exit(maps, rule, detection_threshold=0.0)
            assert confidence_floor(rule.c0) <= s.confidence <= 0.5
            assert not should_exit(s, rule.threshold)
    assert confidence_floor(1.0) == pytest.approx(1 / (1 + math.exp(-3 / 8)) - 0.5)


def test_choose_exit_replays_the_rule_in_layer_order():
    scores = {4: ExitScore(5, 0.3), 7: ExitScore(5, 0.45)}
    assert choose_exit(scores, {4: 0.2, 7: 0.9}, 10) == 4
    assert choose_exit(scores, {4: 0.31, 7: 0.45}, 10) == 7           # conf >= threshold
    assert choose_exit(scores, {4: NEVER, 7: NEVER}, 10) == 10
    assert choose_exit({4: ExitScore(2, 0.4), 7: ExitScore(0, None)}, {4: NEVER, 7: NEVER}, 10) == 7


def test_exit_and_rule_settings_are_checked():
    assert resolve_exit("final", [4, 7, 10]) == 10 and resolve_exit("7", [4, 7, 10]) == 7
    assert resolve_exit("Dynamic", [4, 7, 10]) == "dynamic"
    for bad in ("5", "last", "-1"):
        with pytest.raises(ConfigError, match="not an exit of this network"):
            resolve_exit(bad, [4, 7, 10])
    with pytest.raises(ConfigError, match=r"configures layers \[4\]"):
        resolve_rules([EELConfig(layer=4)], [4, 7])
    with pytest.raises(ConfigError):
        resolve_rules([EELConfig(layer=4), EELConfig(layer=4)], [4, 7])


# --------------------------------------------------------------------------- #
# The network stops
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def net():
    return tiny_net()


def count_calls(net):
    """Forward hooks: layers whose cells ran, and EEL 1's Split calls."""
    calls = {"layers": [], "split1": 0}
    handles = []
    for cell in net.genotype.cells:
        if str(cell.index) in net.cells:
            handles.append(net.cells[str(cell.index)].register_forward_hook(
                lambda *_, layer=cell.layer: calls["layers"].append(layer)))
    handles.append(net.exits["1"].split.register_forward_hook(lambda *_: calls.__setitem__("split1", calls["split1"] + 1)))
    return calls, handles


@pytest.mark.parametrize("thresholds, exit_layer", [
    ((-1.0, NEVER), 1),            # conf > -0.5 > -1: always stops at the first EEL
    ((NEVER, -1.0), 2),
    ((1.0, 0.6), 3),               # the thesis' thresholds: only N = 0 could stop early
])
@pytest.mark.parametrize("flip", [True, False])
def test_forced_exits_skip_later_layers_and_report_the_profilers_gflops(net, thresholds, exit_layer, flip):
    cfg = tiny_infer(exit="dynamic", flip_test=flip,
                     eels=[EELConfig(layer=1, threshold=thresholds[0]), EELConfig(layer=2, c0=2.0, threshold=thresholds[1])])
    predictor = Predictor(net, cfg)
    image = random_image(64, 90, seed=4)
    calls, handles = count_calls(predictor.net)
    try:
        result = predictor.predict(image)
    finally:
        for h in handles:
            h.remove()
    assert result.exit == exit_layer
    assert all(s.detected > 0 for s in result.scores.values())       # exits came from thresholds, not N = 0
    assert sorted(result.scores) == [1, 2][:min(exit_layer, 2)]
    assert max(calls["layers"]) == exit_layer and set(calls["layers"]) == set(range(1, exit_layer + 1))
    assert calls["split1"] == (0 if exit_layer == 1 else 1)
    width, height = result.input_size
    profile = profile_network(net, (height, width))
    expected = next(e["gflops"] for e in profile["exits"] if e["layer"] == exit_layer)
    assert expected == net.exit_gflops((height, width))[exit_layer]
    assert result.gflops == pytest.approx(expected * (2 if flip else 1), rel=1e-12)


def test_static_exit_stops_there_too(net):
    predictor = Predictor(net, tiny_infer(exit="1"))
    calls, handles = count_calls(predictor.net)
    try:
        result = predictor.predict(random_image(64, 64))
    finally:
        for h in handles:
            h.remove()
    assert result.exit == 1 and set(calls["layers"]) == {1} and calls["split1"] == 0


def test_nothing_detected_stops_at_the_first_eel_with_no_people():
    """N = 0: a network whose heatmaps are all zero stops at the first EEL even though no
    threshold could fire, and reports nobody."""
    net = tiny_net(loud=False)
    with torch.no_grad():
        for head in net.heads.values():
            head.conv.weight[:17].zero_()
            head.conv.bias.zero_()
    cfg = tiny_infer(exit="dynamic", eels=[EELConfig(layer=1, threshold=NEVER), EELConfig(layer=2, threshold=NEVER)])
    predictor = Predictor(net, cfg)
    calls, handles = count_calls(predictor.net)
    try:
        result = predictor.predict(random_image(64, 80))
    finally:
        for h in handles:
            h.remove()
    assert result.exit == 1 and result.people == [] and result.scores == {1: ExitScore(0, None)}
    assert set(calls["layers"]) == {1}
    assert Predictor(net, tiny_infer(exit="final")).predict(random_image(64, 80)).people == []


# --------------------------------------------------------------------------- #
# Batched dynamic inference
# --------------------------------------------------------------------------- #
def reference_dynamic(net, predictor, image):
    """One image, the independent way: every exit computed, the rule replayed with choose_exit on
    the recorded scores, the chosen exit decoded. ``(exit layer, people)``."""
    flip = predictor.cfg.flip_test
    x, info = predictor.prepare(image)
    with torch.no_grad():
        exits = {o.layer: o for o in net(with_flips(x, flip))}
    scores = {layer: predictor.score(image_passes(exits[layer].heatmaps, 0, 1, flip), info, layer)
              for layer in predictor.rules}
    layer = choose_exit(scores, {k: r.threshold for k, r in predictor.rules.items()}, max(exits))
    if layer in scores and scores[layer].detected == 0:
        return layer, []
    out = exits[layer]
    return layer, decode_image(image_passes(out.heatmaps, 0, 1, flip), image_passes(out.tags, 0, 1, flip),
                               predictor.decode_params, info, predictor.flip_index)


@pytest.mark.parametrize("flip", [True, False])
def test_batched_dynamic_equals_one_image_at_a_time_on_a_mixed_batch(net, flip):
    """Thresholds between the images' own confidences make a batch whose images leave at layers
    1, 2 and 3; the batched run drops them as they exit and must give each image the exit and
    people of the one-at-a-time reference."""
    images = [random_image(64, 80, seed) for seed in range(7)] + [random_image(70, 64, 9)]  # two input sizes
    probe = Predictor(net, tiny_infer(exit="dynamic", flip_test=flip,
                                      eels=[EELConfig(layer=1, c0=0.05), EELConfig(layer=2, c0=0.05)]))
    conf = {layer: [] for layer in (1, 2)}
    for image in images:
        x, info = probe.prepare(image)
        with torch.no_grad():
            exits = net(with_flips(x, flip))[:2]
        for out in exits:
            conf[out.layer].append(probe.score(image_passes(out.heatmaps, 0, 1, flip), info, out.layer).confidence)
    c1 = sorted(conf[1])
    t1 = (c1[-3] + c1[-4]) / 2                                        # the 3 most confident leave at 1
    c2 = sorted(c for c, d in zip(conf[2], conf[1]) if d < t1)
    t2 = (c2[-2] + c2[-3]) / 2                                        # 2 of the other 5 leave at 2
    cfg = tiny_infer(exit="dynamic", flip_test=flip, eels=[EELConfig(layer=1, c0=0.05, threshold=t1),
                                                           EELConfig(layer=2, c0=0.05, threshold=t2)])
    predictor = Predictor(net, cfg)
    runs = predictor.net                                    # the network it runs (optimized by default)
    expected = [reference_dynamic(runs, predictor, image) for image in images]
    assert sorted(layer for layer, _ in expected) == [1, 1, 1, 2, 2, 3, 3, 3]
    last_cell = next(c for c in runs.genotype.cells if c.layer == 3 and str(c.index) in runs.cells)
    rows_seen = []
    hook = runs.cells[str(last_cell.index)].register_forward_hook(
        lambda module, args, output: rows_seen.append(output.shape[0]))
    try:
        batched = predictor.predict_batch(images)
    finally:
        hook.remove()
    assert sum(rows_seen) == 3 * predictor.passes           # only the images still running reach layer 3
    single = [predictor.predict(image) for image in images]
    for (layer, people), b, s in zip(expected, batched, single):
        assert b.exit == s.exit == layer
        assert same_people(b.people, people) and same_people(s.people, people)
        assert b.gflops == s.gflops and sorted(b.scores) == [1, 2][:min(layer, 2)]
    assert sum(len(p) for _, p in expected) > 0
