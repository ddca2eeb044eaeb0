"""The library's vocabulary and its checks, importable without torch.

Level names, censor actions, the second opinion's rules, the region classes and the defaults
live here so that the command line can parse and check its arguments (and answer ``--help``)
before any model library is imported. The modules that use them (``levels``, ``censor``,
``filter``, ``models``, ``cascade``, ``regions``) import them from here.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Mapping, Sequence

LEVELS: tuple[str, ...] = ("neutral", "low", "medium", "high")
#: The levels a threshold can be set on ("neutral" is not an NSFW level).
NSFW_LEVELS: tuple[str, ...] = LEVELS[1:]
#: What happens to a flagged image; "none" only flags it.
ACTIONS: tuple[str, ...] = ("blur", "pixelate", "black", "placeholder", "none")
#: The actions that hide an image: every action but ``"none"``.
HIDING_ACTIONS: tuple[str, ...] = tuple(a for a in ACTIONS if a != "none")

DEFAULT_MODEL = "eva"
DEFAULT_LEVEL = "medium"
DEFAULT_THRESHOLD = 0.5
DEFAULT_ACTION = "blur"

#: How a second opinion combines two detectors: a cascade's rules (the second model where the
#: first's score is in the band) and an ensemble's (every model on every image).
CASCADE_RULES: tuple[str, ...] = ("override", "mean", "max")
ENSEMBLE_RULES: tuple[str, ...] = ("any", "all", "mean")
#: Every ``combine`` a second opinion takes; ``mean`` is the cascade's.
RULES: tuple[str, ...] = ("override", "mean", "max", "any", "all")
#: The rules of :data:`RULES` that make an ensemble: both models on every image, no band.
BANDLESS: tuple[str, ...] = ("any", "all")

#: NudeNet's 18 region classes, in the order of the model's outputs.
NUDENET_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
#: Named class sets. "exposed" (the default) is what a nudity censor hides; MALE_BREAST_EXPOSED is
#: left out, as a bare chest is not usually censored. "faces" is privacy mode.
CLASS_SETS: dict[str, tuple[str, ...]] = {
    "exposed": ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
                "BUTTOCKS_EXPOSED", "ANUS_EXPOSED"),
    "faces": ("FACE_FEMALE", "FACE_MALE"),
    "all": NUDENET_LABELS,
}
DEFAULT_CLASSES = "exposed"
#: nudenet's effective score threshold (the score threshold of its ``cv2.dnn.NMSBoxes`` call).
MIN_SCORE = 0.25
#: The region mask's shapes.
SHAPES: tuple[str, ...] = ("rectangle", "ellipse")


def level_index(level: str) -> int:
    """Column of ``level`` in a level-score tensor; only low, medium and high are valid."""
    if not isinstance(level, str) or level not in NSFW_LEVELS:
        raise ValueError(f"level must be one of {NSFW_LEVELS}, got {level!r}")
    return LEVELS.index(level)


def check_threshold(threshold: float, name: str = "threshold") -> float:
    """Return ``threshold`` as a float in [0, 1], or raise ``ValueError``."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):  # numpy floats too
        raise TypeError(f"{name} must be a number in [0, 1], got {threshold!r}")
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {threshold!r}")
    return t


def class_indices(classes: str | Iterable[str], labels: Sequence[str]) -> list[int]:
    """Indices in ``labels`` of a class set name (:data:`CLASS_SETS`) or of class names."""
    if isinstance(classes, str):
        if classes not in CLASS_SETS:
            raise ValueError(f"classes must be one of {tuple(CLASS_SETS)} or a list of class names, got {classes!r}")
        classes = CLASS_SETS[classes]
    names = list(classes)
    unknown = [c for c in names if c not in labels]
    if unknown:
        raise ValueError(f"unknown region classes {unknown}; this detector's classes are {list(labels)}")
    return [labels.index(c) for c in names]


def per_class(value: float | Mapping[str, float], what: str, chosen: list[int], labels: Sequence[str],
              default: float, bounds: tuple[float, float]) -> list[float]:
    """A list over all classes: ``value`` for the chosen ones, +inf (threshold) or 0 elsewhere."""
    if isinstance(value, Mapping):
        extra = [c for c in value if c not in [labels[i] for i in chosen]]
        if extra:
            raise ValueError(f"{what} names classes that are not selected: {extra}")
        per = {labels.index(c): float(v) for c, v in value.items()}
    else:
        per = {i: float(value) for i in chosen}
    for i, v in per.items():
        if not bounds[0] <= v <= bounds[1]:
            raise ValueError(f"{what} for {labels[i]} must be in [{bounds[0]}, {bounds[1]}], got {v}")
    off = float("inf") if what == "threshold" else 0.0
    return [per.get(i, default) if i in chosen else off for i in range(len(labels))]
