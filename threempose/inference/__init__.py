"""Inference: deploy forms, exit segments, low-precision (bf16 / int8) forms."""
