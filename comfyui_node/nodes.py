"""The pack's nodes: a detector loader, a second opinion, a safety filter, a safety switch, and a
region detector loader and region filter, as one table.

:data:`NODES` describes each node once (see :mod:`.schema`); the classic (V1) classes below and
the V3 classes of :mod:`.v3` are both generated from it. Every choice comes from the core: the
registry and the local folders, ``nsfw_safety.censor.ACTIONS``, ``NSFW_LEVELS``, and the
defaults of :class:`SafetyFilter`.

The nodes are thin: every decision, resize and censoring kernel is ``nsfw_safety``'s. An IMAGE
is ComfyUI's ``(B, H, W, C) float32 in [0, 1]`` batch (usually on the CPU); it is scored as one
batch on the detector's device and comes back in the same layout, dtype and device.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

import torch

from nsfw_safety import ACTIONS as CENSOR_ACTIONS
from nsfw_safety import LEVELS, NSFW_LEVELS, REGISTRY, Detector, FilterResult, SafetyFilter
from nsfw_safety.cascade import BANDLESS, RULES, is_detector, second_opinion
from nsfw_safety.models import DEFAULT_MODEL
from nsfw_safety.vocabulary import HIDING_ACTIONS
from nsfw_safety.video import check_video, frame_ranges
from nsfw_safety.regions import CLASS_SETS, SHAPES, RegionDetector, RegionSettings

from . import management, region_models
from .schema import COMBO, Input, Node, Output, classic

try:  # lets the switch skip the branch that received no images
    from comfy_execution.graph import ExecutionBlocker
except ImportError:
    ExecutionBlocker = None

CATEGORY = "image/safety"
DETECTOR = "NSFW_DETECTOR"
#: The censor actions the nodes offer: all of the core's. Each one works with the core's
#: default settings, which is all a node passes (``placeholder`` shows the built-in card).
ACTIONS = tuple(CENSOR_ACTIONS)
_NO_ACTION = next(a for a in ACTIONS if a not in HIDING_ACTIONS)  # what an uncensored frame's action reads
#: level, threshold and action default to the filter's own defaults.
_DEFAULTS = {name: p.default for name, p in inspect.signature(SafetyFilter).parameters.items()}
REGION_DETECTOR = "NSFW_REGION_DETECTOR"
#: classes, threshold, expand, shape and feather default to the region settings' own defaults.
_REGION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RegionSettings)}


def _check(images: Any, detector: Any) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise TypeError(f"images must be a ComfyUI IMAGE, a (B, H, W, C) tensor; got "
                        f"{type(images).__name__} of shape {tuple(getattr(images, 'shape', ()))}")
    if not is_detector(detector):
        raise TypeError(f"detector must come from the NSFW Detector Loader or NSFW Second Opinion node, "
                        f"got {type(detector).__name__}")


def guard(images: torch.Tensor, detector: Detector, level: str, threshold: float, action: str) -> FilterResult:
    """Score and censor a whole IMAGE batch at once.

    Args:
        images: (B, H, W, C) float32 in [0, 1].
    Returns:
        ``FilterResult`` whose images are (B, H, W, C), same dtype and device. If scoring raises,
        every image is flagged and black (``SafetyFilter`` fails closed and logs the error).
    """
    _check(images, detector)
    management.activate(detector)
    return SafetyFilter(detector, level, threshold, action=action)(images, layout="BHWC")


def max_score(result: FilterResult, level: str) -> float:
    """The highest ``level`` score of the batch; 1.0 when scoring failed."""
    if result.scores is None:
        return 1.0
    return float(result.scores.levels[:, LEVELS.index(level)].max())


def report(result: FilterResult, detector: Detector, level: str, threshold: float, action: str,
           window: int = 0) -> str:
    """JSON: the rule, per image its flag, reason, action, level scores and class probabilities,
    and the batch as frames: ``flagged_frames`` and ``censored_frames`` as inclusive index ranges."""
    scores = result.scores.to_dicts() if result.scores is not None else [{}] * len(result.flagged)
    rows = zip(result.flagged, result.reasons, result.actions, scores)
    images = [{"index": i, "flagged": flagged, "reason": reason, "action": act,
               "levels": s.get("levels"), "probs": s.get("probs"), "problem": s.get("problem"),
               **({"parts": s["parts"]} if "parts" in s else {})}  # a second opinion: each model's scores
              for i, (flagged, reason, act, s) in enumerate(rows)]
    return json.dumps({"model": detector.model_id, "level": level, "threshold": threshold, "action": action,
                       "window": window, "any_flagged": result.any_flagged, **_frames(result),
                       "images": images}, allow_nan=False)


def _frames(result: FilterResult) -> dict[str, list[list[int]]]:
    """The batch as frames: ``flagged_frames`` and ``censored_frames`` as inclusive index ranges."""
    ranges = lambda keep: [list(r) for r in frame_ranges([i for i, k in enumerate(keep) if k])]  # noqa: E731
    return {"flagged_frames": ranges(result.flagged),
            "censored_frames": ranges([a in HIDING_ACTIONS for a in result.actions])}


def flag_mask(result: FilterResult, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float32 MASK on the images' device: 1 over flagged images, 0 elsewhere."""
    b, h, w = images.shape[:3]
    flags = torch.tensor(result.flagged, dtype=torch.float32, device=images.device)
    return flags.view(b, 1, 1).expand(b, h, w).contiguous()


def run_loader(model: str, dtype: str) -> tuple[Detector]:
    """Load a detector (once per model and dtype: a re-executed loader does not reload)."""
    return (management.load(model, dtype),)


_OPINION = inspect.signature(second_opinion).parameters


def run_second_opinion(first: Any, second: Any, combine: str, level: str, band_low: float,
                       band_high: float) -> tuple:
    """(one detector made of the two): a cascade, whose second model scores only the images whose
    first score at ``level`` is in [band_low, band_high]; or, for ``any``/``all``, an ensemble."""
    for name, d in (("first", first), ("second", second)):
        if not is_detector(d):
            raise TypeError(f"{name} must come from an NSFW Detector Loader node, got {type(d).__name__}")
    band = None if combine in BANDLESS else (band_low, band_high)
    return (second_opinion(first, second, band=band, level=level, combine=combine),)


class WorkflowStopped(RuntimeError):
    """Raised by the filter with ``stop_on_flag`` on: ComfyUI ends the prompt there, shows the
    message in the UI (an execution error, also in ``/history``), and runs no later node."""


def stop_message(result: FilterResult, shown: int = 8) -> str:
    """Which images were flagged and why, for the UI; the first ``shown`` of them."""
    hits = [f"#{i}: {reason}" for i, (flag, reason) in enumerate(zip(result.flagged, result.reasons)) if flag]
    more = f"; and {len(hits) - shown} more" if len(hits) > shown else ""
    return (f"NSFW Safety Filter stopped the workflow: {len(hits)} of {len(result.flagged)} images flagged "
            f"({'; '.join(hits[:shown])}{more}). No later node received them.")


def guard_frames(images: torch.Tensor, detector: Detector, level: str, threshold: float, action: str,
                 window: int) -> FilterResult:
    """The batch as the frames of one video: each flagged frame also censors the ``window``
    frames either side (so a censored region does not flicker), by ``check_video``.

    Args:
        images: (F, H, W, C) float32 in [0, 1].
    Returns:
        ``FilterResult`` with one entry per frame; a frame censored for its neighbours is not
        flagged, and its action is the one applied.
    """
    _check(images, detector)
    management.activate(detector)
    return check_frames(images, SafetyFilter(detector, level, threshold, action=action), window)


def check_frames(images: torch.Tensor, guard: SafetyFilter, window: int) -> FilterResult:
    """:func:`check_video` on a checked IMAGE batch as the frames of one video, as a ``FilterResult``
    (the filter and region filter nodes' one path for frames).

    Args:
        images: (F, H, W, C) float32 in [0, 1]; ``guard`` has a classifier.
    Returns:
        one entry per frame. In region mode, ``regions`` per frame and ``masks`` (F, H, W)
        float32 in [0, 1] on the images' device: each censored frame's region mask, 1 over a
        frame censored whole, 0 over the frames left as they were.
    """
    video = check_video(images, guard, window=window, layout="FHWC")
    hit = set(video.flagged_frames)
    n = video.total
    actions = [video.actions.get(i, _NO_ACTION) for i in range(n)]
    reasons = video.frame_reasons if len(video.frame_reasons) == n else [video.reason] * n
    notes = video.region_reasons or {}  # region mode: what the search found, neighbours named
    reasons = [f"{r}; {notes[i]}" if i in notes else
               r + f"; censored: within {window} frames of a flagged frame" if a in HIDING_ACTIONS and i not in hit
               else r for i, (r, a) in enumerate(zip(reasons, actions))]
    regions = masks = None
    if video.regions is not None:
        regions = [video.regions.get(i, []) for i in range(n)]
        f, h, w = images.shape[:3]
        whole = torch.tensor([i in video.actions for i in range(f)], dtype=torch.float32, device=images.device)
        masks = whole.view(f, 1, 1).expand(f, h, w).contiguous()
        if video.masks:
            index = sorted(video.masks)
            masks[index] = torch.stack([video.masks[i] for i in index]).to(images.device)
    return FilterResult(images=video.frames, flagged=[i in hit or video.error is not None for i in range(n)],
                        reasons=reasons, actions=actions, scores=video.scores, regions=regions, masks=masks)


def run_filter(images: torch.Tensor, detector: Detector, level: str, threshold: float, action: str,
               window: int = 0, stop_on_flag: bool = False) -> tuple:
    """(censored images, any flagged, max score, JSON report, flag mask); ``window`` > 0 treats
    the batch as video frames (see :func:`guard_frames`).

    Raises:
        WorkflowStopped: ``stop_on_flag`` is on and an image is flagged (or could not be checked).
    """
    if window:
        result = guard_frames(images, detector, level, threshold, action, window)
    else:
        result = guard(images, detector, level, threshold, action)
    if stop_on_flag and result.any_flagged:
        raise WorkflowStopped(stop_message(result))
    return (result.images, result.any_flagged, max_score(result, level),
            report(result, detector, level, threshold, action, window), flag_mask(result, images))


def run_switch(images: torch.Tensor, detector: Detector, level: str, threshold: float, action: str) -> tuple:
    """(unflagged images, flagged images censored by ``action``, any flagged, JSON report)."""
    result = guard(images, detector, level, threshold, action)
    flagged = torch.tensor(result.flagged, device=result.images.device)
    return (_branch(result.images[~flagged]), _branch(result.images[flagged]), result.any_flagged,
            report(result, detector, level, threshold, action))


def run_region_loader(model: str) -> tuple[RegionDetector]:
    """Load a region detector (once per model file)."""
    return (region_models.load(model),)


def run_region_filter(images: torch.Tensor, region_detector: RegionDetector, classes: str, region_threshold: float,
                      expand: float, shape: str, feather: float, action: str, detector: Detector | None = None,
                      level: str = _DEFAULTS["level"], threshold: float = _DEFAULTS["threshold"],
                      window: int = 0) -> tuple:
    """(images censored in their regions, any flagged, max score, JSON report, region mask).

    With a classifier (``detector``) it decides which images are flagged, and a flagged image
    with no region found is censored whole; without one, an image is flagged when a region is
    found. The mask is (B, H, W) float32 in [0, 1] on the images' device: ready for an
    inpainting node. ``window`` > 0 (with a classifier only) treats the batch as video frames
    (see :func:`check_frames`): a frame censored for a flagged neighbour is censored in its own
    regions, or whole when none is found.

    Raises:
        ValueError: ``window`` > 0 without a classifier: region-only mode has no per-frame
            verdict to spread (``check_video`` needs a classifier).
    """
    if not isinstance(region_detector, RegionDetector):
        raise TypeError(f"region_detector must come from the NSFW Region Detector Loader node, "
                        f"got {type(region_detector).__name__}")
    if detector is not None:
        _check(images, detector)
        management.activate(detector)
    elif not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise TypeError(f"images must be a ComfyUI IMAGE, a (B, H, W, C) tensor; got {type(images).__name__}")
    elif window:
        raise ValueError(f"window={window} needs a classifier: connect the detector input, or set window to 0 "
                         f"(without a detector each image is censored in its own regions)")
    settings = RegionSettings(region_detector, classes, region_threshold, expand, shape, feather)
    guard = SafetyFilter(detector, level, threshold, action=action, regions=settings)
    result = check_frames(images, guard, window) if window else guard(images, layout="BHWC")
    if detector is not None:
        best = max_score(result, level)
    else:
        best = max((r.score for found in result.regions for r in found), default=0.0)
    return (result.images, result.any_flagged, best, region_report(result, detector, settings, level, threshold,
                                                                   action, window), result.masks)


def region_report(result: FilterResult, detector: Detector | None, settings: RegionSettings, level: str,
                  threshold: float, action: str, window: int = 0) -> str:
    """:func:`report` plus the region settings and each image's regions (boxes in pixels)."""
    if detector is not None:
        out = json.loads(report(result, detector, level, threshold, action, window))
    else:  # region-only: no classifier, no scores
        rows = zip(result.flagged, result.reasons, result.actions)
        out = {"model": None, "level": None, "threshold": None, "action": action, "window": window,
               "any_flagged": result.any_flagged, **_frames(result),
               "images": [{"index": i, "flagged": f, "reason": r, "action": a} for i, (f, r, a) in enumerate(rows)]}
    out["regions"] = settings.to_dict()
    for row, found in zip(out["images"], result.regions):
        row["regions"] = [r.to_dict() for r in found]
    return json.dumps(out, allow_nan=False)


def _branch(images: torch.Tensor) -> Any:
    """An empty branch blocks its downstream nodes in ComfyUI (outside it: the empty batch)."""
    if len(images) == 0 and ExecutionBlocker is not None:
        return ExecutionBlocker(None)
    return images


# --- the table -----------------------------------------------------------------------------------

def _rule_inputs(action_tooltip: str) -> tuple[Input, ...]:
    """The inputs shared by the filter and the switch."""
    return (
        Input("images", "IMAGE"),
        Input("detector", DETECTOR),
        Input("level", COMBO, "flag an image when its score for this level (or above) reaches the threshold",
              default=_DEFAULTS["level"], choices=lambda: NSFW_LEVELS),
        Input("threshold", "FLOAT", default=_DEFAULTS["threshold"], min=0.0, max=1.0, step=0.01),
        Input("action", COMBO, action_tooltip, default=_DEFAULTS["action"], choices=lambda: ACTIONS),
    )


_WINDOW = Input("window", "INT", "a batch of video frames: also censor this many frames either side of each "
               "flagged frame, so the censoring does not flicker (0: images are independent)",
               default=0, min=0, max=1000, step=1, optional=True)

_MODEL_TOOLTIP = (f"a registry model ({', '.join(REGISTRY)}; {DEFAULT_MODEL} is the default) or a checkpoint "
                  f"folder under models/{management.FOLDER}; a folder named like a registry model takes its place")

NODES: tuple[Node, ...] = (
    Node("NSFWDetectorLoader", "NSFW Detector Loader", CATEGORY,
         "Loads an NSFW image classifier (cached: re-running the workflow does not reload it).",
         "load", run_loader,
         inputs=(Input("model", COMBO, _MODEL_TOOLTIP, default=DEFAULT_MODEL, choices=management.model_choices),
                 Input("dtype", COMBO, "auto: bf16 on a GPU and on CPUs with native bf16, fp32 elsewhere", default="auto",
                       choices=lambda: management.DTYPES)),
         outputs=(Output(DETECTOR, "detector", "the classifier, for the filter and switch nodes"),)),
    Node("NSFWSecondOpinion", "NSFW Second Opinion", CATEGORY,
         "Combines two detectors into one: the second re-checks the images whose first score is in a band "
         "(by default those the first flags), or both check every image.",
         "combine", run_second_opinion,
         inputs=(Input("first", DETECTOR, "scores every image"),
                 Input("second", DETECTOR, "scores only the images in the band (or every image for any/all)"),
                 Input("combine", COMBO, "the final levels where the second scored: override = the second's; "
                       "mean or max of both; any/all: both models on every image, flagged when either/both flag",
                       default=_OPINION["combine"].default, choices=lambda: RULES),
                 Input("level", COMBO, "the first model's level whose score selects the band",
                       default=_OPINION["level"].default, choices=lambda: NSFW_LEVELS),
                 Input("band_low", "FLOAT", "lowest first score sent to the second model (bounds included)",
                       default=_OPINION["threshold"].default, min=0.0, max=1.0, step=0.01),
                 Input("band_high", "FLOAT", "highest first score sent to the second model; 1 with band_low = "
                       "the filter's threshold re-checks every image the first flags",
                       default=1.0, min=0.0, max=1.0, step=0.01)),
         outputs=(Output(DETECTOR, "detector", "both as one detector, for the filter and switch nodes"),)),
    Node("NSFWSafetyFilter", "NSFW Safety Filter", CATEGORY,
         "Scores the whole batch and censors the flagged images (fails closed).",
         "filter", run_filter,
         inputs=_rule_inputs("what to do with flagged images; none only flags them. "
                             "Images that could not be checked are always black") + (
             _WINDOW,
             Input("stop_on_flag", "BOOLEAN", "stop the whole workflow with an error when any image is flagged, "
                   "so no later node (save, upload, API output) receives the batch", default=False, optional=True),),
         outputs=(Output("IMAGE", "images", "the input with flagged images censored"),
                  Output("BOOLEAN", "nsfw", "true if any image is flagged"),
                  Output("FLOAT", "max_score", "the highest score of the chosen level in the batch"),
                  Output("STRING", "report", "JSON: per-image scores, flags and reasons"),
                  Output("MASK", "mask", "1 over flagged images, 0 elsewhere"))),
    Node("NSFWSafetySwitch", "NSFW Safety Switch", CATEGORY,
         "Splits a batch into safe and flagged images, so each can go to its own branch.",
         "switch", run_switch,
         inputs=_rule_inputs("applied to the flagged output; none routes them unchanged "
                             "(images that could not be checked are always black)"),
         outputs=(Output("IMAGE", "safe", "the images that passed; nodes after it are skipped when there are none"),
                  Output("IMAGE", "flagged", "the flagged images; nodes after it are skipped when there are none"),
                  Output("BOOLEAN", "nsfw", "true if any image is flagged"),
                  Output("STRING", "report", "JSON: per-image scores, flags and reasons"))),
    Node("NSFWRegionDetectorLoader", "NSFW Region Detector Loader", CATEGORY,
         "Loads NudeNet's body-part detector, which says where to censor (cached). NudeNet's code and model "
         "are AGPL-3.0.", "load", run_region_loader,
         inputs=(Input("model", COMBO, "the installed nudenet package's model, or a .onnx file under "
                                       f"models/{region_models.FOLDER}", choices=region_models.choices),),
         outputs=(Output(REGION_DETECTOR, "region_detector", "for the region filter node"),)),
    Node("NSFWRegionFilter", "NSFW Region Filter", CATEGORY,
         "Censors only the regions the region detector finds in flagged images, and outputs their mask for "
         "inpainting. With a classifier connected it decides which images are flagged (one with no region "
         "found is censored whole); without one, any region found flags the image.",
         "filter", run_region_filter,
         inputs=(Input("images", "IMAGE"),
                 Input("region_detector", REGION_DETECTOR),
                 Input("classes", COMBO, "what to censor: exposed parts, faces (privacy), or every class",
                       default=_REGION_DEFAULTS["classes"], choices=lambda: tuple(CLASS_SETS)),
                 Input("region_threshold", "FLOAT", "a region is censored when its score reaches this",
                       default=_REGION_DEFAULTS["threshold"], min=0.0, max=1.0, step=0.01),
                 Input("expand", "FLOAT", "grow each box by this fraction of its size",
                       default=_REGION_DEFAULTS["expand"], min=0.0, max=2.0, step=0.05),
                 Input("shape", COMBO, default=_REGION_DEFAULTS["shape"], choices=lambda: SHAPES),
                 Input("feather", "FLOAT", "soft edge, a fraction of the box's longer side",
                       default=_REGION_DEFAULTS["feather"], min=0.0, max=1.0, step=0.01),
                 Input("action", COMBO, "what to do inside the regions; none only outputs the mask. Images that "
                                        "could not be checked are black", default=_DEFAULTS["action"],
                       choices=lambda: ACTIONS),
                 Input("detector", DETECTOR, "optional classifier that decides which images are flagged",
                       optional=True),
                 Input("level", COMBO, "with a classifier: flag an image when its score for this level reaches "
                                       "the threshold", default=_DEFAULTS["level"], choices=lambda: NSFW_LEVELS,
                       optional=True),
                 Input("threshold", "FLOAT", "with a classifier", default=_DEFAULTS["threshold"], min=0.0, max=1.0,
                       step=0.01, optional=True),
                 dataclasses.replace(_WINDOW, tooltip=_WINDOW.tooltip + "; with a classifier, each censored frame "
                                     "in its own regions")),
         outputs=(Output("IMAGE", "images", "the input with the regions of flagged images censored"),
                  Output("BOOLEAN", "nsfw", "true if any image is flagged"),
                  Output("FLOAT", "max_score", "the classifier's highest score of the chosen level; without one, "
                                               "the highest region score"),
                  Output("STRING", "report", "JSON: per-image flags, reasons, scores and regions"),
                  Output("MASK", "mask", "where each image was censored (1 over an image censored whole, 0 over "
                                         "one passed): feed it to an inpainting node"))),
)

NODE_CLASS_MAPPINGS = {node.node_id: classic(node) for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.node_id: node.display_name for node in NODES}
NSFWDetectorLoader = NODE_CLASS_MAPPINGS["NSFWDetectorLoader"]
NSFWSecondOpinion = NODE_CLASS_MAPPINGS["NSFWSecondOpinion"]
NSFWSafetyFilter = NODE_CLASS_MAPPINGS["NSFWSafetyFilter"]
NSFWSafetySwitch = NODE_CLASS_MAPPINGS["NSFWSafetySwitch"]
NSFWRegionDetectorLoader = NODE_CLASS_MAPPINGS["NSFWRegionDetectorLoader"]
NSFWRegionFilter = NODE_CLASS_MAPPINGS["NSFWRegionFilter"]
