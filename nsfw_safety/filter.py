"""SafetyFilter: detector + policy + censor + restore, failing closed.

Every integration (diffusers, ComfyUI, CLI, server) calls this one class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from . import inputs as _inputs
from .censor import ACTIONS, DEFAULT_BLOCK, DEFAULT_BLUR, censor, check_color
from .detector import Detector, Scores
from .levels import Policy
from .vocabulary import DEFAULT_ACTION, DEFAULT_LEVEL, DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

ON_ERROR = ("block", "raise")


@dataclass(frozen=True)
class FilterResult:
    """What a :class:`SafetyFilter` call did.

    Attributes:
        images: the input with flagged images censored; same kind, layout, value range, dtype
            and device as the input (file paths come back as PIL images).
        flagged: one bool per image.
        scores: the detector's scores, or None when scoring raised.
        reasons: one string per image, e.g. ``"medium 0.83 >= 0.50"``, ``"non-finite input"``,
            ``"error: RuntimeError: ..."``.
        actions: the censoring applied per image (``"none"`` for images passed through).
    """

    images: Any
    flagged: list[bool]
    scores: Scores | None
    reasons: list[str]
    actions: list[str]

    @property
    def any_flagged(self) -> bool:
        return any(self.flagged)


class SafetyFilter:
    """Score images and censor those that cross the line.

    Args:
        detector: from :func:`nsfw_safety.load_detector`.
        level, threshold: flag when ``levels[level] >= threshold``.
        thresholds: per-level thresholds instead, e.g. ``{"low": 0.9, "medium": 0.6, "high": 0.3}``;
            an image is flagged when any level meets its threshold.
        action: ``"blur"`` (default), ``"pixelate"``, ``"black"``, ``"placeholder"`` or ``"none"``
            (flag only). Images whose check failed (scoring error, non-finite values) are always
            filled with ``color``, whatever the action: a blur of garbage proves nothing.
        on_error: ``"block"`` (default) flags and blacks out a batch whose scoring raised;
            ``"raise"`` re-raises.
        blur_strength: Gaussian sigma as a fraction of the longer image side.
        block: pixelation block as a fraction of the longer image side.
        color: fill colour for ``"black"`` and failed checks, three floats in [0, 1].
        placeholder: image for ``"placeholder"`` (PIL, path, array or tensor); default: a plain
            built-in "content hidden" card.
    """

    def __init__(self, detector: Detector, level: str = DEFAULT_LEVEL, threshold: float = DEFAULT_THRESHOLD, *,
                 thresholds: Mapping[str, float] | None = None, action: str = DEFAULT_ACTION,
                 on_error: str = "block", blur_strength: float = DEFAULT_BLUR,
                 block: float = DEFAULT_BLOCK, color: Sequence[float] = (0.0, 0.0, 0.0),
                 placeholder: Any = None):
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.detector = detector
        self.policy = Policy(level, threshold, thresholds)
        self.action = action
        self.on_error = on_error
        self.options = dict(blur_strength=blur_strength, block=block, color=check_color(color))
        if placeholder is not None:
            card = _inputs.prepare(placeholder).pixels
            self.options["placeholder"] = (card if isinstance(card, torch.Tensor) else torch.stack(card))[0]
        censor(torch.zeros(1, 3, 8, 8), action, **self.options)  # bad strengths fail now, not mid-run

    def __repr__(self) -> str:
        return f"SafetyFilter({self.detector!r}, rules={self.policy.rules}, action={self.action!r})"

    def __call__(self, images: Any, *, value_range: _inputs.ValueRange = (0.0, 1.0),
                 layout: str | None = None, censored_range: _inputs.ValueRange | None = None,
                 scores: Scores | None = None) -> FilterResult:
        """Check ``images`` and censor the flagged ones.

        Args:
            images: anything ``Detector.predict`` accepts.
            value_range: range of float input; ``(-1, 1)`` for a VAE's output.
            layout: for shapes whose layout is ambiguous.
            censored_range: value range of the censored images in the output (float input
                only); default: the input's own range. diffusers needs ``(0, 1)`` here.
            scores: ``self.detector.predict(images)``, when the caller already has it (a server
                that scores many requests in one batch, then applies each request's own policy);
                scoring is then skipped.
        Raises:
            TypeError, ValueError: the input itself is bad (nothing is returned unchecked), or
                ``scores`` does not have one row per image.
        """
        prepared = _inputs.prepare(images, value_range=value_range, layout=layout, device=self.detector.device)
        n = len(prepared)
        if scores is not None and len(scores) != n:
            raise ValueError(f"scores has {len(scores)} rows for {n} images")
        try:
            if scores is None:
                scores = self.detector.score(prepared.pixels, prepared.finite)
            flagged = self.policy.flag(scores.levels, scores.valid).tolist()  # the one host sync
            problems = scores.problems()
            reasons = self.policy.reasons(scores.levels, flagged, problems)
            actions = [("black" if p else self.action) if f else "none" for f, p in zip(flagged, problems)]
        except Exception as e:
            if self.on_error == "raise":
                raise
            log.exception("scoring failed; blocking all %d images of the batch", n)
            scores, flagged = None, [True] * n
            reasons, actions = [f"error: {type(e).__name__}: {e}"] * n, ["black"] * n
        out = self._censor(prepared, actions, censored_range)
        return FilterResult(out, flagged, scores, reasons, actions)

    def _censor(self, prepared: _inputs.Prepared, actions: list[str], censored_range) -> Any:
        """Censor only the images whose action is not "none", one batched call per action."""
        done: dict[int, torch.Tensor] = {}
        for action in set(actions) - {"none"}:
            index = [i for i, a in enumerate(actions) if a == action]
            pixels = prepared.select(index)
            if isinstance(pixels, torch.Tensor):
                result = list(censor(pixels, action, **self.options))
            else:  # mixed sizes: one call per image
                result = [censor(p[None], action, **self.options)[0] for p in pixels]
            done.update(zip(index, result))
        index = sorted(done)
        return prepared.restore(index, [done[i] for i in index], censored_range)
