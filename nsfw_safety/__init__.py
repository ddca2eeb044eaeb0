"""nsfw-safety: a fast, fail-closed NSFW safety checker for image generation.

    from nsfw_safety import load_detector, SafetyFilter
    guard = SafetyFilter(load_detector("eva"), level="medium", threshold=0.5, action="blur")
    out = guard(images)        # out.images, out.flagged, out.scores, out.reasons
"""

from .cascade import Cascade, Ensemble, second_opinion
from .censor import ACTIONS
from .detector import Detector, Scores, load_detector
from .filter import FilterResult, SafetyFilter
from .levels import LEVELS, NSFW_LEVELS, Policy
from .models import REGISTRY, ModelLoadError, ModelSpec, register
from .preprocess import PreprocessConfig

__version__ = "0.1.0"
__all__ = [
    "ACTIONS", "LEVELS", "NSFW_LEVELS", "REGISTRY", "Cascade", "Detector", "Ensemble", "FilterResult",
    "ModelLoadError", "ModelSpec", "Policy", "PreprocessConfig", "SafetyFilter", "Scores", "load_detector",
    "register", "second_opinion",
]
