"""The library's vocabulary and its checks, importable without torch.

Level names, censor actions and the defaults live here so that the command line can parse
and check its arguments (and answer ``--help``) before any model library is imported. The
modules that use them (``levels``, ``censor``, ``filter``, ``models``) import them from here.
"""

from __future__ import annotations

import numbers

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
