"""The detector: a classifier, its preprocessing, batching, dtype and scores.

``load_detector`` is the one entry point; loaded detectors are cached by
(model, revision, device, dtype), the only global state of the library.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import inputs as _inputs
from .levels import LEVELS, Policy, level_matrix
from .models import DEFAULT_MODEL, LoadedModel, ModelSpec, load_model, resolve
from .preprocess import PreprocessConfig, preprocess

log = logging.getLogger(__name__)

OK, NONFINITE_INPUT, NONFINITE_OUTPUT = 0, 1, 2
_PROBLEMS = {NONFINITE_INPUT: "non-finite input", NONFINITE_OUTPUT: "non-finite model output"}
#: The level row of an image that could not be checked: flagged at any level and threshold.
BLOCKED = torch.tensor([0.0, 1.0, 1.0, 1.0])
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


@dataclass(frozen=True)
class Scores:
    """Scores for a batch of B images.

    Attributes:
        probs: (B, C) float32, the model's softmax probabilities (NaN where invalid).
        levels: (B, 4) float32, columns neutral, low, medium, high (see ``nsfw_safety.levels``).
            Invalid rows read 0 for neutral and 1 for every NSFW level, so they are flagged
            at any level and threshold.
        labels: the C class names.
        status: (B,) int8, 0 = valid, 1 = non-finite input, 2 = non-finite model output.
    """

    probs: torch.Tensor
    levels: torch.Tensor
    labels: tuple[str, ...]
    status: torch.Tensor

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, index: int | slice | list[int] | torch.Tensor) -> Scores:
        """The scores of some of the images, as a :class:`Scores` (an int gives a batch of one)."""
        if isinstance(index, int):
            index = [index]
        return Scores(self.probs[index], self.levels[index], self.labels, self.status[index])

    @property
    def valid(self) -> torch.Tensor:
        """(B,) bool, True where the scores can be trusted."""
        return self.status == OK

    def problems(self) -> list[str | None]:
        """Per image: why its scores are invalid, or None."""
        return [_PROBLEMS.get(s) for s in self.status.tolist()]

    def to_dicts(self) -> list[dict[str, Any]]:
        """JSON-friendly: ``{"levels": {...}, "probs": {...}, "problem": str | None}`` per image."""
        levels = self.levels.cpu().tolist()
        probs = self.probs.cpu().tolist()
        return [{"levels": dict(zip(LEVELS, lv)),
                 "probs": {k: (None if p != p else p) for k, p in zip(self.labels, pr)},
                 "problem": problem}
                for lv, pr, problem in zip(levels, probs, self.problems())]

    @staticmethod
    def cat(parts: list[Scores]) -> Scores:
        return Scores(torch.cat([p.probs for p in parts]), torch.cat([p.levels for p in parts]),
                      parts[0].labels, torch.cat([p.status for p in parts]))


#: CPU features that multiply bf16 in hardware: AVX512-BF16 (Cooper Lake, Zen 4+) and AMX (Sapphire Rapids+).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpu_capabilities() -> dict[str, Any]:
    """This CPU's feature flags: ``torch.cpu.get_capabilities()`` (cpuinfo's CPUID reading), or on a
    torch without it, the flags line of /proc/cpuinfo (Linux); empty where neither exists."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {flag: True for flag in flags}


def cpu_bf16_native() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), as torch reports it.

    The flags, not a timing probe, decide: they are what oneDNN dispatches its bf16 kernels on,
    they cost nothing to read, and they give the same answer on every run (a probe on a shared
    machine would not). Without them, bf16 is emulated and several times slower than fp32.
    """
    caps = _cpu_capabilities()
    return any(caps.get(flag) for flag in NATIVE_BF16_FLAGS)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None or "auto": bf16 on CUDA and on CPUs with native bf16 (:func:`cpu_bf16_native`),
    fp32 elsewhere."""
    if dtype is None or dtype == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native())
        return torch.bfloat16 if native else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    return dtype


class Detector:
    """An NSFW classifier ready to score images.

    Use :func:`load_detector` to make one. ``device`` and ``dtype`` are those of the model's
    weights, so they follow the model wherever a host (diffusers, ComfyUI) moves it.
    ``path`` is the local checkpoint directory it was built from (None if unknown).
    """

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 32, compile: bool | str = False,
                 path: Path | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model: nn.Module = loaded.module
        self.labels = loaded.labels
        self.preprocess_config: PreprocessConfig = loaded.preprocess
        self.model_id = loaded.model_id
        self.revision = loaded.revision
        self.spec: ModelSpec | None = loaded.spec
        self.path = path
        self.max_batch_size = max_batch_size
        self._level_matrix = level_matrix(self.labels)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # a string names torch.compile's mode (torch rejects unknown ones here)
        mode = compile if isinstance(compile, str) else None
        self._forward = torch.compile(self.model, dynamic=False, mode=mode) if compile else self.model
        self._lock = threading.Lock()  # one batch at a time: servers call from worker threads

    def __repr__(self) -> str:
        return f"Detector({self.model_id!r}, labels={self.labels}, device={self.device}, dtype={self.dtype})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> Detector:
        """Move (and cast) the model in place; returns self."""
        if device is not None:
            self.model.to(torch.device(device))
        if dtype is not None:
            self.model.to(resolve_dtype(dtype, self.device))
        return self

    # --- scoring ----------------------------------------------------------------------------

    def predict(self, images: Any, *, value_range: _inputs.ValueRange = (0.0, 1.0),
                layout: str | None = None) -> Scores:
        """Score images.

        Args:
            images: tensors ``(B, C, H, W)``/``(B, H, W, C)``/single, numpy arrays, PIL images,
                paths, or lists of these (see ``nsfw_safety.inputs``).
            value_range: range of float input, ``(0, 1)`` by default; ``(-1, 1)`` for VAE output.
            layout: ``"BCHW"``, ``"BHWC"``, ``"CHW"``, ``"HWC"`` or ``"HW"`` when the shape is ambiguous.
        Returns:
            :class:`Scores` on the model's device; nothing is synchronized until they are read.
        """
        prepared = _inputs.prepare(images, value_range=value_range, layout=layout, device=self.device)
        return self.score(prepared.pixels, prepared.finite)

    def is_nsfw(self, images: Any, level: str = "medium", threshold: float = 0.5, **kwargs) -> list[bool]:
        """``levels[level] >= threshold`` per image (invalid scores count as NSFW)."""
        policy = Policy(level, threshold)
        scores = self.predict(images, **kwargs)
        return policy.flag(scores.levels, scores.valid).tolist()

    @torch.inference_mode()
    def score(self, pixels: torch.Tensor | list[torch.Tensor], finite: torch.Tensor | None = None) -> Scores:
        """Score prepared pixels.

        Args:
            pixels: (B, 3, H, W) float in [0, 1] (or a list of (3, H_i, W_i)), ideally on ``self.device``.
            finite: (B,) bool, False where the input held NaN/Inf; computed when None.
        """
        if len(pixels) == 0:
            raise ValueError("no images to score")
        with self._lock:
            device, dtype = self.device, self.dtype
            parts, start, chunk = [], 0, min(self.max_batch_size, len(pixels))
            while start < len(pixels):
                batch = pixels[start : start + chunk]
                try:
                    parts.append(self._score_chunk(batch, device, dtype))
                except torch.cuda.OutOfMemoryError:
                    if chunk == 1:
                        raise
                    chunk //= 2
                    log.warning("CUDA out of memory; retrying with batches of %d", chunk)
                    torch.cuda.empty_cache()
                    continue
                start += len(batch)
        scores = Scores.cat(parts) if len(parts) > 1 else parts[0]
        if finite is None:
            return scores
        bad_input = ~finite.to(scores.status.device)
        status = torch.where(bad_input, NONFINITE_INPUT, scores.status).to(torch.int8)
        levels = torch.where(bad_input[:, None], self._on(scores.levels.device)[1], scores.levels)
        return Scores(scores.probs, levels, scores.labels, status)

    def _score_chunk(self, batch, device, dtype) -> Scores:
        if isinstance(batch, list):
            batch = [p.to(device, non_blocking=True) for p in batch]
        else:
            batch = batch.to(device, non_blocking=True)
        x = preprocess(batch, self.preprocess_config, dtype)
        logits = self._forward(x).float()
        probs = logits.softmax(dim=-1)
        valid = torch.isfinite(probs).all(dim=-1)
        matrix, blocked = self._on(probs.device)
        levels = probs @ matrix
        status = torch.where(valid, OK, NONFINITE_OUTPUT).to(torch.int8)
        return Scores(probs, torch.where(valid[:, None], levels, blocked), self.labels, status)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The level matrix (C, 4) and the fail-closed level row (4,), made once per device:
        a host-to-device copy on every call would synchronize the stream."""
        if device not in self._constants:
            self._constants[device] = (self._level_matrix.to(device), BLOCKED.to(device))
        return self._constants[device]


# --- loading ---------------------------------------------------------------------------------

_CACHE: dict[tuple, Detector] = {}
_CACHE_LOCK = threading.Lock()


def load_detector(model: str | os.PathLike = DEFAULT_MODEL, *, revision: str | None = None,
                  token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                  local_files_only: bool = False, device: torch.device | str | None = None,
                  dtype: torch.dtype | str | None = None, compile: bool | str = False,
                  max_batch_size: int = 32) -> Detector:
    """Load (or reuse) a detector.

    Args:
        model: a registry name (``"eva"``, ``"vit-sd"``, ``"vit"``, ``"falconsai"``), a hub id, or a
            local checkpoint directory (TimmWrapper or ViT format, safetensors only).
        revision, token, cache_dir, local_files_only: passed to the hub download.
            ``HF_HUB_OFFLINE=1`` is honoured.
        device: default CUDA when available, else CPU.
        dtype: default ``"auto"``: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX),
            fp32 elsewhere.
        compile: wrap the model in ``torch.compile`` (best with a fixed batch size); a string
            picks its mode, e.g. ``"reduce-overhead"`` (CUDA graphs) or ``"max-autotune"``.
        max_batch_size: larger inputs are scored in chunks of this size; halved on CUDA OOM.
    Raises:
        ModelLoadError: the model cannot be found or built; the message says what to do.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = resolve_dtype(dtype, dev)
    path, model_id, spec = resolve(model, revision=revision, token=token, cache_dir=cache_dir,
                                   local_files_only=local_files_only)
    key = (model_id, str(path.resolve()), revision, str(dev), dt, compile, max_batch_size)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        # Hosts move a cached model between devices (ComfyUI's offload, pipe.to) and the detector
        # follows: that is its point. One whose dtype was changed under it is not handed out.
        if cached is None or cached.dtype != dt:
            loaded = load_model(path, model_id, revision, spec)
            loaded.module.to(dev, dt)
            _CACHE[key] = Detector(loaded, max_batch_size=max_batch_size, compile=compile, path=path)
            log.info("loaded %s on %s in %s", model_id, dev, dt)
        return _CACHE[key]

