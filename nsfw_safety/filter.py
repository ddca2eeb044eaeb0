"""SafetyFilter: detector + policy + censor + restore, failing closed.

Every integration (diffusers, ComfyUI, CLI, server) calls this one class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from . import inputs as _inputs
from .censor import DEFAULT_ACTION, DEFAULT_BLOCK, DEFAULT_BLUR, CensorSettings
from .detector import Detector
from .levels import DEFAULT_LEVEL, DEFAULT_THRESHOLD, Policy, Scores

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
        detector: from :func:`nsfw_safety.load_detector`, or a second opinion: a
            :class:`~nsfw_safety.cascade.Cascade` or :class:`~nsfw_safety.cascade.Ensemble`.
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
        censoring: the censor settings as one :class:`~nsfw_safety.censor.CensorSettings`, instead of
            ``action``, ``blur_strength``, ``block``, ``color`` and ``placeholder``.
    Raises:
        ValueError, TypeError: a bad rule or censor setting, when the filter is built.
    """

    def __init__(self, detector: Detector, level: str = DEFAULT_LEVEL, threshold: float = DEFAULT_THRESHOLD, *,
                 thresholds: Mapping[str, float] | None = None, action: str = DEFAULT_ACTION,
                 on_error: str = "block", blur_strength: float = DEFAULT_BLUR,
                 block: float = DEFAULT_BLOCK, color: Sequence[float] = (0.0, 0.0, 0.0),
                 placeholder: Any = None, censoring: CensorSettings | None = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.detector = detector
        self.policy = Policy(level, threshold, thresholds)
        self.on_error = on_error
        #: How flagged images are censored (``censoring=`` replaces the separate arguments).
        self.censoring = censoring if censoring is not None else CensorSettings(
            action, blur_strength, block, color, placeholder)

    @property
    def action(self) -> str:
        return self.censoring.action

    @property
    def options(self) -> dict[str, Any]:
        """The censor strengths as a dict, as 0.1 exposed them (use :attr:`censoring`)."""
        out = {k: getattr(self.censoring, k) for k in ("blur_strength", "block", "color")}
        if self.censoring.placeholder is not None:
            out["placeholder"] = self.censoring.placeholder
        return out

    def __repr__(self) -> str:
        return f"SafetyFilter({self.detector!r}, rules={self.policy.rules}, censoring={self.censoring!r})"

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
        if censored_range is not None:
            _inputs.check_range(censored_range)
        prepared = _inputs.prepare(images, value_range=value_range, layout=layout, device=self.detector.device)
        n = len(prepared)
        if scores is not None and len(scores) != n:
            raise ValueError(f"scores has {len(scores)} rows for {n} images")
        try:
            if scores is None:
                scores = self.detector.score(prepared.pixels, prepared.finite)
            verdict = self.policy.decide(scores)  # the one host read
            flagged, reasons, actions = verdict.flagged, verdict.reasons, verdict.actions(self.action)
        except Exception as e:
            if self.on_error == "raise":
                raise
            log.exception("scoring failed; blocking all %d images of the batch", n)
            scores, flagged = None, [True] * n
            reasons, actions = [f"error: {type(e).__name__}: {e}"] * n, ["black"] * n
        out = self._censor(prepared, actions, censored_range)
        return FilterResult(out, flagged, scores, reasons, actions)

    def _censor(self, prepared: _inputs.Prepared, actions: list[str], censored_range) -> Any:
        """Censor only the images whose action is not "none": batched per action, in chunks of
        at most ``CENSOR_CHUNK_BYTES`` of float pixels (at least one image), so that censoring
        holds at most one large image in float at a time. Censored images are kept in the
        pixels' own dtype (uint8 for 8-bit input) until they are restored."""
        done: dict[int, torch.Tensor] = {}
        for action in set(actions) - {"none"}:
            index = [i for i, a in enumerate(actions) if a == action]
            for chunk in _chunks(prepared, index):
                pixels = prepared.select(chunk)
                if isinstance(pixels, torch.Tensor):
                    result = list(self.censoring.apply(_rgba(pixels), action))
                else:  # mixed sizes: one call per image
                    result = [self.censoring.apply(_rgba(p[None]), action)[0] for p in pixels]
                done.update(zip(chunk, result))
        index = sorted(done)
        return prepared.restore(index, [done[i] for i in index], censored_range)


#: Censoring works on at most this many bytes of float pixels at once (or one larger image).
CENSOR_CHUNK_BYTES = 64 << 20


def _chunks(prepared: _inputs.Prepared, index: list[int]) -> list[list[int]]:
    """``index`` in runs whose float32 pixels take at most ``CENSOR_CHUNK_BYTES`` (or one image)."""
    pixels = prepared.pixels
    sizes = [4 * (pixels[0].numel() if isinstance(pixels, torch.Tensor) else pixels[i].numel()) for i in index]
    out: list[list[int]] = []
    total = 0
    for i, size in zip(index, sizes):
        if not out or total + size > CENSOR_CHUNK_BYTES:
            out.append([])
            total = 0
        out[-1].append(i)
        total += size
    return out


def _rgba(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with C in {1, 2, 3, 4} -> RGB (C = 1, 3) or RGBA (C = 2, 4)."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 2:
        return torch.cat([x[:, :1].expand(-1, 3, -1, -1), x[:, 1:]], dim=1)
    return x
