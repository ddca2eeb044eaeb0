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
from .regions.detector import Region
from .regions.mask import censor_regions, region_mask
from .regions.settings import RegionSettings, locate

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
        regions: region mode only (else None): per image, the regions censored, each a
            ``Region(label, score, box)`` with the box ``(x1, y1, x2, y2)`` in input pixels; empty
            for an image passed, or censored whole.
        masks: region mode only (else None): where each image is censored, float32 in [0, 1]:
            (B, H, W) on the input's device (CPU for numpy and PIL), or for a list input a list
            of (H_i, W_i). 1 over an image censored whole, 0 over one passed. With action
            ``"none"``, where the action would have applied.
    """

    images: Any
    flagged: list[bool]
    scores: Scores | None
    reasons: list[str]
    actions: list[str]
    regions: list[list[Region]] | None = None
    masks: torch.Tensor | list[torch.Tensor] | None = None

    @property
    def any_flagged(self) -> bool:
        return any(self.flagged)


@dataclass(frozen=True)
class Censored:
    """What :meth:`SafetyFilter.censor` did to a batch.

    Attributes:
        images: the batch with its censored images replaced, restored to the input's kind
            (``Prepared.restore``).
        actions: the censoring applied per image: the actions given, except in region-only mode,
            where a searched image with no region is passed (``"none"``) and one the region
            detector could not check is blacked out (``"black"``).
        regions: per image, the regions it was censored in (``Region(label, score, box)``, the box
            in input pixels); empty for an image censored whole, passed, or not searched.
        masks: image index -> its region mask (H, W), float32 in [0, 1] on the pixels' device,
            for the images censored in their regions (with action ``"none"``: where it would apply).
        notes: per image, what the region search found, for its reason: ``""`` (not searched),
            ``"regions: BUTTOCKS_EXPOSED 0.58"``, ``"no region of exposed at or above threshold:
            censored whole"`` or ``"region detector failed: RuntimeError: ...: censored whole"``.
    """

    images: Any
    actions: list[str]
    regions: list[list[Region]]
    masks: dict[int, torch.Tensor]
    notes: list[str]


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
        regions: region mode (:class:`~nsfw_safety.regions.RegionSettings`): the classifier
            decides whether an image is flagged, the region detector where it is censored (it
            runs on flagged images only). A flagged image in which no chosen region reaches its
            threshold, or that the region detector could not check, is censored whole: never
            passed. With ``detector=None``, region-only mode: an image is flagged when a chosen
            region is found (and blacked out when the region detector could not check it).
            Video frames are censored by the same :meth:`censor` (``nsfw_safety.video``).
    Raises:
        ValueError, TypeError: a bad rule or censor setting, when the filter is built.
    """

    def __init__(self, detector: Detector | None, level: str = DEFAULT_LEVEL, threshold: float = DEFAULT_THRESHOLD,
                 *, thresholds: Mapping[str, float] | None = None, action: str = DEFAULT_ACTION,
                 on_error: str = "block", blur_strength: float = DEFAULT_BLUR,
                 block: float = DEFAULT_BLOCK, color: Sequence[float] = (0.0, 0.0, 0.0),
                 placeholder: Any = None, censoring: CensorSettings | None = None,
                 regions: RegionSettings | None = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if regions is not None and not isinstance(regions, RegionSettings):
            raise TypeError(f"regions must be a RegionSettings or None, got {type(regions).__name__}")
        if detector is None and regions is None:
            raise TypeError("detector is None: give a detector, or regions= for region-only mode")
        self.detector = detector
        #: Region mode's settings, or None.
        self.regions = regions
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
        regions = f", regions={self.regions!r}" if self.regions is not None else ""
        return f"SafetyFilter({self.detector!r}, rules={self.policy.rules}, censoring={self.censoring!r}{regions})"

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
        device = self.detector.device if self.detector is not None else self.regions.detector.device
        prepared = _inputs.prepare(images, value_range=value_range, layout=layout, device=device)
        n = len(prepared)
        if scores is not None and (self.detector is None or len(scores) != n):
            raise ValueError(f"scores has {len(scores)} rows for {n} images" if self.detector is not None
                             else "scores were given to a region-only filter, which has no classifier")
        if self.detector is None:  # region-only: the regions decide
            return self._with_regions(images, prepared, None, None, None, None, [False] * n, censored_range)
        try:
            if scores is None:
                scores = self.detector.score(prepared.pixels, prepared.finite)
            verdict = self.policy.decide(scores)  # the one host read
            flagged, reasons, actions = verdict.flagged, verdict.reasons, verdict.actions(self.action)
            failed = [p is not None for p in verdict.problems]
        except Exception as e:
            if self.on_error == "raise":
                raise
            log.exception("scoring failed; blocking all %d images of the batch", n)
            scores, flagged, failed = None, [True] * n, [True] * n
            reasons, actions = [f"error: {type(e).__name__}: {e}"] * n, ["black"] * n
        if self.regions is not None:
            return self._with_regions(images, prepared, scores, flagged, reasons, actions, failed, censored_range)
        return FilterResult(self.censor(prepared, actions, censored_range).images, flagged, scores, reasons, actions)

    def _censor(self, prepared: _inputs.Prepared, actions: list[str], censored_range,
                done: dict[int, torch.Tensor] | None = None, keep: dict[int, torch.Tensor] | None = None) -> Any:
        """Censor only the images whose action is not "none": batched per action, in chunks of
        at most ``CENSOR_CHUNK_BYTES`` of float pixels (at least one image), so that censoring
        holds at most one large image in float at a time. Censored images are kept in the
        pixels' own dtype (uint8 for 8-bit input) until they are restored. Images already in
        ``done`` (censored in their regions) are restored as they are, their pixels where
        ``keep`` is True taken from the input."""
        done = dict(done or {})
        for action in set(actions) - {"none"}:
            index = [i for i, a in enumerate(actions) if a == action and i not in done]
            for chunk in _chunks(prepared, index):
                pixels = prepared.select(chunk)
                if isinstance(pixels, torch.Tensor):
                    result = list(self.censoring.apply(_rgba(pixels), action))
                else:  # mixed sizes: one call per image
                    result = [self.censoring.apply(_rgba(p[None]), action)[0] for p in pixels]
                done.update(zip(chunk, result))
        index = sorted(done)
        kept = [keep.get(i) for i in index] if keep else None
        return prepared.restore(index, [done[i] for i in index], censored_range, kept)

    def censor(self, prepared: _inputs.Prepared, actions: Sequence[str],
               censored_range: _inputs.ValueRange | None = None, *, search: Sequence[int] = ()) -> Censored:
        """Censor a prepared batch: the images of ``search`` inside their regions (region mode),
        every other image whose action is not ``"none"`` whole. The one censoring path of still
        images and video frames.

        Args:
            prepared: from :func:`nsfw_safety.inputs.prepare`, on this filter's device.
            actions: one per image: ``"blur"``, ``"black"``, ... or ``"none"`` (left as it is).
            censored_range: value range of the censored images in the output (float input only).
            search: indices of the images to look for regions in (region mode only; ignored
                without it). Give the images judged unsafe, never those whose check failed:
                those are censored whole. An image searched in which no chosen region reaches its
                threshold, or that the region detector could not check, is censored whole with
                its action (in region-only mode: passed, or blacked out).
        Returns:
            :class:`Censored`.
        Raises:
            Whatever the region detector raised, with ``on_error="raise"``.

        Host syncs beyond the caller's, per chunk of searched images: the region detector's (its
        input handed to onnxruntime, and its NMS, whose shapes depend on the data), the
        selection's (a boolean index), and one read of the selected boxes for the result.
        """
        n = len(prepared)
        actions = list(actions)
        found: list[list[Region]] = [[] for _ in range(n)]
        notes = [""] * n
        masks: dict[int, torch.Tensor] = {}
        done: dict[int, torch.Tensor] = {}
        region_only = self.detector is None
        search = sorted(search) if self.regions is not None else []
        for chunk in _chunks(prepared, search):
            pixels = prepared.select(chunk)
            groups = [(chunk, pixels)] if isinstance(pixels, torch.Tensor) else \
                [([i], p[None]) for i, p in zip(chunk, pixels)]  # mixed sizes: one call per image
            for index, batch in groups:
                try:
                    located = locate(self.regions, batch)
                    rows, problems = located.per_image(), located.problems  # the host read of the boxes
                except Exception as e:
                    if self.on_error == "raise":
                        raise
                    log.exception("region detection failed; censoring %d images whole", len(index))
                    located, rows = None, [[] for _ in index]
                    problems = (f"region detector failed: {type(e).__name__}: {e}",) * len(index)
                boxed = []
                for j, (i, row, problem) in enumerate(zip(index, rows, problems)):
                    if problem:  # fail closed: censored whole (in region-only mode: blacked out)
                        notes[i] = problem if region_only else f"{problem}: censored whole"
                        actions[i] = "black" if region_only else actions[i]
                    elif not row:
                        notes[i] = f"no region of {self._classes} at or above threshold"
                        if region_only:
                            actions[i] = "none"
                        else:
                            notes[i] += ": censored whole"
                    else:
                        found[i], notes[i] = row, "regions: " + _summary(row)
                        boxed.append(j)
                if not boxed:
                    continue
                chosen = located.take(boxed)
                mask = region_mask(chosen, shape=self.regions.shape, feather=self.regions.feather)
                masks.update(zip([index[j] for j in boxed], mask))
                c = self.censoring
                for action in sorted({actions[index[j]] for j in boxed} - {"none"}):
                    sub = [k for k, j in enumerate(boxed) if actions[index[j]] == action]
                    every = len(sub) == len(boxed)  # one action: the usual case, no re-indexing
                    out = censor_regions(_rgba(batch[[boxed[k] for k in sub]]), mask if every else mask[sub],
                                         action, regions=chosen if every else chosen.take(sub),
                                         blur_strength=c.blur_strength, block=c.block, color=c.color,
                                         placeholder=c.placeholder)
                    done.update(zip([index[boxed[k]] for k in sub], out))
        keep = {i: m == 0 for i, m in masks.items() if i in done}
        return Censored(self._censor(prepared, actions, censored_range, done, keep), actions, found, masks, notes)

    def _with_regions(self, images: Any, prepared: _inputs.Prepared, scores: Scores | None,
                      flagged: list[bool] | None, reasons: list[str] | None, actions: list[str] | None,
                      failed: list[bool], censored_range) -> FilterResult:
        """Region mode on still images: :meth:`censor` searches the flagged images that were
        checked (every image without a classifier), and their reasons say what it found.
        Images that are passed never reach the region detector."""
        n = len(prepared)
        if flagged is None:  # region-only: every image is searched, and the regions decide
            done = self.censor(prepared, [self.action] * n, censored_range, search=range(n))
            flagged = [a != "none" or bool(r) for a, r in zip(done.actions, done.regions)]
            reasons = [self._region_reason(r[0]) if r else note for r, note in zip(done.regions, done.notes)]
        else:
            done = self.censor(prepared, actions, censored_range,
                               search=[i for i in range(n) if flagged[i] and not failed[i]])
            reasons = [f"{r}; {note}" if note else r for r, note in zip(reasons, done.notes)]
        return FilterResult(done.images, flagged, scores, reasons, done.actions, done.regions,
                            _masks(images, prepared, flagged, done.masks))

    @property
    def _classes(self) -> str:
        c = self.regions.classes
        return c if isinstance(c, str) else "/".join(c)

    def _region_reason(self, region: Region) -> str:
        return f"{region.label} {region.score:.2f} >= {self.regions.threshold_for(region.label):.2f}"


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


def _summary(row: list[Region], most: int = 3) -> str:
    """``"BUTTOCKS_EXPOSED 0.83, FEMALE_BREAST_EXPOSED 0.61 (+2 more)"``."""
    text = ", ".join(f"{r.label} {r.score:.2f}" for r in row[:most])
    return text + (f" (+{len(row) - most} more)" if len(row) > most else "")


def _masks(images: Any, prepared: _inputs.Prepared, flagged: list[bool],
           masks: dict[int, torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """The result's masks: ``masks`` for region-censored images, 1 over the other flagged ones, 0
    over passed ones. (B, H, W) on the input's device, or a list of (H_i, W_i) for a list input."""
    pixels = prepared.pixels
    if isinstance(images, (list, tuple)) or isinstance(pixels, list):  # a list, or one large image kept apart
        items = images if isinstance(images, (list, tuple)) else [images]
        out = []
        for i, item in enumerate(items):
            m = masks.get(i)
            if m is None:
                m = torch.full(pixels[i].shape[-2:], float(flagged[i]), device=pixels[i].device)
            out.append(m.to(item.device if isinstance(item, torch.Tensor) else "cpu"))
        return out if isinstance(images, (list, tuple)) else torch.stack(out)
    n, _, h, w = pixels.shape
    out = torch.tensor(flagged, dtype=torch.float32).view(n, 1, 1).expand(n, h, w).to(pixels.device)
    if masks:
        out = out.clone()
        index = sorted(masks)
        out[index] = torch.stack([masks[i] for i in index])
    return out.to(images.device if isinstance(images, torch.Tensor) else "cpu")


def _rgba(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with C in {1, 2, 3, 4} -> RGB (C = 1, 3) or RGBA (C = 2, 4)."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 2:
        return torch.cat([x[:, :1].expand(-1, 3, -1, -1), x[:, 1:]], dim=1)
    return x
