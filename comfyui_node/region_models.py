"""ComfyUI glue for the region detector: its model folder, its choices, and its loader cache.

The choices are NudeNet's 320n model from the installed ``nudenet`` package (when it is
installed), then the ``.onnx`` files under ``<ComfyUI>/models/nsfw_region_detector`` (for example
NudeNet's 640m model, which users download themselves). The detector runs with onnxruntime,
outside ComfyUI's model management: the 320n model is 12 MB.
"""

from __future__ import annotations

import os
import threading

from nsfw_safety.regions import RegionDetector
from nsfw_safety.regions.detector import default_model_path

from . import management

try:
    import folder_paths
except ImportError:
    folder_paths = None

#: ComfyUI model folder key: ``<ComfyUI>/models/nsfw_region_detector/<name>.onnx``.
FOLDER = "nsfw_region_detector"

if folder_paths is not None:
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


def model_roots() -> list[str]:
    return list(folder_paths.get_folder_paths(FOLDER)) if folder_paths is not None else []


def models() -> dict[str, str]:
    """Choice -> ``.onnx`` path: the installed nudenet model first (``nudenet/320n.onnx``), then the
    files under :func:`model_roots`, read from disk on every call (a file copied in is offered at
    the next prompt)."""
    found: dict[str, str] = {}
    try:
        default = default_model_path()
        if default.is_file():
            found[f"{default.parent.name}/{default.name}"] = str(default)
    except ImportError:  # nudenet not installed: only local files
        pass
    for root in model_roots():
        if os.path.isdir(root):
            for entry in sorted(os.scandir(root), key=lambda e: e.name):
                if entry.is_file() and entry.name.endswith(".onnx"):
                    found.setdefault(entry.name, entry.path)
    return found


def choices() -> list[str]:
    return list(models()) or ["(install nsfw-safety[regions])"]


# One detector per model file for the life of the process, as the classifier loader keeps its own.
_DETECTORS: dict[tuple[str, str], RegionDetector] = {}
_LOCK = threading.Lock()


def load(name: str) -> RegionDetector:
    """The region detector for a loader node: loaded once per model file, then the same object.

    It runs on the CPU when ComfyUI does (``--cpu``); otherwise on CUDA when onnxruntime has the
    CUDA provider (``onnxruntime-gpu``), else on the CPU.
    """
    found = models()
    if name not in found:
        raise ValueError(f"unknown region detector {name!r}: expected one of {list(found)} (the installed nudenet "
                         f"package's model, or .onnx files under {model_roots() or 'models/' + FOLDER}); "
                         f"pip install 'nsfw-safety[regions]' for the default")
    device = "cpu" if management.devices()[0].type == "cpu" else None
    key = (found[name], str(device))
    with _LOCK:
        if key not in _DETECTORS:
            _DETECTORS[key] = RegionDetector(found[name], device=device)
        return _DETECTORS[key]
