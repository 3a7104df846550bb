"""SmartFRZ: the policy, its attention predictor, layer tailoring, and the predictor's corpus and fitting."""

from .policy import SmartFRZ, SmartFRZConfig
from .predictor import DEFAULT_PREDICTOR, FreezePredictor
from .tailoring import WeightTailor

__all__ = ["DEFAULT_PREDICTOR", "FreezePredictor", "SmartFRZ", "SmartFRZConfig", "WeightTailor"]
