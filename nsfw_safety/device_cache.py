"""Small constant tensors (level matrices, normalization means), made once per device.

Copying a constant from the host on every call would synchronize the stream, so each one is
moved to a device once and kept, keyed by what it is and where it lives.
"""

from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

T = TypeVar("T", torch.Tensor, tuple[torch.Tensor, ...])

#: Distinct (key, device) pairs kept; past this the oldest is dropped (a handful of models
#: times a handful of devices is all a process uses).
MAX_ENTRIES = 64
_CACHE: dict[tuple[Hashable, torch.device], torch.Tensor | tuple[torch.Tensor, ...]] = {}


def on_device(key: Hashable, tensor_factory: Callable[[], T], device: torch.device | str) -> T:
    """``tensor_factory()`` (a tensor or a tuple of tensors) on ``device``, made once per (key, device).

    Args:
        key: names the value: equal keys must give equal tensors (e.g. ``("mean_std", mean, std)``),
            never an object id, which Python reuses.
        tensor_factory: makes the value on any device; called only on a miss.
        device: where the value is wanted.
    """
    device = torch.device(device)
    value = _CACHE.get((key, device))
    if value is None:
        made = tensor_factory()
        value = tuple(t.to(device) for t in made) if isinstance(made, tuple) else made.to(device)
        if len(_CACHE) >= MAX_ENTRIES:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[(key, device)] = value  # two threads may both miss: each stores an equal value
    return value
