"""ComfyUI glue: the model folder, devices, and ComfyUI's model management.

Every ComfyUI import is optional. Inside ComfyUI the detector is handed to a ``ModelPatcher``
so ComfyUI loads it onto its device before each run and offloads it when another model needs
the memory; outside ComfyUI (tests, plain Python) the device comes from torch: CUDA when
available, else the CPU.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref

import torch
from torch import nn

from nsfw_safety import REGISTRY, Detector, load_detector
from nsfw_safety.cascade import members_of
from nsfw_safety.detector import resolve_dtype

try:
    import comfy.model_management as mm
    import comfy.model_patcher as model_patcher
except ImportError:  # not running inside ComfyUI
    mm = model_patcher = None
try:
    import folder_paths
except ImportError:
    folder_paths = None

#: ComfyUI model folder key: ``<ComfyUI>/models/nsfw_detector/<name>/config.json``.
FOLDER = "nsfw_detector"
DTYPES = ("auto", "bf16", "fp16", "fp32")

if folder_paths is not None:
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


def checkpoint_roots() -> list[str]:
    """The folders that hold local checkpoint folders (ComfyUI's ``nsfw_detector`` paths)."""
    return list(folder_paths.get_folder_paths(FOLDER)) if folder_paths is not None else []


def local_checkpoints() -> dict[str, str]:
    """Checkpoint folders (those with a ``config.json``) under :func:`checkpoint_roots`, name -> path.

    Read from disk on every call: ComfyUI re-validates combo choices at every prompt, so a
    folder copied in while ComfyUI runs is usable without a restart.
    """
    found: dict[str, str] = {}
    for root in checkpoint_roots():
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "config.json")):
                found.setdefault(entry.name, entry.path)  # the first root wins, as in folder_paths
    return found


def model_choices() -> list[str]:
    """Registry names (the default ``eva`` first), then local checkpoint folders."""
    return list(REGISTRY) + [name for name in local_checkpoints() if name not in REGISTRY]


def resolve_model(name: str) -> str:
    """A combo choice -> what ``load_detector`` takes.

    A local folder wins over the registry entry of the same name, so a copy of the Freepik
    model saved as ``models/nsfw_detector/eva`` is used without going to the hub.
    """
    local = local_checkpoints()
    if name in local:
        return local[name]
    if name in REGISTRY:
        return name
    raise ValueError(f"unknown NSFW detector {name!r}: expected one of {model_choices()} "
                     f"(registry names, or a folder with config.json under {checkpoint_roots() or 'models/' + FOLDER})")


def devices() -> tuple[torch.device, torch.device]:
    """(load device, offload device): ComfyUI's choice, else CUDA when available, else CPU."""
    if mm is not None:
        return mm.get_torch_device(), mm.unet_offload_device()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, device


# The loader node's detectors, one per (checkpoint, dtype), kept for the life of the process:
# ComfyUI re-runs the loader node whenever its output cache was evicted, and tracks models by
# ModelPatcher (one per detector, below). ComfyUI's model management moves them between its
# devices; that is what they are kept for. load_detector itself keeps no detectors.
_DETECTORS: dict[tuple, Detector] = {}
_LOCK = threading.Lock()


def load(name: str, dtype: str = "auto") -> Detector:
    """The detector for a loader node: loaded once per (model, dtype), then the same object.

    It is loaded onto the offload device and reaches the load device through :func:`activate`.
    ``dtype="auto"`` is resolved against the load device: bf16 when ComfyUI runs on a CUDA GPU,
    fp32 under ``--cpu``. A kept detector whose dtype was changed under it is loaded again.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    load_device, offload_device = devices()
    model, dt = resolve_model(name), resolve_dtype(dtype, load_device)
    key = (model, str(offload_device), dt)
    with _LOCK:
        kept = _DETECTORS.get(key)
        if kept is None or kept.dtype != dt:
            _DETECTORS[key] = load_detector(model, device=offload_device, dtype=dt)
        return _DETECTORS[key]


class _Holder(nn.Module):
    """A plain module around the classifier: ModelPatcher sets attributes such as ``device`` on
    the module it manages, which transformers models forbid."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


# One patcher per detector for as long as the detector lives (_DETECTORS keeps it):
# ComfyUI tracks loaded models by patcher, so a new patcher per run would double-count memory.
_PATCHERS: weakref.WeakKeyDictionary[Detector, object] = weakref.WeakKeyDictionary()


def activate(detector: Detector) -> None:
    """Have ComfyUI load ``detector`` onto its device (offloading other models if needed).

    The detector's ``device`` follows its weights, so scoring then runs wherever ComfyUI put
    it. A second opinion's models are each their loader's detector, with its own patcher, and
    are loaded together. Outside ComfyUI this does nothing.
    """
    if mm is None:
        return
    patchers = []
    for member in members_of(detector):
        patcher = _PATCHERS.get(member)
        if patcher is None:
            load_device, offload_device = devices()
            patcher = model_patcher.ModelPatcher(_Holder(member.model), load_device=load_device,
                                                 offload_device=offload_device)
            _PATCHERS[member] = patcher
        patchers.append(patcher)
    # a full load: plain torch layers cannot run half on the GPU as ComfyUI's own layers can
    if "force_full_load" in inspect.signature(mm.load_models_gpu).parameters:
        mm.load_models_gpu(patchers, force_full_load=True)
    else:
        for patcher in patchers:
            mm.load_model_gpu(patcher)
