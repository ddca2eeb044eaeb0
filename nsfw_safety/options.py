"""Options that ``scan`` and ``serve`` share: the second opinion and region mode, importable without torch.

Each option is one :class:`Flag` (its name, the setting it fills, help and argparse keywords)
and one check, so that both commands spell, parse and validate them alike; the checks raise
``ValueError`` naming the option, before any model library is imported. A region model given
by the user has its own class names: only the class names of the default NudeNet model are
checked here, the rest when the model loads.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .vocabulary import (BANDLESS, CLASS_SETS, NUDENET_LABELS, RULES, SHAPES, check_threshold, class_indices,
                         per_class)

#: The bounds of a region's per-class settings: threshold (a score) and expansion (a fraction of the box).
REGION_BOUNDS = {"region_threshold": (0.0, 1.0), "region_expand": (0.0, 10.0)}


def parse_per_class(raw: str, name: str) -> float | dict[str, float]:
    """A command-line value: one number (``"0.4"``) or ``"CLASS=0.4,CLASS=0.5"``.

    Raises:
        ValueError: naming ``name`` and the part that does not parse.
    """
    raw = raw.strip()
    if "=" not in raw:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name} must be a number or CLASS=NUMBER,...; got {raw!r}") from None
    out = {}
    for part in raw.split(","):
        label, _, value = part.partition("=")
        try:
            out[label.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{name}: {part.strip()!r} is not CLASS=NUMBER") from None
    return out


def parse_classes(raw: str) -> str | tuple[str, ...]:
    """A command-line value: a class set name (``"exposed"``) or comma-separated class names."""
    parts = tuple(p.strip() for p in raw.split(",") if p.strip())
    return parts[0] if len(parts) == 1 and parts[0] in CLASS_SETS else parts


def parse_band(raw: str) -> tuple[float, ...]:
    """An environment value: ``"0.3,0.7"`` or ``"0.3 0.7"`` -> (0.3, 0.7)."""
    return tuple(float(part) for part in raw.replace(",", " ").split())


def check_second_opinion(second_opinion: str | None, band: Iterable[float] | None,
                         combine: str | None) -> tuple[float, float] | None:
    """Check a second opinion's settings together; returns the band as two floats (or None).

    Raises:
        ValueError: an unknown rule, a band that is not two numbers 0 <= LO <= HI <= 1, a band
            with a rule that takes none (``any``, ``all``), or a band or rule without a model.
    """
    if combine is not None and combine not in RULES:
        raise ValueError(f"combine must be one of {RULES}, got {combine!r}")
    if second_opinion is None and (band is not None or combine is not None):
        raise ValueError("band and combine need a second_opinion model")
    if band is None:
        return None
    band = tuple(band)
    if len(band) != 2:
        raise ValueError(f"band must be two numbers LO HI, got {band!r}")
    lo, hi = (check_threshold(b, "band") for b in band)
    if lo > hi:
        raise ValueError(f"band must have LO <= HI, got {band!r}")
    if combine in BANDLESS:
        raise ValueError(f"combine={combine} runs both models on every image: it takes no band")
    return lo, hi


def check_regions(regions: str | tuple[str, ...] | None, region_model: str | None,
                  region_threshold: float | Mapping[str, float], region_expand: float | Mapping[str, float],
                  region_shape: str, region_feather: float) -> None:
    """Check region settings as far as can be done without loading the region model.

    Raises:
        ValueError: naming the setting that is out of range or the class that is unknown.
    """
    if region_shape not in SHAPES:
        raise ValueError(f"region_shape must be one of {SHAPES}, got {region_shape!r}")
    if isinstance(region_feather, bool) or not (isinstance(region_feather, (int, float)) and 0 <= region_feather <= 1):
        raise ValueError(f"region_feather must be in [0, 1], got {region_feather!r}")
    if regions is None or region_model is not None:
        return  # a model of the user's own has its own class names
    chosen = class_indices(regions, NUDENET_LABELS)
    for name, value in (("region_threshold", region_threshold), ("region_expand", region_expand)):
        per_class(value, name, chosen, NUDENET_LABELS, 0.0, REGION_BOUNDS[name])


@dataclass(frozen=True)
class Flag:
    """One command-line option: ``name`` fills the setting ``dest``; ``kwargs`` go to ``add_argument``."""

    name: str
    dest: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for argparse: its ValueError becomes the usage error's message."""
    def typed(raw: str) -> Any:
        try:
            return parse(raw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return typed


SECOND_OPINION_FLAGS = (
    Flag("--second-opinion", "second_opinion", "a second model (as --model) that re-checks the images whose "
                                               "--model score at --level is in --band", {"metavar": "MODEL"}),
    Flag("--band", "band", "the first scores sent to the second model, bounds included; default: --threshold "
                           "to 1, every image the first flags", {"nargs": 2, "type": float, "metavar": ("LO", "HI")}),
    Flag("--combine", "combine", "where the second model scored: override (default), mean or max; any or all: "
                                 "both models on every image", {"choices": RULES}),
)

REGION_FLAGS = (
    Flag("--regions", "regions", "region mode: censor only these region classes of a flagged image (exposed, "
                                 "faces, all, or CLASS,CLASS,...); needs the regions extra (NudeNet: AGPL-3.0)",
         {"type": _arg(parse_classes), "metavar": "CLASSES"}),
    Flag("--region-model", "region_model", "the region detector's .onnx file (default: the nudenet package's)",
         {"metavar": "ONNX"}),
    Flag("--region-threshold", "region_threshold", "a region's minimum score: one number, or CLASS=NUMBER,...",
         {"type": _arg(lambda raw: parse_per_class(raw, "region_threshold")), "metavar": "T"}),
    Flag("--region-expand", "region_expand", "grow each box by this fraction: one number, or CLASS=NUMBER,...",
         {"type": _arg(lambda raw: parse_per_class(raw, "region_expand")), "metavar": "F"}),
    Flag("--region-shape", "region_shape", "the mask's shape", {"choices": SHAPES}),
    Flag("--region-feather", "region_feather", "the mask's soft edge, a fraction of the box's longer side",
         {"type": float, "metavar": "F"}),
)

#: How each of these settings reads from an environment variable (others are plain strings).
ENV_PARSERS: dict[str, Callable[[str], Any]] = {
    "band": parse_band, "regions": parse_classes, "region_feather": float,
    "region_threshold": lambda raw: parse_per_class(raw, "region_threshold"),
    "region_expand": lambda raw: parse_per_class(raw, "region_expand"),
}
