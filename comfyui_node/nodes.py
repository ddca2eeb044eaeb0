"""Classic (V1) ComfyUI nodes: a detector loader, a safety filter and a safety switch.

The nodes are thin: every decision, resize and censoring kernel is ``nsfw_safety``'s. An IMAGE
is ComfyUI's ``(B, H, W, C) float32 in [0, 1]`` batch (usually on the CPU); it is scored as one
batch on the detector's device and comes back in the same layout, dtype and device.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from nsfw_safety import LEVELS, NSFW_LEVELS, Detector, FilterResult, SafetyFilter
from nsfw_safety.models import DEFAULT_MODEL

from . import management

try:  # lets the switch skip the branch that received no images
    from comfy_execution.graph import ExecutionBlocker
except ImportError:
    ExecutionBlocker = None

CATEGORY = "image/safety"
DETECTOR = "NSFW_DETECTOR"
ACTIONS = ("blur", "pixelate", "black", "none")

_LEVEL = (list(NSFW_LEVELS), {
    "default": "medium", "tooltip": "flag an image when its score for this level (or above) reaches the threshold"})
_THRESHOLD = ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01})


def _check(images: Any, detector: Any) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise TypeError(f"images must be a ComfyUI IMAGE, a (B, H, W, C) tensor; got "
                        f"{type(images).__name__} of shape {tuple(getattr(images, 'shape', ()))}")
    if not isinstance(detector, Detector):
        raise TypeError(f"detector must come from the NSFW Detector Loader node, got {type(detector).__name__}")


def guard(images: torch.Tensor, detector: Detector, level: str, threshold: float, action: str) -> FilterResult:
    """Score and censor a whole IMAGE batch at once.

    Args:
        images: (B, H, W, C) float32 in [0, 1].
    Returns:
        ``FilterResult`` whose images are (B, H, W, C), same dtype and device. If scoring raises,
        every image is flagged and black (``SafetyFilter`` fails closed and logs the error).
    """
    _check(images, detector)
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    management.activate(detector)
    return SafetyFilter(detector, level, threshold, action=action)(images, layout="BHWC")


def max_score(result: FilterResult, level: str) -> float:
    """The highest ``level`` score of the batch; 1.0 when scoring failed."""
    if result.scores is None:
        return 1.0
    return float(result.scores.levels[:, LEVELS.index(level)].max())


def report(result: FilterResult, detector: Detector, level: str, threshold: float, action: str) -> str:
    """JSON: the rule, and per image its flag, reason, action, level scores and class probabilities."""
    scores = result.scores.to_dicts() if result.scores is not None else [{}] * len(result.flagged)
    rows = zip(result.flagged, result.reasons, result.actions, scores)
    images = [{"index": i, "flagged": flagged, "reason": reason, "action": act,
               "levels": s.get("levels"), "probs": s.get("probs"), "problem": s.get("problem")}
              for i, (flagged, reason, act, s) in enumerate(rows)]
    return json.dumps({"model": detector.model_id, "level": level, "threshold": threshold, "action": action,
                       "any_flagged": result.any_flagged, "images": images}, allow_nan=False)


def flag_mask(result: FilterResult, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float32 MASK on the images' device: 1 over flagged images, 0 elsewhere."""
    b, h, w = images.shape[:3]
    flags = torch.tensor(result.flagged, dtype=torch.float32, device=images.device)
    return flags.view(b, 1, 1).expand(b, h, w).contiguous()


class NSFWDetectorLoader:
    """Load an NSFW classifier once; re-running the node reuses the loaded model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (management.model_choices(), {
                "default": DEFAULT_MODEL,
                "tooltip": "eva: Freepik EVA02 (4 levels, default); vit-sd, vit, falconsai: 2-class ViTs; "
                           f"or a checkpoint folder under models/{management.FOLDER}"}),
            "dtype": (list(management.DTYPES), {
                "default": "auto", "tooltip": "auto: bf16 on a GPU and on CPUs with native bf16, fp32 elsewhere"}),
        }}

    RETURN_TYPES = (DETECTOR,)
    RETURN_NAMES = ("detector",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads an NSFW image classifier (cached: re-running the workflow does not reload it)."

    def load(self, model: str, dtype: str):
        return (management.load(model, dtype),)


def _filter_inputs(action_tooltip: str) -> dict:
    """The inputs shared by the filter and the switch."""
    return {"required": {
        "images": ("IMAGE",),
        "detector": (DETECTOR,),
        "level": _LEVEL,
        "threshold": _THRESHOLD,
        "action": (list(ACTIONS), {"default": "blur", "tooltip": action_tooltip}),
    }}


class NSFWSafetyFilter:
    """Censor the flagged images of a batch, and report why."""

    @classmethod
    def INPUT_TYPES(cls):
        return _filter_inputs("what to do with flagged images; none only flags them. "
                              "Images that could not be checked are always black")

    RETURN_TYPES = ("IMAGE", "BOOLEAN", "FLOAT", "STRING", "MASK")
    RETURN_NAMES = ("images", "nsfw", "max_score", "report", "mask")
    OUTPUT_TOOLTIPS = ("the input with flagged images censored", "true if any image is flagged",
                       "the highest score of the chosen level in the batch",
                       "JSON: per-image scores, flags and reasons", "1 over flagged images, 0 elsewhere")
    FUNCTION = "filter"
    CATEGORY = CATEGORY
    DESCRIPTION = "Scores the whole batch and blurs, pixelates or blacks out the flagged images (fails closed)."

    def filter(self, images: torch.Tensor, detector: Detector, level: str, threshold: float, action: str):
        result = guard(images, detector, level, threshold, action)
        return (result.images, result.any_flagged, max_score(result, level),
                report(result, detector, level, threshold, action), flag_mask(result, images))


class NSFWSafetySwitch:
    """Route a batch: unflagged images to ``safe``, flagged ones (censored by ``action``) to ``flagged``."""

    @classmethod
    def INPUT_TYPES(cls):
        return _filter_inputs("applied to the flagged output; none routes them unchanged "
                              "(images that could not be checked are always black)")

    RETURN_TYPES = ("IMAGE", "IMAGE", "BOOLEAN", "STRING")
    RETURN_NAMES = ("safe", "flagged", "nsfw", "report")
    OUTPUT_TOOLTIPS = ("the images that passed; nodes after it are skipped when there are none",
                       "the flagged images; nodes after it are skipped when there are none",
                       "true if any image is flagged", "JSON: per-image scores, flags and reasons")
    FUNCTION = "switch"
    CATEGORY = CATEGORY
    DESCRIPTION = "Splits a batch into safe and flagged images, so each can go to its own branch."

    def switch(self, images: torch.Tensor, detector: Detector, level: str, threshold: float, action: str):
        result = guard(images, detector, level, threshold, action)
        flagged = torch.tensor(result.flagged, device=result.images.device)
        return (_branch(result.images[~flagged]), _branch(result.images[flagged]), result.any_flagged,
                report(result, detector, level, threshold, action))


def _branch(images: torch.Tensor) -> Any:
    """An empty branch blocks its downstream nodes in ComfyUI (outside it: the empty batch)."""
    if len(images) == 0 and ExecutionBlocker is not None:
        return ExecutionBlocker(None)
    return images


NODE_CLASS_MAPPINGS = {
    "NSFWDetectorLoader": NSFWDetectorLoader,
    "NSFWSafetyFilter": NSFWSafetyFilter,
    "NSFWSafetySwitch": NSFWSafetySwitch,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "NSFWDetectorLoader": "NSFW Detector Loader",
    "NSFWSafetyFilter": "NSFW Safety Filter",
    "NSFWSafetySwitch": "NSFW Safety Switch",
}
