"""Region mode's settings, and where to censor a batch: the one place that turns a region
detector's boxes into the regions an integration censors.

    from nsfw_safety import SafetyFilter, load_detector
    from nsfw_safety.regions import RegionSettings

    regions = RegionSettings(classes="exposed", threshold={"FEMALE_BREAST_EXPOSED": 0.4}, expand=0.2,
                             shape="ellipse", feather=0.05)
    guard = SafetyFilter(load_detector("eva"), regions=regions)   # the classifier decides whether,
    guard = SafetyFilter(None, regions=regions)                   # or the regions alone decide
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..vocabulary import CLASS_SETS, DEFAULT_CLASSES, MIN_SCORE, SHAPES, class_indices, per_class
from .detector import NMS_IOU, RegionDetector, Regions, default_model_path


@dataclass(frozen=True)
class RegionSettings:
    """Where flagged images are censored; validated when built.

    Attributes:
        detector: a :class:`RegionDetector`, or the path of a NudeNet YOLOv8 ``.onnx`` file;
            None: the 320n model of the installed ``nudenet`` package. Kept as a RegionDetector
            (a path or None is loaded here, once).
        classes: a name in ``CLASS_SETS`` (``"exposed"``, the default; ``"faces"`` for privacy
            mode; ``"all"``) or a sequence of the detector's class names (kept as a tuple).
        threshold: minimum score, one number for every chosen class or a mapping class -> score
            (classes it leaves out use ``MIN_SCORE``), each in [0, 1].
        expand: growth of each box's width and height as a fraction of it (0.2 = 20 % wider and
            taller, centred), one for all or per class, each in [0, 10].
        shape: ``"rectangle"`` or ``"ellipse"`` (inscribed in the box).
        feather: soft edge outside the shape, as a fraction of the box's longer side, in [0, 1].
    Raises:
        ValueError, TypeError: a bad value, naming it (unknown classes name the detector's).
        FileNotFoundError, ImportError: the model file, or nudenet/onnxruntime, is missing.
    """

    detector: Any = None
    classes: str | tuple[str, ...] = DEFAULT_CLASSES
    threshold: float | Mapping[str, float] = MIN_SCORE
    expand: float | Mapping[str, float] = 0.0
    shape: str = "rectangle"
    feather: float = 0.0

    def __post_init__(self) -> None:
        detector = self.detector
        if detector is None or isinstance(detector, (str, os.PathLike)):
            detector = RegionDetector(detector)
        elif not isinstance(detector, RegionDetector):
            raise TypeError(f"detector must be a RegionDetector, the path of a .onnx file or None, "
                            f"got {type(detector).__name__}")
        object.__setattr__(self, "detector", detector)
        classes = self.classes
        if not isinstance(classes, str):
            if not isinstance(classes, Iterable):
                raise TypeError(f"classes must be a name in {tuple(CLASS_SETS)} or a list of class names, "
                                f"got {classes!r}")
            classes = tuple(classes)
            if not classes or not all(isinstance(c, str) for c in classes):
                raise ValueError(f"classes must be a non-empty list of class names, got {list(classes)!r}")
        object.__setattr__(self, "classes", classes)
        chosen = class_indices(classes, detector.labels)  # raises for unknown names
        for name, bounds in (("threshold", (0.0, 1.0)), ("expand", (0.0, 10.0))):
            value = _number_or_mapping(getattr(self, name), name)
            per_class(value, name, chosen, detector.labels, 0.0, bounds)  # raises for bad values
            object.__setattr__(self, name, value)
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if isinstance(self.feather, bool) or not isinstance(self.feather, numbers.Real) or not 0 <= self.feather <= 1:
            raise ValueError(f"feather must be a number in [0, 1], got {self.feather!r}")
        object.__setattr__(self, "feather", float(self.feather))

    @property
    def labels(self) -> tuple[str, ...]:
        """The chosen class names."""
        return tuple(CLASS_SETS[self.classes]) if isinstance(self.classes, str) else self.classes

    def threshold_for(self, label: str) -> float:
        """The minimum score of class ``label``."""
        if isinstance(self.threshold, Mapping):
            return self.threshold.get(label, MIN_SCORE)
        return self.threshold

    def select(self, found: Regions) -> Regions:
        """The regions of ``found`` to censor: the chosen classes at their thresholds, expanded."""
        return found.select(self.classes, self.threshold, self.expand)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly; ``model`` is None for the installed nudenet package's model, else the
        path of the ``.onnx`` file (recorded, never copied: the file is the user's, and AGPL-3.0)."""
        return {"model": _reference(self.detector.path), "min_score": self.detector.min_score,
                "iou": self.detector.iou, "classes": self.classes if isinstance(self.classes, str) else
                list(self.classes), "threshold": _plain(self.threshold), "expand": _plain(self.expand),
                "shape": self.shape, "feather": self.feather}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, device: torch.device | str | None = None) -> RegionSettings:
        """Settings from :meth:`to_dict`'s output (the detector loaded from ``model`` on ``device``)."""
        values = dict(values)
        unknown = sorted(set(values) - {"model", "min_score", "iou", "classes", "threshold", "expand", "shape",
                                        "feather"})
        if unknown:
            raise ValueError(f"unknown region settings {unknown}")
        detector = RegionDetector(values.pop("model", None), device=device,
                                  min_score=values.pop("min_score", MIN_SCORE), iou=values.pop("iou", NMS_IOU))
        return cls(detector, **values)


def _number_or_mapping(value: Any, name: str) -> float | dict[str, float]:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name}[{k!r}] must be a number, got {v!r}")
            out[k] = float(v)
        return out
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a mapping class -> number, got {value!r}")
    return float(value)


def _plain(value: float | Mapping[str, float]) -> float | dict[str, float]:
    return dict(value) if isinstance(value, Mapping) else value


def _reference(path: Path) -> str | None:
    try:
        if path.resolve() == default_model_path().resolve():
            return None
    except ImportError:
        pass
    return str(path.resolve())


def locate(settings: RegionSettings, pixels: torch.Tensor) -> Regions:
    """The regions to censor in a batch, found in every view a viewer can see of each image.

    An image with transparency is seen over white and over black (as the classifier sees it):
    the detector runs on both composites, and the image's regions are those of either (its
    problem, if either view had one); a region found in both views is reported once, with the
    union of its two boxes and the higher score.

    Args:
        pixels: (N, C, H, W) uint8 in [0, 255] or float in [0, 1]; C = 1 (gray), 2 (gray +
            alpha), 3 (RGB) or 4 (RGBA), as ``Prepared.pixels``.
    Returns:
        The selected :class:`Regions` of the N images, on the pixels' device. Host syncs: those
        of the detector (its run, and the data-dependent shapes of its NMS) and of the selection.
    """
    from ..inputs import views  # inputs imports nothing of this package: no cycle

    shown, _ = views(pixels)
    n = len(pixels)
    found = settings.select(settings.detector(shown))
    per = len(shown) // n
    if per == 1:
        return found
    image = torch.div(found.image, per, rounding_mode="floor")
    problems = tuple(next((p for p in found.problems[i * per:(i + 1) * per] if p), None) for i in range(n))
    boxes, keep = _merge(found.boxes, found.scores, image * len(found.labels) + found.classes,
                         settings.detector.iou)
    order = keep[torch.sort(image[keep], stable=True).indices]
    return Regions(boxes[order], found.scores[order], found.classes[order], image[order], found.size,
                   problems, found.labels)


def _merge(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
           iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of one group that overlap (IoU > ``iou``), merged into their union.

    Returns:
        (K, 4) boxes, each grown to the union of the boxes it absorbed (nothing covers less), and
        the indices of the kept ones by descending score (as ``batched_nms`` keeps them).
    """
    from torchvision.ops import batched_nms, box_iou

    keep = batched_nms(boxes, scores, groups, iou)
    # each box goes to the highest-scoring kept box of its group that overlaps it (itself if kept)
    hit = (box_iou(boxes, boxes[keep]) > iou) & (groups[:, None] == groups[keep][None])
    hit[keep, torch.arange(len(keep), device=keep.device)] = True
    owner = keep[hit.int().argmax(1)]
    merged = boxes.clone()
    for c, how in ((0, "amin"), (1, "amin"), (2, "amax"), (3, "amax")):
        merged[:, c].scatter_reduce_(0, owner, boxes[:, c], how)
    return merged, keep
