"""SmartFRZ: the policy, its attention predictor, layer tailoring, and the predictor's training pipeline."""

from .policy import SmartFRZ
from .predictor import DEFAULT_PREDICTOR, FreezePredictor
from .tailoring import WeightTailor

__all__ = ["DEFAULT_PREDICTOR", "FreezePredictor", "SmartFRZ", "WeightTailor"]
