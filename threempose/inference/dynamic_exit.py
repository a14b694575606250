"""Dynamic inference: the early-exit confidence and rule (thesis §3.1.4, Eq. 3.1-3.4).

At each EEL the predicted heatmaps are scored and the network either stops there or goes on::

    rules = resolve_rules(cfg.eels, net.genotype.eels)          # {layer: EELConfig}
    score = score_exit(merged_heatmaps, rules[layer], cfg.detection_threshold)
    if should_exit(score, rules[layer].threshold): ...           # stop: decode this exit

What is scored, per image
-------------------------
* ``heatmaps`` ``[J, h, w]``: the exit's heatmaps of one image as the decoder sees them (with
  flip test, the average of the image's and its flipped-back mirror's maps), cropped to the
  part that covers the image (the padding the network input needs is left out: it would add
  an arbitrary number of near-zero values and shift every moment).
* ``N`` (the thesis' "number of detected keypoints"): we count *joint types* with at least one
  heatmap value ``> detection_threshold`` (the decoder's candidate test, so ``N = 0`` exactly
  when decoding this exit can find no keypoint at all; the global maximum of a map is always
  an NMS peak, so "no peak above the threshold" and "no value above it" are the same).
* Per-joint skew and kurtosis (:func:`threempose.kernels.heatmap_moments`: population moments,
  plain -- not excess -- kurtosis, Eq. 3.1-3.3) are reduced to one number per image by the
  **mean over the detected joints** (joints whose map has no value above the threshold are
  noise-only maps whose shape says nothing about the people). The thesis does not say how it
  reduces; this is our choice.
* ``conf = sigmoid(c0 * (c1 * skew + c2 * kurt) / 2) - 0.5`` (Eq. 3.4), evaluated in float64.

The rule (:func:`should_exit`): stop at an EEL when ``N == 0`` (nothing detected: the image is
reported with no people, the later layers never run) or when ``conf >= threshold``; otherwise
go on; the last layer always stops. :func:`choose_exit` replays the rule on recorded scores
(calibration), so the live run and the replay cannot disagree.

Reading the thesis' settings critically
---------------------------------------
* ``conf = sigmoid(.) - 0.5`` lies in the open interval ``(-0.5, 0.5)`` (in floating point it
  reaches 0.5 exactly once the sigmoid rounds to 1). The thesis' thresholds, 1 at layer 4 and
  0.6 at layer 7, can therefore **never** be met: with the thesis settings
  only the ``N = 0`` rule ever exits early. (Table 4.3 is consistent with that: 38.7 % of the
  images leave at layer 4 and 8 % at layer 7, and the text calls layer 4 "an excellent human
  detector" that "rejects most of the negative samples", i.e. images where nothing is found.)
  We implement the formula exactly as written; nothing is clipped or rescaled. Use
  ``python -m threempose.calibrate`` to choose thresholds that can fire.
* The thesis says skew and kurtosis "fall between 1 and -1"; they do not. Plain kurtosis is
  ``>= 1`` for any map and ``>= skew^2 + 1`` (Pearson's inequality), so with ``c1 = c2 = 1``
  the sigmoid's argument is ``>= c0 * 3/8`` and ``conf >= sigmoid(3 c0 / 8) - 0.5`` (0.093 for
  ``c0 = 1``, 0.179 for ``c0 = 2``) whenever a map is not flat (the mean over joints keeps the
  bound, by Jensen). Flat maps have no defined shape: ``heatmap_moments`` reports skew = kurt =
  0 for them, giving ``conf = 0``.
* Heatmaps with a few sharp Gaussian peaks are extremely skewed and heavy-tailed: one
  sigma-2 peak on a 128 x 128 map (a 512 input) has skew ~ 20 and kurtosis ~ 500, five peaks
  ~ 10 and ~ 120. The sigmoid then saturates and ``conf`` is 0.5 to machine precision for
  practically every image with a detection, so with the thesis' ``c0`` the confidence cannot
  rank images at all; ``c0`` must be of the order of ``1 / (c1 * skew + c2 * kurt)`` for it to
  discriminate. It also rewards *fewer* and sharper peaks (one person scores higher than five).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from threempose.config import ConfigError, EELConfig
from threempose.kernels import heatmap_moments

DYNAMIC = "dynamic"
FINAL = "final"
# A threshold no confidence can reach, even in floating point (conf <= 0.5 when the sigmoid
# rounds to 1): the thesis' own value at layer 4.
NEVER = 1.0


@dataclass(frozen=True)
class ExitScore:
    """What the rule looks at for one image at one EEL.

    detected: ``N``, joint types with a heatmap value above the detection threshold.
    confidence: Eq. 3.4, in ``(-0.5, 0.5)`` mathematically, ``[-0.5, 0.5]`` in floating point
        (0.5 exactly where the sigmoid rounds to 1); None when
        ``detected == 0`` (no confidence is computed then).
    """

    detected: int
    confidence: Optional[float]

    def to_dict(self) -> dict:
        return {"detected": self.detected, "confidence": self.confidence}


def eq34_confidence(skew: Tensor, kurt: Tensor, c0: float, c1: float, c2: float) -> Tensor:
    """Eq. 3.4 elementwise: ``sigmoid(c0 * (c1 * skew + c2 * kurt) / 2) - 0.5`` (same shape, float64)."""
    arg = c0 * (c1 * skew.double() + c2 * kurt.double()) / 2
    return torch.sigmoid(arg) - 0.5


def score_exit(heatmaps: Tensor, rule: EELConfig, detection_threshold: float) -> ExitScore:
    """Score one image's exit.

    Args:
        heatmaps: ``[J, h, w]`` the image's heatmaps (flip-merged, cropped to the image).
        rule: the EEL's constants.
        detection_threshold: ``infer.detection_threshold``.
    Returns:
        :class:`ExitScore`: ``N`` and the confidence from the mean skew and mean kurtosis of
        the detected joints (see the module docstring).
    """
    if heatmaps.dim() != 3 or heatmaps.numel() == 0:
        raise ValueError(f"heatmaps must be a non-empty [J, h, w] tensor, got shape {tuple(heatmaps.shape)}")
    detected = heatmaps.flatten(1).amax(dim=1) > detection_threshold      # [J]
    n = int(detected.sum())
    if n == 0:
        return ExitScore(0, None)
    moments = heatmap_moments(heatmaps[None].float())[0, detected]        # [N, 4]
    skew, kurt = moments[:, 2].double().mean(), moments[:, 3].double().mean()
    return ExitScore(n, float(eq34_confidence(skew, kurt, rule.c0, rule.c1, rule.c2)))


def should_exit(score: ExitScore, threshold: float) -> bool:
    """The rule at an EEL: stop when nothing is detected or ``conf >= threshold``."""
    return score.detected == 0 or score.confidence >= threshold


def choose_exit(scores: Mapping[int, ExitScore], thresholds: Mapping[int, float], final_layer: int) -> int:
    """The layer :func:`should_exit` stops an image at, replayed from its recorded EEL scores.

    ``scores`` and ``thresholds`` are keyed by EEL layer (every EEL of the network); EELs are
    visited in layer order; ``final_layer`` when none stops.
    """
    for layer in sorted(thresholds):
        if should_exit(scores[layer], thresholds[layer]):
            return layer
    return final_layer


def resolve_exit(exit: str, exit_layers: Sequence[int]) -> int | str:
    """``infer.exit`` -> the exit layer to stop at, or ``"dynamic"``.

    ``exit`` is ``"final"`` (the last layer), ``"dynamic"``, or a layer number with an exit
    (e.g. ``"4"``); anything else is a ConfigError listing the choices.
    """
    text = str(exit).strip().lower()
    if text == DYNAMIC:
        return DYNAMIC
    if text == FINAL:
        return exit_layers[-1]
    if text.isdigit() and int(text) in exit_layers:
        return int(text)
    raise ConfigError(f"infer.exit {exit!r} is not an exit of this network; choose one of "
                      f"{', '.join(str(x) for x in exit_layers)}, 'final' or 'dynamic'")


def resolve_rules(eels: Sequence[EELConfig], eel_layers: Sequence[int]) -> dict[int, EELConfig]:
    """``{layer: EELConfig}`` for every EEL of the network, from ``infer.eels``.

    Raises ConfigError unless ``infer.eels`` configures exactly the network's EEL layers
    (a config written for another fabric, e.g. the thesis' layers 4 and 7 for a network whose
    EELs are at 2 and 3, would otherwise be silently ignored).
    """
    configured = [e.layer for e in eels]
    if sorted(configured) != sorted(eel_layers) or len(set(configured)) != len(configured):
        raise ConfigError(f"infer.eels configures layers {configured}, but the network's EELs are at "
                          f"{list(eel_layers)}; give one entry (layer, c0, c1, c2, threshold) per EEL, "
                          "or run python -m threempose.calibrate to write them")
    return {e.layer: e for e in eels}


def confidence_floor(c0: float, c1: float = 1.0, c2: float = 1.0) -> float:
    """The lowest Eq. 3.4 confidence any non-flat image can get (``c0 >= 0``, ``c2 > 0``).

    Pearson's inequality ``kurt >= skew^2 + 1`` gives ``c1 * skew + c2 * kurt >= c2 + min_s
    (c1 s + c2 s^2) = c2 - c1^2 / (4 c2)``, so ``conf >= sigmoid(c0 * (c2 - c1^2 / (4 c2)) / 2)
    - 0.5``: ``sigmoid(3 c0 / 8) - 0.5`` for the thesis' ``c1 = c2 = 1``.
    """
    if c2 <= 0 or c0 < 0:
        raise ValueError(f"the floor needs c0 >= 0 and c2 > 0, got c0={c0}, c2={c2}")
    arg = c0 * (c2 - c1 * c1 / (4 * c2)) / 2
    return 1.0 / (1.0 + math.exp(-arg)) - 0.5
