"""``from threempose.predictor import Predictor`` keeps working: the predictor lives in
:mod:`threempose.inference.predictor`."""
from threempose.inference.predictor import Prediction, Predictor  # noqa: F401  (the public path)
