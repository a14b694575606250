"""threempose: search, train and serve bottom-up multi-person pose estimators
with neural architecture search (3M-Pose on Pose Neural Fabrics Search).

FLOPs convention: everywhere in threempose one multiply-add counts as ONE FLOP,
as the papers (and HigherHRNet's "47.9 GFLOPs") do. torch's FlopCounterMode
counts two per multiply-add; divide its figure by 2 to compare.

Layout: thin commands (``threempose.search``, ``train``, ``infer``, ``calibrate``, ``export``,
``evaluate``, ``profile``, ``latency``) over libraries in layers; see the README's "Layout"
section. The Python API: ``from threempose.predictor import Predictor``.
"""

__version__ = "0.1.0"
