"""Level names, the cumulative level scores, the scores themselves, and the threshold policy.

Every caller decides "flagged or not" here and nowhere else: :meth:`Policy.decide` turns
:class:`Scores` into a :class:`Verdict` (flags and reasons) with one read from the device.

Level scores, one row per image, columns ``LEVELS``:

* 4-class models (neutral, low, medium, high): ``neutral = p0``, ``low = p1+p2+p3``,
  ``medium = p2+p3``, ``high = p3`` -- the cumulative "at least this level" reading
  that the EVA model's authors publish.
* 2-class models (safe, nsfw): ``neutral = p_safe`` and ``low = medium = high = p_nsfw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .inputs import VIEW_NAMES
from .vocabulary import (DEFAULT_LEVEL, DEFAULT_THRESHOLD, LEVELS, NSFW_LEVELS,  # noqa: F401 (re-exported)
                         check_threshold, level_index)

_FOUR = ("neutral", "low", "medium", "high")
_NSFW_NAMES = ("nsfw", "unsafe", "porn", "explicit")


def level_matrix(labels: tuple[str, ...]) -> torch.Tensor:
    """The (C, 4) 0/1 matrix that turns class probabilities into level scores.

    ``probs (B, C) @ M`` gives ``levels (B, 4)``. Raises ``ValueError`` for label sets
    that map to neither scheme (a new model then needs labels that say which is which).
    """
    names = [label.lower() for label in labels]
    m = torch.zeros(len(labels), len(LEVELS))
    if sorted(names) == sorted(_FOUR):
        rank = {name: i for i, name in enumerate(_FOUR)}
        for c, name in enumerate(names):
            r = rank[name]
            if r == 0:
                m[c, 0] = 1.0
            else:
                m[c, 1 : r + 1] = 1.0  # class "medium" counts toward low and medium
        return m
    nsfw = [c for c, name in enumerate(names) if name in _NSFW_NAMES]
    if len(labels) == 2 and len(nsfw) == 1:
        m[1 - nsfw[0], 0] = 1.0
        m[nsfw[0], 1:] = 1.0
        return m
    raise ValueError(
        f"cannot map the model's labels {labels} to levels: expected "
        f"{_FOUR} or two classes one of which is named one of {_NSFW_NAMES}"
    )


# --- scores ----------------------------------------------------------------------------------

OK, NONFINITE_INPUT, NONFINITE_OUTPUT = 0, 1, 2
#: The status of a member's row that the member did not score (a cascade's second model on an
#: image outside its band); only ever in :attr:`Parts.scores`.
NOT_SCORED = -1
_PROBLEMS = {NONFINITE_INPUT: "non-finite input", NONFINITE_OUTPUT: "non-finite model output"}
#: The level row of an image that could not be checked: flagged at any level and threshold.
BLOCKED = torch.tensor([0.0, 1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Scores:
    """Scores for a batch of B images.

    Attributes:
        probs: (B, C) float32, the model's softmax probabilities (NaN where invalid).
        levels: (B, 4) float32, columns neutral, low, medium, high (see the module docstring).
            Invalid rows read 0 for neutral and 1 for every NSFW level (``BLOCKED``), so they are
            flagged at any level and threshold.
        labels: the C class names.
        status: (B,) int8, ``OK`` (0), ``NONFINITE_INPUT`` (1) or ``NONFINITE_OUTPUT`` (2).
        composite: (B, 4) int8 or None (no image had alpha): for an image with transparency,
            which composite gave each level score, ``inputs.OVER_WHITE`` (1) or
            ``inputs.OVER_BLACK`` (2); 0 for opaque images. Such an image is scored over white
            and over black, and keeps the stricter score of each level (the larger NSFW level,
            the smaller neutral); its ``probs`` are the distribution those levels imply.
        parts: None for one model. For a cascade or an ensemble (``nsfw_safety.cascade``): each
            member's own scores and which member decided each level (:class:`Parts`); ``probs``
            and ``labels`` are then the distribution the combined levels imply, over the members'
            labels when they share them, else over ``LEVELS``.
    """

    probs: torch.Tensor
    levels: torch.Tensor
    labels: tuple[str, ...]
    status: torch.Tensor
    composite: torch.Tensor | None = None
    parts: Parts | None = None

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, index: int | slice | list[int] | torch.Tensor) -> Scores:
        """The scores of some of the images, as a :class:`Scores` (an int gives a batch of one)."""
        if isinstance(index, int):
            index = [index]
        composite = self.composite[index] if self.composite is not None else None
        parts = self.parts[index] if self.parts is not None else None
        return Scores(self.probs[index], self.levels[index], self.labels, self.status[index], composite, parts)

    def to(self, device: torch.device | str) -> Scores:
        """The same scores on ``device`` (each member's part too)."""
        composite = self.composite.to(device) if self.composite is not None else None
        parts = self.parts.to(device) if self.parts is not None else None
        return Scores(self.probs.to(device), self.levels.to(device), self.labels, self.status.to(device),
                      composite, parts)

    @property
    def valid(self) -> torch.Tensor:
        """(B,) bool, True where the scores can be trusted."""
        return self.status == OK

    def problems(self) -> list[str | None]:
        """Per image: why its scores are invalid, or None."""
        return [_PROBLEMS.get(s) for s in self.status.tolist()]

    def to_dicts(self) -> list[dict[str, Any]]:
        """JSON-friendly: ``{"levels": {...}, "probs": {...}, "problem": str | None}`` per image;
        combined scores add ``"parts"``: each member's row (see :meth:`Parts.to_dicts`)."""
        levels = self.levels.cpu().tolist()
        probs = self.probs.cpu().tolist()
        rows = [{"levels": dict(zip(LEVELS, lv)),
                 "probs": {k: (None if p != p else p) for k, p in zip(self.labels, pr)},
                 "problem": problem}
                for lv, pr, problem in zip(levels, probs, self.problems())]
        if self.parts is not None:
            for row, parts in zip(rows, self.parts.to_dicts()):
                row["parts"] = parts
        return rows

    @staticmethod
    def cat(parts: list[Scores]) -> Scores:
        composite = None
        if any(p.composite is not None for p in parts):
            composite = torch.cat([p.composite if p.composite is not None else
                                   torch.zeros(len(p), 4, dtype=torch.int8, device=p.levels.device) for p in parts])
        members = Parts.cat([p.parts for p in parts]) if all(p.parts is not None for p in parts) else None
        return Scores(torch.cat([p.probs for p in parts]), torch.cat([p.levels for p in parts]),
                      parts[0].labels, torch.cat([p.status for p in parts]), composite, members)


@dataclass(frozen=True)
class Parts:
    """What each member of a cascade or ensemble (``nsfw_safety.cascade``) said about a batch.

    Attributes:
        names: the members' names, as reasons show them (``"eva"``, ``"vit-sd"``).
        scores: each member's :class:`Scores` for the same B images, in member order. A row that a
            member did not score (a cascade's second model outside its band) has status
            ``NOT_SCORED`` and NaN levels and probs.
        rule: how they were combined: ``"override"``, ``"mean"`` or ``"max"`` (a cascade),
            ``"any"``, ``"all"`` or ``"mean"`` (an ensemble).
        source: (B, 4) int8, per image and level, the member whose score was kept (the second
            model where it overrode, the largest score for max and any, the smallest for all, the
            largest of those averaged for mean). Reasons name it, and the combined ``composite``
            is its.
    """

    names: tuple[str, ...]
    scores: tuple[Scores, ...]
    rule: str
    source: torch.Tensor

    def __getitem__(self, index: slice | list[int] | torch.Tensor) -> Parts:
        return Parts(self.names, tuple(s[index] for s in self.scores), self.rule, self.source[index])

    def to(self, device: torch.device | str) -> Parts:
        return Parts(self.names, tuple(s.to(device) for s in self.scores), self.rule, self.source.to(device))

    @staticmethod
    def cat(parts: list[Parts]) -> Parts:
        members = tuple(Scores.cat([p.scores[m] for p in parts]) for m in range(len(parts[0].names)))
        return Parts(parts[0].names, members, parts[0].rule, torch.cat([p.source for p in parts]))

    def to_dicts(self) -> list[list[dict[str, Any]]]:
        """Per image, per member: ``{"model": name, "scored": bool, "levels", "probs", "problem"}``
        (``levels``, ``probs`` and ``problem`` are None where the member did not score the image)."""
        columns = []
        for name, scores in zip(self.names, self.scores):
            scored = (scores.status != NOT_SCORED).cpu().tolist()
            columns.append([{"model": name, "scored": True, **row} if ok else
                            {"model": name, "scored": False, "levels": None, "probs": None, "problem": None}
                            for ok, row in zip(scored, scores.to_dicts())])
        return [list(row) for row in zip(*columns)]

    def columns(self) -> list[torch.Tensor]:
        """What :meth:`Policy.decide` reads with the combined scores, in its one copy: each
        member's levels (4) and status (1), then ``source`` (4), as float columns."""
        out = []
        for scores in self.scores:
            out += [scores.levels.float(), scores.status[:, None].float()]
        return out + [self.source.float()]

    def _unpack(self, tail: list[float]) -> tuple[list[list[float]], list[int], list[int]]:
        m = len(self.names)
        levels = [tail[5 * i: 5 * i + 4] for i in range(m)]
        status = [int(tail[5 * i + 4]) for i in range(m)]
        return levels, status, [int(v) for v in tail[5 * m: 5 * m + 4]]

    def attribute(self, tail: list[float], level: str) -> tuple[str, str]:
        """(who, detail) for one image's combined score of ``level``: the member that decided
        (``"mean"`` for a mean), and the other scores it was weighed against (empty when one
        member alone scored the image). ``tail``: this image's :meth:`columns`, read on the host."""
        levels, status, source = self._unpack(tail)
        col = LEVELS.index(level)
        scored = [i for i, s in enumerate(status) if s != NOT_SCORED]
        who = self.names[source[col]]
        if len(scored) < 2:
            return who, ""
        if self.rule == "override":
            return who, f"second opinion on {self.names[0]} {levels[0][col]:.2f}"
        values = ", ".join(f"{self.names[i]} {levels[i][col]:.2f}" for i in scored)
        return ("mean", values) if self.rule == "mean" else (who, f"{self.rule} of {values}")

    def problem(self, tail: list[float], problem: str) -> str:
        """The reason for an image whose combined scores are invalid: the problem, and the member
        whose output it was (a non-finite input is every member's)."""
        _, status, _ = self._unpack(tail)
        bad = [i for i, s in enumerate(status) if s not in (OK, NOT_SCORED)]
        if not bad or status[bad[0]] == NONFINITE_INPUT:
            return problem
        return f"{problem} ({self.names[bad[0]]})"


@dataclass(frozen=True)
class Verdict:
    """A policy's decision on a batch, on the host.

    Attributes:
        flagged: one bool per image.
        reasons: one string per image, e.g. ``"medium 0.83 >= 0.50"`` or ``"non-finite input"``.
        problems: per image, why its scores could not be trusted, or None.
    """

    flagged: list[bool]
    reasons: list[str]
    problems: list[str | None]

    def actions(self, action: str) -> list[str]:
        """What to do to each image: ``action`` if flagged, ``"black"`` if its check failed
        (a blur of garbage proves nothing), ``"none"`` if it passed."""
        return [("black" if p else action) if f else "none" for f, p in zip(self.flagged, self.problems)]


@dataclass(frozen=True)
class Policy:
    """When an image counts as flagged.

    Either one ``level`` and ``threshold`` (flag when ``levels[level] >= threshold``), or
    per-level ``thresholds`` such as ``{"low": 0.9, "medium": 0.6, "high": 0.3}`` (flag when
    any level meets its threshold). Images whose scores are invalid (non-finite input or
    output) are always flagged: the policy fails closed.
    """

    level: str = DEFAULT_LEVEL
    threshold: float = DEFAULT_THRESHOLD
    thresholds: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.thresholds is None:
            level_index(self.level)
            object.__setattr__(self, "threshold", check_threshold(self.threshold))
            return
        if not isinstance(self.thresholds, Mapping) or not self.thresholds:
            raise ValueError(f"thresholds must be a non-empty dict level -> threshold, got {self.thresholds!r}")
        clean = {}
        for level, t in self.thresholds.items():
            level_index(level)
            clean[level] = check_threshold(t, f"thresholds[{level!r}]")
        object.__setattr__(self, "thresholds", dict(sorted(clean.items(), key=lambda kv: LEVELS.index(kv[0]))))

    @property
    def rules(self) -> dict[str, float]:
        """The (level -> threshold) rules, in level order."""
        return dict(self.thresholds) if self.thresholds is not None else {self.level: self.threshold}

    def flag(self, levels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Flags as a tensor, without a host sync.

        Args:
            levels: (B, 4) float level scores.
            valid: (B,) bool, False where the scores cannot be trusted.
        Returns:
            (B,) bool, True = flagged.
        """
        hit = ~valid
        for level, t in self.rules.items():  # Python scalars: no host-to-device copy
            hit = hit | (levels[:, LEVELS.index(level)] >= t)
        return hit

    def decide(self, scores: Scores) -> Verdict:
        """Flags and reasons for ``scores``, with one copy from the device (the first host read
        of the batch: everything before it stays on the device).

        A reason names the first rule (in level order) that flagged the image,
        ``"medium 0.83 >= 0.50"``, or every rule with its score when it passed. A score that came
        from a transparent image composited over white says so: ``"... (over white)"``, and
        ``"... (over white and black)"`` when the image passed both composites. An image whose
        scores are invalid is flagged, with the problem as its reason.
        """
        rules = self.rules
        valid = scores.valid
        # per rule, the device's own comparison: the host must not redo it (a float32 score equal
        # to its threshold compares differently once widened to a Python float)
        hits = [(scores.levels[:, LEVELS.index(level)] >= t) & valid for level, t in rules.items()]
        columns = [*(h[:, None] for h in hits), scores.levels, valid[:, None],
                   (scores.status == NONFINITE_OUTPUT)[:, None]]
        if scores.composite is not None:
            columns.append(scores.composite)
        members = scores.parts
        if members is not None:  # a cascade or ensemble: each member's scores, in the same copy
            columns += members.columns()
        device = scores.levels.device
        host = torch.cat([c.to(device, torch.float32) for c in columns], dim=1).cpu().tolist()
        r = len(rules)
        end = r + 6 + (4 if scores.composite is not None else 0)
        flagged, reasons, problems = [], [], []
        for row in host:
            hit, levels, view, tail = row[:r], row[r : r + 4], [int(v) for v in row[r + 6 : end]], row[end:]
            problem = None if row[r + 4] else _PROBLEMS[NONFINITE_OUTPUT if row[r + 5] else NONFINITE_INPUT]
            flagged.append(problem is not None or any(hit))
            problems.append(problem)
            if problem is not None:
                reasons.append(members.problem(tail, problem) if members is not None else problem)
                continue

            def named(level: str, text: str) -> str:  # "vit-sd medium 0.91 >= 0.50 (second opinion on eva 0.55)"
                if members is None:
                    return text
                who, detail = members.attribute(tail, level)
                return f"{who} {text}" + (f" ({detail})" if detail else "")

            parts = [(level, levels[LEVELS.index(level)], t) for level, t in rules.items()]
            if any(hit):
                level, s, t = parts[[bool(h) for h in hit].index(True)]
                shown = view[LEVELS.index(level)] if view else 0
                view_name = f" ({VIEW_NAMES[shown]})" if shown else ""
                reasons.append(named(level, f"{level} {s:.2f} >= {t:.2f}{view_name}"))
            else:
                passed = ", ".join(named(level, f"{level} {s:.2f} < {t:.2f}") for level, s, t in parts)
                reasons.append(passed + (" (over white and black)" if any(view) else ""))
        return Verdict(flagged, reasons, problems)
