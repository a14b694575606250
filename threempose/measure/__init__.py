"""Measuring networks for users and for the search: params and GFLOPs per exit
(:mod:`~threempose.measure.profile`) and per-block latency tables
(:mod:`~threempose.measure.latency`). The libraries behind ``threempose.profile`` and
``threempose.latency``."""
