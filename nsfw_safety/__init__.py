"""nsfw-safety: a fast, fail-closed NSFW safety checker for image generation.

    from nsfw_safety import load_detector, SafetyFilter
    guard = SafetyFilter(load_detector("eva"), level="medium", threshold=0.5, action="blur")
    out = guard(images)        # out.images, out.flagged, out.scores, out.reasons

The public names are imported on first use, so that ``import nsfw_safety`` (and the command
line's ``--help``) does not pay for torch, timm and transformers until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "ACTIONS": "vocabulary", "LEVELS": "vocabulary", "NSFW_LEVELS": "vocabulary",
    "Detector": "detector", "Scores": "detector", "load_detector": "detector",
    "FilterResult": "filter", "SafetyFilter": "filter",
    "Policy": "levels",
    "REGISTRY": "models", "ModelLoadError": "models", "ModelSpec": "models", "register": "models",
    "PreprocessConfig": "preprocess",
    "Cascade": "cascade", "Ensemble": "cascade", "second_opinion": "cascade",
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from .cascade import Cascade, Ensemble, second_opinion
    from .detector import Detector, Scores, load_detector
    from .filter import FilterResult, SafetyFilter
    from .levels import Policy
    from .models import REGISTRY, ModelLoadError, ModelSpec, register
    from .preprocess import PreprocessConfig
    from .vocabulary import ACTIONS, LEVELS, NSFW_LEVELS


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
