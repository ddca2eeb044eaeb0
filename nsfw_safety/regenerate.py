"""Regenerate flagged images with new seeds instead of handing back censored ones.

    from nsfw_safety.diffusers import attach
    from nsfw_safety.regenerate import regenerate

    attach(pipe, action="blur")
    out = regenerate(pipe, seeds=[1, 2, 3, 4], max_attempts=3, prompt="a lighthouse at dawn")
    out.images      # one per seed: the first clean attempt, or the censored last attempt
    out.seeds       # [[1], [2, 4294967298], [3], [4]]: the seeds each image was made with
    out.flagged     # [False, False, False, False]: True only where every attempt was flagged

The pipeline must be guarded, by :func:`nsfw_safety.diffusers.attach` or by an
:class:`~nsfw_safety.diffusers.NSFWSafetyChecker` in its ``safety_checker`` slot: this module only
re-runs it and reads the checker's :attr:`last_result`; the decision is the checker's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["Regenerated", "next_seed", "regenerate"]

#: Seeds are spaced this far apart, so a retry never reuses another image's seed below it.
SEED_STRIDE = 2**32
#: Schedules, not per-image inputs, even when their length equals the number of images.
_SHARED = frozenset({"timesteps", "sigmas"})
_PROMPT = re.compile(r"(negative_)?prompt(_\d+)?")


def next_seed(seed: int, attempt: int) -> int:
    """The default seed of retry ``attempt`` (1, 2, ...) of an image first made with ``seed``.

    ``seed + attempt * 2**32``: distinct from every first seed below ``2**32``, so a retry never
    repeats another image of the batch.
    """
    return seed + attempt * SEED_STRIDE


@dataclass(frozen=True)
class Regenerated:
    """What :func:`regenerate` made.

    Attributes:
        images: one per seed, in order, in the pipeline's output type: a list of PIL images
            (``"pil"``), a (B, H, W, 3) float array (``"np"``) or a (B, 3, H, W) float tensor in
            [0, 1] (``"pt"``). Each is the first attempt that passed the check, or, where every
            attempt was flagged, the last attempt as the checker censored it.
        seeds: per image, every seed it was generated with, in order; the last one made its image.
        flagged: per image, True when every attempt was flagged (its image is censored).
        reasons: per image, the checker's reason for its final attempt (``"medium 0.91 >= 0.50"``).
        actions: per image, the censoring applied to its final attempt (``"none"`` when clean).
    """

    images: Any
    seeds: list[list[int]]
    flagged: list[bool]
    reasons: list[str]
    actions: list[str]

    @property
    def attempts(self) -> list[int]:
        """Per image, how many times it was generated."""
        return [len(s) for s in self.seeds]


def regenerate(pipe: Any, seeds: Sequence[int], *, max_attempts: int = 3,
               seed_for_retry: Callable[[int, int], int] = next_seed, generator_device: str | torch.device = "cpu",
               **call_kwargs) -> Regenerated:
    """Run ``pipe`` once per seed, then re-run only the flagged images with new seeds.

    Every attempt after the first generates only the images still flagged, as one batch, each
    from its own ``torch.Generator``. The safe images of every attempt are kept as they are.

    Args:
        pipe: a diffusers pipeline guarded by :func:`~nsfw_safety.diffusers.attach`, or with an
            :class:`~nsfw_safety.diffusers.NSFWSafetyChecker` as its ``safety_checker``.
        seeds: one per image; their number is the batch size.
        max_attempts: generations per image at most, the first included (>= 1).
        seed_for_retry: ``(first seed, attempt) -> seed`` for attempts 1, 2, ...; default
            :func:`next_seed`.
        generator_device: where the generators live (diffusers draws the initial noise there).
        call_kwargs: the pipeline's own arguments. Per image: a string ``prompt`` /
            ``negative_prompt`` (and ``_2``, ``_3``) is used for every image; a list, tuple, array
            or tensor whose first dimension equals the number of seeds (``prompt``,
            ``prompt_embeds``, ``image``, ...) gives one entry per image and is indexed for each
            retry, except ``timesteps`` and ``sigmas``. Everything else is shared.
    Returns:
        :class:`Regenerated`.
    Raises:
        TypeError: the pipeline is not guarded, or an argument this function owns is given
            (``generator``, ``latents``, ``num_images_per_prompt``, ``return_dict``).
        ValueError: no seeds, ``max_attempts < 1``, or ``output_type="latent"`` (never checked).
        RuntimeError: a pipeline call was not checked, or the checker's result does not have one
            row per image.
    """
    checker = guard_of(pipe)
    seeds = [_seed(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold one seed per image, got none")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
    owned = sorted({"generator", "latents", "num_images_per_prompt", "return_dict"} & set(call_kwargs))
    if owned:
        raise TypeError(f"regenerate sets {owned} itself: give one seed per image (and per-image prompts or "
                        f"embeddings) instead")
    if call_kwargs.get("output_type") == "latent":
        raise ValueError("output_type='latent' is never checked, so nothing could be regenerated")
    n = len(seeds)
    call_kwargs = {k: [v] * n if isinstance(v, str) and _PROMPT.fullmatch(k) else v for k, v in call_kwargs.items()}

    tried = [[s] for s in seeds]
    final: list[Any] = [None] * n
    flagged, reasons, actions = [True] * n, [""] * n, [""] * n
    pending = list(range(n))
    for attempt in range(max_attempts):
        if attempt:
            for i in pending:
                tried[i].append(_seed(seed_for_retry(seeds[i], attempt)))
        kwargs = {k: _take(k, v, pending, n) for k, v in call_kwargs.items()}
        generators = [torch.Generator(generator_device).manual_seed(tried[i][-1]) for i in pending]
        checker.last_result = None
        images = pipe(**kwargs, generator=generators, return_dict=True).images
        result = checker.last_result
        if result is None:
            raise RuntimeError(f"a {type(pipe).__name__} call was not checked by its nsfw-safety checker")
        if len(result.flagged) != len(pending) or len(images) != len(pending):
            raise RuntimeError(f"asked for {len(pending)} images, got {len(images)} images and "
                               f"{len(result.flagged)} check results (one prompt and one seed per image)")
        for j, i in enumerate(pending):
            final[i] = images[j]
            flagged[i], reasons[i], actions[i] = result.flagged[j], result.reasons[j], result.actions[j]
        pending = [i for i in pending if flagged[i]]
        if not pending:
            break
    return Regenerated(_stack(final), tried, flagged, reasons, actions)


def guard_of(pipe: Any) -> Any:
    """The :class:`~nsfw_safety.diffusers.NSFWSafetyChecker` that checks ``pipe``'s output."""
    from .diffusers import NSFWSafetyChecker  # diffusers is optional for the rest of the package

    checker = vars(pipe).get("nsfw_safety") if hasattr(pipe, "__dict__") else None
    if checker is None and isinstance(getattr(pipe, "safety_checker", None), NSFWSafetyChecker):
        checker = pipe.safety_checker
    if not isinstance(checker, NSFWSafetyChecker):
        raise TypeError(f"{type(pipe).__name__} is not guarded by nsfw-safety: call nsfw_safety.diffusers.attach(pipe) "
                        f"or pass an NSFWSafetyChecker as its safety_checker first")
    return checker


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"a seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def _take(name: str, value: Any, index: list[int], n: int) -> Any:
    """The entries of ``index`` of a per-image argument; a shared one unchanged."""
    if name in _SHARED:
        return value
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
        return value[torch.tensor(index, device=value.device)]
    if isinstance(value, np.ndarray) and value.ndim and value.shape[0] == n:
        return value[index]
    if isinstance(value, (list, tuple)) and len(value) == n:
        return [value[i] for i in index]
    return value


def _stack(images: list[Any]) -> Any:
    """One batch in the pipeline's output type from one image each (PIL, (H, W, 3) array, (3, H, W) tensor)."""
    if isinstance(images[0], torch.Tensor):
        return torch.stack(images)
    if isinstance(images[0], np.ndarray):
        return np.stack(images)
    return list(images)
