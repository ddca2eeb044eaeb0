"""The model registry and checkpoint loading.

A model is named by a registry name (``"eva"``), a hub id (``"Freepik/nsfw_image_detector"``)
or a local directory. Hub ids are resolved to a local snapshot with ``huggingface_hub``;
from there on every model loads from a directory, so tests and users share one path.

Two on-disk formats are supported, both safetensors-only (nothing is ever unpickled):

* transformers **TimmWrapper** (``config.json`` with ``model_type: timm_wrapper``): built with
  ``timm.create_model(architecture, num_classes, **model_args)``; preprocessing from the
  config's ``pretrained_cfg``, else timm's default config for the architecture.
* transformers **ViTForImageClassification** (``config.json`` + ``preprocessor_config.json``):
  preprocessing from the image processor config.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .preprocess import PreprocessConfig
from .vocabulary import DEFAULT_MODEL  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


class ModelLoadError(RuntimeError):
    """A model could not be found, downloaded or built; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """A known model: where it lives, what it outputs, and how to feed it.

    ``preprocess`` is only the fallback: a checkpoint's own config wins.
    """

    name: str
    hub_id: str
    labels: tuple[str, ...]
    preprocess: PreprocessConfig
    license: str
    gated: bool = False
    note: str = ""


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry under ``spec.name`` (replacing an entry of that name)."""
    REGISTRY[spec.name] = spec
    return spec


register(ModelSpec(
    name="eva",
    hub_id="Freepik/nsfw_image_detector",
    labels=("neutral", "low", "medium", "high"),
    preprocess=PreprocessConfig((448, 448), "squash", "bicubic", CLIP_MEAN, CLIP_STD),
    license="MIT",
    note="EVA02-B/14 at 448, four cumulative levels; the default",
))
register(ModelSpec(
    name="vit-sd",
    hub_id="AdamCodd/vit-nsfw-stable-diffusion",
    labels=("sfw", "nsfw"),
    preprocess=PreprocessConfig((384, 384), "squash", "bilinear", HALF, HALF),
    license="cc-by-nc-nd-4.0 (non-commercial)",
    gated=True,
    note="ViT-B/16 trained on generated images; gated: accept its terms on the hub and pass a token",
))
register(ModelSpec(
    name="vit",
    hub_id="AdamCodd/vit-base-nsfw-detector",
    labels=("sfw", "nsfw"),
    preprocess=PreprocessConfig((384, 384), "squash", "bilinear", HALF, HALF),
    license="Apache-2.0",
    note="ViT-B/16 at 384; strict ('sexy' counts as NSFW), weaker on generated images",
))
register(ModelSpec(
    name="falconsai",
    hub_id="Falconsai/nsfw_image_detection",
    labels=("normal", "nsfw"),
    preprocess=PreprocessConfig((224, 224), "squash", "bilinear", HALF, HALF),
    license="Apache-2.0",
    note="ViT-B/16 at 224",
))


@dataclass(frozen=True)
class LoadedModel:
    """A built classifier and what is needed to feed it and read it."""

    module: nn.Module  # (B, 3, h, w) normalized pixels -> (B, C) logits
    labels: tuple[str, ...]
    preprocess: PreprocessConfig
    model_id: str
    revision: str | None
    spec: ModelSpec | None


def resolve(model: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
            cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> tuple[Path, str, ModelSpec | None]:
    """Turn a registry name, hub id or directory into (local directory, model id, spec)."""
    if isinstance(model, os.PathLike) or (isinstance(model, str) and os.path.isdir(model)):
        path = Path(model)
        if not path.is_dir():
            raise ModelLoadError(f"model directory {str(path)!r} does not exist")
        return path, str(path), None
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a registry name, hub id or directory, got {model!r}")
    spec = REGISTRY.get(model)
    if spec is None and "/" not in model:
        raise ModelLoadError(
            f"unknown model {model!r}: use one of {sorted(REGISTRY)}, a hub id such as "
            f"'Freepik/nsfw_image_detector', or a local checkpoint directory")
    hub_id = spec.hub_id if spec else model
    if spec is None:
        spec = next((s for s in REGISTRY.values() if s.hub_id == hub_id), None)
    return _download(hub_id, revision, token, cache_dir, local_files_only, spec), hub_id, spec


def _download(hub_id: str, revision, token, cache_dir, local_files_only: bool, spec: ModelSpec | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    offline = local_files_only or constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(
            hub_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.md"],
        ))
    except GatedRepoError as e:
        raise ModelLoadError(
            f"{hub_id} is gated: accept its terms on https://huggingface.co/{hub_id} and pass "
            f"token=... (or set HF_TOKEN / run `hf auth login`)") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelLoadError(f"{hub_id} (revision {revision or 'main'}) was not found on the hub: {e}") from e
    except Exception as e:  # offline mode, no cache entry, no network: one actionable message
        where = f"cache_dir={cache_dir}" if cache_dir else f"the HF cache ({constants.HF_HUB_CACHE})"
        how = ("HF_HUB_OFFLINE=1 is set, so nothing is downloaded" if offline and not local_files_only
               else "local_files_only=True" if local_files_only else "the hub could not be reached")
        gated = " It is gated: accept its terms on the hub and log in first." if spec and spec.gated else ""
        raise ModelLoadError(
            f"model {hub_id} (revision {revision or 'main'}) is not in {where} and {how}. "
            f"Download it once on a machine with access (`hf download {hub_id} --local-dir DIR`) "
            f"and pass DIR as the model, or copy the cached snapshot.{gated} "
            f"[{type(e).__name__}: {e}]") from e


def load_model(path: Path, model_id: str, revision: str | None, spec: ModelSpec | None) -> LoadedModel:
    """Build the classifier stored in directory ``path`` (fp32, on the CPU)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a checkpoint directory")
    config = json.loads(config_file.read_text())
    if config.get("model_type") == "timm_wrapper":
        return _load_timm_wrapper(path, config, model_id, revision, spec)
    if config.get("model_type") == "vit":
        return _load_vit(path, config, model_id, revision, spec)
    raise ModelLoadError(
        f"{config_file}: unsupported model_type {config.get('model_type')!r}; "
        f"expected 'timm_wrapper' (EVA) or 'vit' (ViT classifiers)")


def _safetensors_file(path: Path) -> Path:
    file = path / "model.safetensors"
    if not file.is_file():
        raise ModelLoadError(f"{path} has no model.safetensors (pickled .bin checkpoints are never loaded)")
    return file


# timm.create_model arguments that fetch weights or configs from elsewhere (the hub, a URL, a path,
# a pickled checkpoint). A checkpoint directory loads only its own model.safetensors.
_TIMM_FETCHING_ARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                                 "cache_dir"})


def _timm_architecture(config: dict, config_file: Path) -> tuple[str, dict]:
    """The checkpoint's timm architecture and model_args, refusing anything that would make timm
    download or read another checkpoint (``hf-hub:...``, ``local-dir:...``, ``checkpoint_path``)."""
    import timm

    arch, model_args = config.get("architecture"), config.get("model_args") or {}
    if not isinstance(arch, str) or not re.fullmatch(r"[\w.-]+", arch):
        raise ModelLoadError(
            f"{config_file}: architecture {arch!r} is not a timm model name. A source such as 'hf-hub:' or "
            f"'local-dir:' would load a model from elsewhere, and a local checkpoint never reaches the network: "
            f"name the timm architecture (e.g. 'eva02_base_patch14_448') and keep the weights in model.safetensors")
    if not timm.is_model(arch.split(".", 1)[0]):
        raise ModelLoadError(f"{config_file}: unknown timm architecture {arch!r} (timm {timm.__version__})")
    if not isinstance(model_args, dict):
        raise ModelLoadError(f"{config_file}: model_args must be a dict, got {type(model_args).__name__}")
    fetching = sorted(_TIMM_FETCHING_ARGS & set(model_args))
    if fetching:
        raise ModelLoadError(
            f"{config_file}: model_args {fetching} would make timm load weights or configs from elsewhere; "
            f"a local checkpoint loads only its own model.safetensors")
    return arch, model_args


def _load_timm_wrapper(path, config, model_id, revision, spec) -> LoadedModel:
    import timm
    from safetensors.torch import load_file

    arch, model_args = _timm_architecture(config, path / "config.json")
    labels = tuple(config.get("label_names") or [config["id2label"][str(i)] for i in range(len(config["id2label"]))])
    module = timm.create_model(arch, pretrained=False, num_classes=len(labels), **model_args)
    state = load_file(_safetensors_file(path))
    state = {k.removeprefix("timm_model."): v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{path}: weights do not match {arch}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    pcfg = dict(module.pretrained_cfg or {})
    pcfg.update(config.get("pretrained_cfg") or {})
    if "img_size" in model_args and "pretrained_cfg" not in config:
        size = model_args["img_size"]
        pcfg["input_size"] = (3, *((size, size) if isinstance(size, int) else size))
    fallback = spec.preprocess if spec else None
    pre = PreprocessConfig.from_timm(pcfg, fallback)
    return LoadedModel(module.eval(), labels, pre, model_id, revision, spec)


class _HFLogits(nn.Module):
    """A transformers image classifier seen as ``pixels -> logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _load_vit(path, config, model_id, revision, spec) -> LoadedModel:
    from transformers import ViTForImageClassification

    _safetensors_file(path)
    model = ViTForImageClassification.from_pretrained(
        path, use_safetensors=True, attn_implementation="sdpa", dtype=torch.float32, local_files_only=True)
    labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    proc_file = path / "preprocessor_config.json"
    proc = json.loads(proc_file.read_text()) if proc_file.is_file() else None
    if proc is None and spec is None:
        raise ModelLoadError(f"{path} has no preprocessor_config.json and is not a registry model")
    pre = PreprocessConfig.from_hf_processor(proc, spec.preprocess if spec else None)
    return LoadedModel(_HFLogits(model).eval(), labels, pre, model_id, revision, spec)

