"""Top-down (PNFS) crop, target and test-time settings: :class:`TopDownConfig`.

Kept free of torch and numpy so that :mod:`threempose.config` can type its ``pnfs.topdown``
section with it (config loading stays a pure-Python affair). :mod:`threempose.pnfs.topdown_data`
re-exports it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TopDownConfig:
    """Top-down (PNFS) crops, augmentation, targets and test-time settings."""

    input_width: int = 288            # W: crop width in pixels (PNFS COCO: 384 x 288)
    input_height: int = 384           # H: crop height
    heatmap_stride: int = 4           # score maps are at 1/stride of the crop
    sigma: float = 3.0                # Gaussian sigma in heatmap pixels (2.0 suits 256 x 192)
    box_padding: float = 1.25         # box size factor after the aspect-ratio fix
    scale_min: float = 0.7            # training: box size x U[scale_min, scale_max]
    scale_max: float = 1.3
    rotation: float = 45.0            # training: U[-rotation, rotation] degrees
    flip: bool = True                 # training: horizontal flip with probability 1/2
    vector_dim: int = 8               # d: vector in pixel length (1 = plain heatmap)
    min_keypoints: int = 1            # people with fewer labelled joints are not samples
    detection_threshold: float = 0.0  # evaluation on detections: boxes scoring less are dropped
    flip_test: bool = True            # inference: average with the flipped crop
    keypoint_threshold: float = 0.2   # inference: joints scoring above it make a person's mean score
    oks_nms_threshold: float = 0.9    # inference: drop a person whose OKS to a better one exceeds it

    def __post_init__(self) -> None:
        for name in ("input_width", "input_height", "heatmap_stride", "vector_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"TopDownConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("input_width", "input_height"):
            if getattr(self, name) % self.heatmap_stride:
                raise ValueError(f"TopDownConfig.{name} ({getattr(self, name)}) must be a multiple of "
                                 f"heatmap_stride ({self.heatmap_stride})")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"TopDownConfig needs 0 < scale_min <= scale_max, got "
                             f"{self.scale_min}, {self.scale_max}")
        if self.sigma <= 0 or self.box_padding <= 0 or self.rotation < 0:
            raise ValueError("TopDownConfig.sigma and box_padding must be > 0 and rotation >= 0")

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """``(h, w)`` of the score maps."""
        return self.input_height // self.heatmap_stride, self.input_width // self.heatmap_stride
