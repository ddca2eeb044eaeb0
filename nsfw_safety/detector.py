"""The detector: a classifier, its preprocessing, batching, dtype and scores.

``load_detector`` is the one entry point. It returns a new detector on every call; the
checkpoints it has read (CPU, fp32) and the per-device constants of ``device_cache`` are the
library's only global state.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import inputs as _inputs
from .device_cache import on_device
from .levels import DEFAULT_LEVEL, DEFAULT_THRESHOLD, BLOCKED, NONFINITE_INPUT, NONFINITE_OUTPUT, OK, Policy, Scores, level_matrix  # noqa: F401 -- Scores: public here too
from .models import DEFAULT_MODEL, LoadedModel, ModelSpec, load_model, resolve
from .preprocess import PreprocessConfig, preprocess

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


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
                paths, or lists of these (see ``nsfw_safety.inputs``). Images with alpha are
                scored over white and over black, keeping the stricter levels (see :meth:`score`).
            value_range: range of float input, ``(0, 1)`` by default; ``(-1, 1)`` for VAE output.
            layout: ``"BCHW"``, ``"BHWC"``, ``"CHW"``, ``"HWC"`` or ``"HW"`` when the shape is ambiguous.
        Returns:
            :class:`Scores` on the model's device; nothing is synchronized until they are read.
        """
        prepared = _inputs.prepare(images, value_range=value_range, layout=layout, device=self.device)
        return self.score(prepared.pixels, prepared.finite)

    def is_nsfw(self, images: Any, level: str = DEFAULT_LEVEL, threshold: float = DEFAULT_THRESHOLD,
                **kwargs) -> list[bool]:
        """``levels[level] >= threshold`` per image (invalid scores count as NSFW)."""
        policy = Policy(level, threshold)
        scores = self.predict(images, **kwargs)
        return policy.decide(scores).flagged

    @torch.inference_mode()
    def score(self, pixels: torch.Tensor | list[torch.Tensor], finite: torch.Tensor | None = None) -> Scores:
        """Score prepared pixels.

        Images with alpha are scored as a viewer could see them, composited over white and over
        black (``inputs.views``), both views in the same forward batch; each keeps the stricter
        level scores of its two views (``Scores.composite`` says which). Opaque images have one
        view, and cost nothing more.

        Args:
            pixels: (B, C, H, W) uint8 in [0, 255] or float in [0, 1], or a list of
                (C, H_i, W_i), ideally on ``self.device``; C = 1 (gray), 2 (gray + alpha),
                3 (RGB) or 4 (RGBA), as ``inputs.Prepared.pixels``.
            finite: (B,) bool, False where the input held NaN/Inf; computed when None.
        """
        if len(pixels) == 0:
            raise ValueError("no images to score")
        if isinstance(pixels, torch.Tensor):
            n_views = [2 if _inputs.has_alpha(pixels) else 1] * len(pixels)
        else:
            n_views = [2 if _inputs.has_alpha(p) else 1 for p in pixels]
        with self._lock:
            device, dtype = self.device, self.dtype
            parts, start, budget = [], 0, min(self.max_batch_size, sum(n_views))
            while start < len(pixels):  # chunks of at most `budget` views (at least one image)
                stop, used = start + 1, n_views[start]
                while stop < len(pixels) and used + n_views[stop] <= budget:
                    used += n_views[stop]
                    stop += 1
                try:
                    parts.append(self._score_chunk(pixels[start:stop], device, dtype))
                except torch.cuda.OutOfMemoryError:
                    if stop - start == 1:
                        raise
                    budget = max(1, used // 2)
                    log.warning("CUDA out of memory; retrying with batches of %d", budget)
                    torch.cuda.empty_cache()
                    continue
                start = stop
        scores = Scores.cat(parts) if len(parts) > 1 else parts[0]
        if finite is None:
            return scores
        bad_input = ~finite.to(scores.status.device)
        status = torch.where(bad_input, NONFINITE_INPUT, scores.status).to(torch.int8)
        levels = torch.where(bad_input[:, None], self._on(scores.levels.device)[1], scores.levels)
        return Scores(scores.probs, levels, scores.labels, status, scores.composite)

    def _score_chunk(self, batch, device, dtype) -> Scores:
        if isinstance(batch, list):
            batch = [p.to(device, non_blocking=True) for p in batch]
        else:
            batch = batch.to(device, non_blocking=True)
        views, kinds = _inputs.views(batch)
        x = preprocess(views, self.preprocess_config, dtype)
        del views
        logits = self._forward(x).float()
        probs = logits.softmax(dim=-1)
        valid = torch.isfinite(probs).all(dim=-1)
        matrix, blocked, _ = self._on(probs.device)
        levels = probs @ matrix
        status = torch.where(valid, OK, NONFINITE_OUTPUT).to(torch.int8)
        return self._per_image(Scores(probs, torch.where(valid[:, None], levels, blocked), self.labels, status),
                               kinds)

    def _per_image(self, s: Scores, kinds: list[int]) -> Scores:
        """Scores of views (in image order, as ``inputs.views`` gives them) -> scores of images.

        An image with two views keeps, per level, the stricter score: the larger NSFW level, the
        smaller neutral (so neutral = 1 - low still holds), and the worse status. Done on the
        device without a host sync: a reshape when every image has two views, else a
        ``scatter_reduce`` over an index copied from pinned memory.
        """
        if _inputs.OVER_WHITE not in kinds:
            return s
        device = s.levels.device
        signed = torch.cat([-s.levels[:, :1], s.levels[:, 1:]], dim=1)  # larger is stricter everywhere
        if _inputs.OPAQUE not in kinds:  # two views per image, side by side
            best, which = signed.view(-1, 2, 4).max(dim=1)
            composite = (which + 1).to(torch.int8)
            status = s.status.view(-1, 2).amax(dim=1)
            single = None
        else:
            first: list[int] = []  # each image's first view
            owner = []
            for j, kind in enumerate(kinds):
                if kind != _inputs.OVER_BLACK:
                    first.append(j)
                owner.append(len(first) - 1)
            v, n = len(kinds), len(first)
            index = _pinned_index(owner + kinds + first, device)
            own, kind, first_t = index[:v], index[v : 2 * v], index[2 * v :]
            rows = own[:, None].expand(-1, 4)
            best = signed.new_empty(n, 4).scatter_reduce_(0, rows, signed, "amax", include_self=False)
            hit = (signed == best[own]).to(torch.int8) * kind[:, None].to(torch.int8)
            composite = torch.zeros(n, 4, dtype=torch.int8, device=device).scatter_reduce_(0, rows, hit, "amax")
            status = s.status.new_empty(n).scatter_reduce_(0, own, s.status, "amax", include_self=False)
            single = (kind[first_t] == _inputs.OPAQUE, s.probs[first_t])
        levels = torch.cat([-best[:, :1], best[:, 1:]], dim=1)
        # the class distribution the kept levels imply, so that levels == probs @ level matrix
        probs = torch.where((status == OK)[:, None], levels @ self._on(device)[2], torch.nan)
        if single is not None:  # opaque images keep the model's own probabilities
            probs = torch.where(single[0][:, None], single[1], probs)
        return Scores(probs, levels, s.labels, status, composite)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The level matrix (C, 4), the fail-closed level row (4,) and the matrix that turns level
        scores back into class probabilities (4, C), on ``device``, made once per device."""
        return on_device(("levels", self.labels),
                         lambda: (self._level_matrix, BLOCKED, torch.linalg.pinv(self._level_matrix)), device)


def _pinned_index(values: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor on ``device`` from host ints; to a GPU through pinned memory, without a sync."""
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


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
