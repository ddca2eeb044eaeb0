"""A second opinion: two or more detectors used as one.

* :class:`Cascade`: the first detector scores every image; the second scores only the images
  whose first score at ``level`` lies in ``band`` (bounds included), and ``combine`` says what
  the final levels are. ``band=(t, 1.0)`` sends every image the first flags at ``level >= t``
  (the default, t = 0.5); ``band=(0.3, 0.7)`` only the uncertain ones.
* :class:`Ensemble`: every member scores every image; ``any``, ``all`` or ``mean``.
* :func:`second_opinion`: either one, from two detectors or model names, in one call.

To its callers (``SafetyFilter``, the diffusers checker, the ComfyUI nodes, the server, ``scan``,
``check_video``) either one is a detector: ``predict``, ``score``, ``is_nsfw``, ``device``,
``dtype``, ``max_batch_size``, ``to``, ``model`` (one module holding every member's, so that a host
that moves it moves them all), ``model_id``, ``revision``, ``labels``. Its :class:`~nsfw_safety.levels.Scores` keep each member's own in
``parts``, and :meth:`Policy.decide <nsfw_safety.levels.Policy.decide>` names the member that
decided in each reason.

Members combine through their level scores (``nsfw_safety.levels``), so a 4-level EVA and a
2-class ViT mix: for the ViT, low = medium = high = p_nsfw. The rules, per level (neutral then
stays 1 - low):

* ``override``: the second model's levels where it ran, else the first's.
* ``mean``: the mean of the members that scored the image.
* ``max`` (cascade) / ``any`` (ensemble): the largest; flagged when any member is.
* ``all`` (ensemble): the smallest; flagged only when every member is (at the same level).

Fail closed: an image that any member could not score (non-finite input or output) is invalid,
hence blocked, whatever the others said; a cascade never sends an invalid first score to the
second model, so it cannot clear it. A member that raises raises :class:`MemberError`, which
names it (``SafetyFilter`` then blocks the batch and gives that reason).

Host reads: an ensemble makes none. A cascade reads its band, B bools, once, after the first
model: the second model's batch is as large as the band holds, a number the host needs before it
can launch that model. That is the only read before the policy's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import inputs as _inputs
from .detector import Detector, load_detector
from .device_cache import on_device
from .levels import (
    BLOCKED, DEFAULT_LEVEL, DEFAULT_THRESHOLD, LEVELS, NOT_SCORED, OK, Parts, Policy, Scores, check_threshold,
    level_index, level_matrix,
)
from .models import REGISTRY
from .vocabulary import BANDLESS, CASCADE_RULES, ENSEMBLE_RULES, RULES  # noqa: F401 (re-exported)


class MemberError(RuntimeError):
    """A member of a cascade or an ensemble raised; the message names the member."""


def model_name(model: Any) -> str:
    """How reasons name a detector or a model reference: its registry name (``"eva"``) when it
    is a registry model, else the last part of its id or directory; a combination's own name."""
    name = getattr(model, "name", None)
    if isinstance(name, str):
        return name
    ref = str(getattr(model, "model_id", model))
    for spec in REGISTRY.values():
        if ref in (spec.name, spec.hub_id):
            return spec.name
    return Path(ref).name or ref


def is_detector(obj: Any) -> bool:
    """True for what can score images: a :class:`Detector`, a :class:`Cascade` or an :class:`Ensemble`."""
    return isinstance(obj, (Detector, Combination))


class Combination:
    """What :class:`Cascade` and :class:`Ensemble` share: the detector interface over members.

    Args:
        members: detectors (or combinations). They must be on one device when they score (else
            scoring raises :class:`MemberError`); they may be apart until then, as a host such as
            ComfyUI moves each one onto its device just before it runs.
        rule: how their levels combine.
        names: how reasons name each member (default: :func:`model_name`; repeats get ``#2``...).
    Raises:
        ValueError: fewer than two members.
    """

    def __init__(self, members: Sequence[Any], rule: str, names: Sequence[str] | None = None):
        members = tuple(members)
        if len(members) < 2:
            raise ValueError(f"a combination needs at least two detectors, got {len(members)}")
        for m in members:
            if not is_detector(m):
                raise TypeError(f"members must be detectors (load_detector) or combinations, got {type(m).__name__}")
        if names is not None and len(names) != len(members):
            raise ValueError(f"names must give one name per member ({len(members)}), got {list(names)}")
        self.members = members
        self.rule = rule
        self.names = _unique([str(n) for n in names] if names is not None else [model_name(m) for m in members])
        #: every member's module: a host (a diffusers pipeline, ComfyUI) that moves it moves them all
        self.model = nn.ModuleList([m.model for m in members])
        same = all(m.labels == members[0].labels for m in members)
        #: the members' class names when they share them, else the four levels
        self.labels: tuple[str, ...] = tuple(members[0].labels) if same else LEVELS
        self._level_matrix = level_matrix(self.labels)
        self.revision = None
        self.path = None  # several checkpoints: see each member's

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    @property
    def max_batch_size(self) -> int:
        """The smallest member's: how many images a caller that chunks its input (``check_video``)
        hands over at once; each member still scores in chunks of its own."""
        return min(m.max_batch_size for m in self.members)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None):
        """Move (and cast) every member in place; returns self."""
        for m in self.members:
            m.to(device, dtype)
        return self

    def predict(self, images: Any, *, value_range: _inputs.ValueRange = (0.0, 1.0),
                layout: str | None = None) -> Scores:
        """Score images, as :meth:`Detector.predict`; the inputs are prepared once for all members."""
        prepared = _inputs.prepare(images, value_range=value_range, layout=layout, device=self.device)
        return self.score(prepared.pixels, prepared.finite)

    def is_nsfw(self, images: Any, level: str = DEFAULT_LEVEL, threshold: float = DEFAULT_THRESHOLD,
                **kwargs) -> list[bool]:
        """``levels[level] >= threshold`` per image, on the combined levels (invalid counts as NSFW)."""
        return Policy(level, threshold).decide(self.predict(images, **kwargs)).flagged

    def score(self, pixels: torch.Tensor | list[torch.Tensor], finite: torch.Tensor | None = None) -> Scores:
        raise NotImplementedError

    # --- shared steps -------------------------------------------------------------------------

    def _run(self, i: int, pixels: torch.Tensor | list[torch.Tensor], finite: torch.Tensor | None) -> Scores:
        """Member ``i``'s scores; an exception comes out as a :class:`MemberError` naming it."""
        member = self.members[i]
        if member.device != self.device:
            raise MemberError(f"{self.names[i]} is on {member.device} and {self.names[0]} on {self.device}: "
                              f"all members must be on one device (move them with .to())")
        try:
            return member.score(pixels, finite)
        except Exception as e:
            raise MemberError(f"{self.names[i]} failed on {len(pixels)} image(s): {type(e).__name__}: {e}") from e

    def _combine(self, parts: list[Scores], scored: list[torch.Tensor | None]) -> Scores:
        """The combined scores, on the device, without a host read.

        Args:
            parts: each member's scores, B rows each (NaN where it did not score).
            scored: per member, (B,) bool where it scored, or None for every row.
        """
        device, b = parts[0].levels.device, len(parts[0])
        every = torch.ones(b, dtype=torch.bool, device=device)
        ran = torch.stack([every if s is None else s for s in scored])[:, :, None]  # (M, B, 1)
        # larger is stricter in every column: the NSFW levels, and minus neutral
        signed = torch.stack([torch.cat([-p.levels[:, :1], p.levels[:, 1:]], dim=1) for p in parts])  # (M, B, 4)
        top, top_member = signed.masked_fill(~ran, -torch.inf).max(dim=0)
        if self.rule == "override":  # a cascade: the second's levels where it ran
            best = torch.where(ran[1], signed[1], signed[0])
            source = ran[1].expand(b, 4).long()
        elif self.rule in ("max", "any"):
            best, source = top, top_member
        elif self.rule == "all":
            best, source = signed.masked_fill(~ran, torch.inf).min(dim=0)
        else:  # mean over the members that scored the image
            weight = ran.float()
            best = (signed.nan_to_num(0.0) * weight).sum(dim=0) / weight.sum(dim=0)
            source = top_member
        status = torch.stack([p.status for p in parts]).amax(dim=0).to(torch.int8)  # the worst; NOT_SCORED < OK
        valid = (status == OK)[:, None]
        _, blocked, to_probs = self._on(device)
        levels = torch.where(valid, torch.cat([-best[:, :1], best[:, 1:]], dim=1), blocked)
        probs = torch.where(valid, (levels @ to_probs).clamp_min(0.0), torch.nan)  # the distribution they imply
        composite = None
        if any(p.composite is not None for p in parts):
            views = torch.stack([p.composite if p.composite is not None else
                                 torch.zeros(b, 4, dtype=torch.int8, device=device) for p in parts])
            composite = views.gather(0, source[None]).squeeze(0)
        return Scores(probs, levels, self.labels, status, composite,
                      Parts(self.names, tuple(parts), self.rule, source.to(torch.int8)))


    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The level matrix (C, 4), the fail-closed level row (4,) and the matrix that turns
        levels back into class probabilities (4, C), on ``device`` (as ``Detector._on``)."""
        return on_device(("levels", self.labels), lambda: (
            self._level_matrix, BLOCKED, torch.linalg.pinv(self._level_matrix)), device)


class Cascade(Combination):
    """A first detector on every image, a second one only where the first is in ``band``.

    Args:
        first: scores every image.
        second: scores only the images whose first score at ``level`` is in ``band`` (and valid).
        band: (lo, hi) in [0, 1], bounds included. ``(t, 1.0)`` (default t = 0.5): the images the
            first flags at ``level >= t``, so that the second re-checks every hit; ``(0.3, 0.7)``:
            the uncertain ones.
        level: the level whose first score selects (``"low"``, ``"medium"``, ``"high"``).
        combine: the final levels of an image the second scored: ``"override"`` (the second's),
            ``"mean"`` or ``"max"`` of the two; elsewhere the first's.
        names: how reasons name the two models.
    Raises:
        ValueError: a bad band, level or rule.
    """

    def __init__(self, first: Any, second: Any, *, band: tuple[float, float] = (DEFAULT_THRESHOLD, 1.0),
                 level: str = DEFAULT_LEVEL, combine: str = "override", names: Sequence[str] | None = None):
        if combine not in CASCADE_RULES:
            raise ValueError(f"a cascade's combine must be one of {CASCADE_RULES}, got {combine!r}")
        level_index(level)
        if not isinstance(band, (tuple, list)) or len(band) != 2:
            raise ValueError(f"band must be (lo, hi) with 0 <= lo <= hi <= 1, got {band!r}")
        lo, hi = check_threshold(band[0], "band[0]"), check_threshold(band[1], "band[1]")
        if lo > hi:
            raise ValueError(f"band must be (lo, hi) with lo <= hi, got {band!r}")
        super().__init__((first, second), combine, names)
        self.first, self.second = first, second
        self.band, self.level = (lo, hi), level

    @property
    def model_id(self) -> str:
        return f"{self.first.model_id} -> {self.second.model_id}"

    @property
    def name(self) -> str:
        return f"{self.names[0]} -> {self.names[1]}"

    def __repr__(self) -> str:
        return (f"Cascade({self.first!r} -> {self.second!r}, band={self.band} at {self.level}, "
                f"combine={self.rule!r})")

    @torch.inference_mode()
    def score(self, pixels: torch.Tensor | list[torch.Tensor], finite: torch.Tensor | None = None) -> Scores:
        """Score prepared pixels (as :meth:`Detector.score`): the first model on all of them, the
        second on those in the band.

        Args:
            pixels: (B, C, H, W) uint8 or float in [0, 1], or a list of (C, H_i, W_i).
            finite: (B,) bool, False where the input held NaN/Inf.
        Returns:
            Combined :class:`Scores` with ``parts``: the first's scores and the second's, whose rows
            outside the band are ``NOT_SCORED``.
        """
        first = self._run(0, pixels, finite)
        x = first.levels[:, LEVELS.index(self.level)]
        chosen = first.valid & (x >= self.band[0]) & (x <= self.band[1])  # invalid scores stay blocked
        # The one host read before the policy's: the band, B bools. The second model runs on as many
        # images as it holds, and the host must know how many to launch it.
        rows = [i for i, c in enumerate(chosen.cpu().tolist()) if c]
        if rows:
            index = chosen.nonzero_static(size=len(rows))[:, 0]  # on the device, from the count: no second sync
            if isinstance(pixels, torch.Tensor):
                picked = index if pixels.device == index.device else torch.tensor(rows, device=pixels.device)
                subset = pixels.index_select(0, picked)
            else:
                subset = [pixels[i] for i in rows]
            second = _spread(self._run(1, subset, None), index, len(first))
        else:
            second = _unscored(len(first), len(self.second.labels), self.second.labels, first.levels.device)
        return self._combine([first, second], [None, chosen])


class Ensemble(Combination):
    """Every member scores every image; their levels combine by ``combine``.

    Args:
        members: two or more detectors (on one device when they score).
        combine: ``"any"`` (the largest level: flagged when any member flags), ``"all"`` (the
            smallest: flagged when every member flags at the same level) or ``"mean"``.
        names: how reasons name the members.
    """

    def __init__(self, members: Sequence[Any], combine: str = "any", *, names: Sequence[str] | None = None):
        if combine not in ENSEMBLE_RULES:
            raise ValueError(f"an ensemble's combine must be one of {ENSEMBLE_RULES}, got {combine!r}")
        super().__init__(members, combine, names)

    @property
    def model_id(self) -> str:
        return " + ".join(str(m.model_id) for m in self.members)

    @property
    def name(self) -> str:
        return " + ".join(self.names)

    def __repr__(self) -> str:
        return f"Ensemble({', '.join(repr(m) for m in self.members)}, combine={self.rule!r})"

    @torch.inference_mode()
    def score(self, pixels: torch.Tensor | list[torch.Tensor], finite: torch.Tensor | None = None) -> Scores:
        """Score prepared pixels with every member (as :meth:`Detector.score`), without a host read."""
        return self._combine([self._run(i, pixels, finite) for i in range(len(self.members))],
                             [None] * len(self.members))


def second_opinion(first: Any, second: Any, *, band: tuple[float, float] | None = None,
                   level: str = DEFAULT_LEVEL, threshold: float = DEFAULT_THRESHOLD, combine: str = "override",
                   names: Sequence[str] | None = None, **load_kwargs: Any) -> Cascade | Ensemble:
    """Two detectors as one, in one call (what the CLI, the server, diffusers and ComfyUI build).

    Args:
        first, second: detectors, or what :func:`~nsfw_safety.load_detector` takes (a registry
            name, hub id or checkpoint directory), loaded with ``load_kwargs``; the second on the
            first's device unless ``device=`` is given.
        band: the cascade's band on the first's ``level`` score; default ``(threshold, 1.0)``,
            every image the first flags at ``level >= threshold``.
        combine: ``"override"``, ``"mean"`` or ``"max"``: a :class:`Cascade`. ``"any"`` or
            ``"all"``: an :class:`Ensemble` of the two (both score every image; no ``band``).
    Raises:
        ValueError: a bad rule or band, or a band with ``any``/``all``.
        ModelLoadError: a model cannot be loaded.
    """
    if combine not in RULES:
        raise ValueError(f"combine must be one of {RULES}, got {combine!r}")
    if combine in BANDLESS and band is not None:
        raise ValueError(f"combine={combine!r} runs both models on every image: it takes no band")
    if not is_detector(first):
        first = load_detector(_ref(first), **load_kwargs)
    if not is_detector(second):
        second = load_detector(_ref(second), **{"device": first.device, **load_kwargs})
    if combine in BANDLESS:
        return Ensemble([first, second], combine, names=names)
    return Cascade(first, second, band=(check_threshold(threshold), 1.0) if band is None else tuple(band),
                   level=level, combine=combine, names=names)


def members_of(detector: Any) -> tuple[Any, ...]:
    """The plain :class:`Detector` objects inside ``detector`` (itself, for a plain one), in order."""
    if isinstance(detector, Combination):
        return tuple(d for m in detector.members for d in members_of(m))
    return (detector,)


# --- helpers -------------------------------------------------------------------------------------

def _ref(model: Any) -> str | os.PathLike:
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"expected a detector or a model name, hub id or directory, got {type(model).__name__}")
    return model


def _unique(names: list[str]) -> tuple[str, ...]:
    """``names`` with repeats numbered (``eva``, ``eva#2``), so that each reason names one member."""
    out = []
    for i, name in enumerate(names):
        n = names[:i].count(name)
        out.append(f"{name}#{n + 1}" if n else name)
    return tuple(out)


def _spread(s: Scores, index: torch.Tensor, b: int) -> Scores:
    """Scores of the rows ``index`` -> scores of all ``b`` rows, the others ``NOT_SCORED``."""
    def put(t: torch.Tensor, fill: float) -> torch.Tensor:
        return t.new_full((b, *t.shape[1:]), fill).index_copy_(0, index, t)

    parts = None
    if s.parts is not None:
        parts = Parts(s.parts.names, tuple(_spread(p, index, b) for p in s.parts.scores), s.parts.rule,
                      put(s.parts.source, 0))
    composite = put(s.composite, 0) if s.composite is not None else None
    return Scores(put(s.probs, torch.nan), put(s.levels, torch.nan), s.labels, put(s.status, NOT_SCORED),
                  composite, parts)


def _unscored(b: int, classes: int, labels: tuple[str, ...], device: torch.device) -> Scores:
    """The scores of a member that scored none of ``b`` images."""
    nan = torch.full((b, 4), torch.nan, device=device)
    return Scores(torch.full((b, classes), torch.nan, device=device), nan, labels,
                  torch.full((b,), NOT_SCORED, dtype=torch.int8, device=device))
