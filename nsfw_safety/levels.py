"""Level names, the cumulative level scores, and the threshold policy.

Every caller decides "flagged or not" here and nowhere else.

Level scores, one row per image, columns ``LEVELS``:

* 4-class models (neutral, low, medium, high): ``neutral = p0``, ``low = p1+p2+p3``,
  ``medium = p2+p3``, ``high = p3`` -- the cumulative "at least this level" reading
  that the EVA model's authors publish.
* 2-class models (safe, nsfw): ``neutral = p_safe`` and ``low = medium = high = p_nsfw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

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

    def reasons(self, levels: torch.Tensor, flagged: list[bool], problems: list[str | None]) -> list[str]:
        """One human-readable reason per image, e.g. ``"medium 0.83 >= 0.50"``.

        Args:
            levels: (B, 4) level scores (read on the host).
            flagged: the decisions from :meth:`flag`.
            problems: per image, why its scores are invalid, or None.
        """
        rows = levels.detach().float().cpu().tolist()
        rules = self.rules
        out = []
        for row, hit, problem in zip(rows, flagged, problems):
            if problem is not None:
                out.append(problem)
                continue
            parts = [(level, row[LEVELS.index(level)], t) for level, t in rules.items()]
            if hit:
                level, s, t = next(p for p in parts if p[1] >= p[2])
                out.append(f"{level} {s:.2f} >= {t:.2f}")
            else:
                out.append(", ".join(f"{level} {s:.2f} < {t:.2f}" for level, s, t in parts))
        return out
