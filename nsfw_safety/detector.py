"""The detector: a classifier, its preprocessing, batching, dtype and scores.

``load_detector`` is the one entry point. It returns a new detector on every call; the
checkpoints it has read (CPU, fp32) and the per-device constants of ``device_cache`` are the
library's only global state.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import inputs as _inputs
from .device_cache import on_device
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


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None or "auto": bf16 on CUDA, fp32 elsewhere."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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
        """The level matrix (C, 4) and the fail-closed level row (4,) on ``device``, made once per device."""
        return on_device(("levels", self.labels), lambda: (self._level_matrix, BLOCKED), device)


# --- loading ---------------------------------------------------------------------------------

#: The checkpoints read so far, on the CPU in fp32, never handed out: (directory, spec, file
#: versions) -> LoadedModel. Every detector gets a module of its own built over these weights.
_CACHE: dict[tuple, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_detector(model: str | os.PathLike = DEFAULT_MODEL, *, revision: str | None = None,
                  token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                  local_files_only: bool = False, device: torch.device | str | None = None,
                  dtype: torch.dtype | str | None = None, compile: bool | str = False,
                  max_batch_size: int = 32) -> Detector:
    """Load a detector: a new one on every call, as ``timm.create_model`` gives a new model.

    Detectors share no placement: moving or casting one (``pipe.to("cuda:1")``, ComfyUI's
    offload) never moves another. The weights are read from disk once per checkpoint (again
    when its files change) and kept on the CPU in fp32; each call builds its own module over
    them, and ``device``/``dtype`` copy them, so only detectors on the CPU in fp32 share their
    weights' memory. Treat the weights as read-only: writing into them in place (e.g.
    ``load_state_dict``) would reach those other detectors too.

    Args:
        model: a registry name (``"eva"``, ``"vit-sd"``, ``"vit"``, ``"falconsai"``), a hub id, or a
            local checkpoint directory (TimmWrapper or ViT format, safetensors only).
        revision, token, cache_dir, local_files_only: passed to the hub download.
            ``HF_HUB_OFFLINE=1`` is honoured.
        device: default CUDA when available, else CPU.
        dtype: default ``"auto"``: bf16 on CUDA, fp32 on CPU.
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
    source = _read(path, model_id, revision, spec)
    # the name it was loaded by, not that of whoever read the files first (a symlinked folder)
    loaded = replace(source, module=_own_module(source.module).to(dev, dt), model_id=model_id, revision=revision)
    log.info("loaded %s on %s in %s", model_id, dev, dt)
    return Detector(loaded, max_batch_size=max_batch_size, compile=compile, path=path)


def _read(path: Path, model_id: str, revision: str | None, spec: ModelSpec | None) -> LoadedModel:
    """The checkpoint in directory ``path``, read from disk once per version of its files."""
    files = sorted(f for f in path.resolve().iterdir() if f.suffix in (".json", ".safetensors"))
    versions = tuple((f.name, st.st_ino, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])
    key = (str(path.resolve()), repr(spec), versions)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_model(path, model_id, revision, spec)
        return _CACHE[key]


def _own_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with parameters and buffers of its own over the same memory.

    ``nn.Module.to`` replaces a module's own tensors (``param.data = ...``), so moving or
    casting the copy never touches ``module`` or any other copy.
    """
    memo = {id(t): nn.Parameter(t.detach(), t.requires_grad) if isinstance(t, nn.Parameter) else t.detach()
            for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)
