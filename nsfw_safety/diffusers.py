"""diffusers integration: a drop-in ``safety_checker`` and a zero-copy guard for any pipeline.

* :class:`NSFWSafetyChecker` replaces ``StableDiffusionSafetyChecker`` in every pipeline that
  calls ``self.safety_checker(images=..., clip_input=...)`` and expects ``(images, flags)``
  (SD 1.x/2.x txt2img, img2img, inpaint, ControlNet, PAG, LCM, ...). It is a diffusers
  ``ModelMixin``, so it follows ``pipe.to()``, offloading and ``save_pretrained``.
* :func:`attach` makes a pipeline hand its decoded tensor straight to the checker, on the
  tensor's device: no PIL round trip, no CLIP feature extractor. It also guards pipelines that
  have no ``safety_checker`` (SDXL, SD3, Flux, ...) at ``pipe.image_processor.postprocess``, and
  video pipelines (Wan, CogVideoX, LTX, HunyuanVideo, Mochi, AnimateDiff, SVD) at
  ``pipe.video_processor.postprocess_video``, frame by frame.

Both only adapt :class:`nsfw_safety.SafetyFilter` to diffusers' conventions; scoring,
thresholds and censoring all happen there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
# ModelMixin must stay a name of this module: diffusers finds a saved component's load
# method by looking its base classes up in the component's own module.
from diffusers import ConfigMixin, ModelMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.video_processor import VideoProcessor
from transformers import CLIPImageProcessor

from .cascade import Cascade, Ensemble, is_detector, members_of, model_name, second_opinion as combine_detectors
from .censor import CensorSettings
from .detector import Detector, load_detector, resolve_dtype
from .filter import FilterResult, SafetyFilter
from .inputs import tensor_to_pil
from .levels import DEFAULT_LEVEL, DEFAULT_THRESHOLD
from .video import VideoBatchResult, check_videos
from .regions.settings import RegionSettings

log = logging.getLogger(__name__)

__all__ = ["NSFWSafetyChecker", "attach", "detach", "light_feature_extractor"]

DETECTOR_DIR = "detector"
#: Where a second opinion's checkpoint is saved, beside ``DETECTOR_DIR``.
SECOND_DIR = "second_opinion"
PLACEHOLDER_FILE = "placeholder.png"
# Keyword arguments diffusers' pipeline loader passes to a component's from_pretrained (besides
# torch_dtype); the checker's placement is its own, so they are accepted and ignored.
_LOADER_KWARGS = frozenset({
    "device_map", "max_memory", "offload_folder", "offload_state_dict", "variant",
    "use_safetensors", "use_flashpack", "low_cpu_mem_usage", "disable_mmap", "quantization_config",
})
_CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".txt", ".md")


def light_feature_extractor() -> CLIPImageProcessor:
    """A CLIP image processor that makes 8x8 features.

    The SD pipelines refuse a ``safety_checker`` without a ``feature_extractor`` and run it on
    every call; :class:`NSFWSafetyChecker` ignores the features, so this one only has to be
    cheap and saveable. Pipelines that use IP-Adapter need their real feature extractor.
    """
    return CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, resample=0)


class NSFWSafetyChecker(ModelMixin, ConfigMixin):
    """A ``safety_checker`` for diffusers pipelines that blurs (or blocks) NSFW images.

    Make one with :meth:`from_pretrained`, from a detector you loaded
    (``NSFWSafetyChecker(detector, level="high", action="black")``), or around a
    :class:`SafetyFilter` you built (``NSFWSafetyChecker(SafetyFilter(detector, ...))``).

    Args:
        guard: the filter that scores and censors, or a :class:`Detector` to build one over.
        level, threshold, settings: with a detector, the :class:`SafetyFilter` settings
            (``thresholds``, ``action``, ``on_error``, ``blur_strength``, ``block``, ``color``,
            ``placeholder``); unset ones keep the filter's defaults. Not allowed with a filter.
        dtype: the compute dtype, kept whatever dtype the pipeline casts its components to;
            default: the detector's own if it was loaded in a non-default dtype, else "auto"
            (bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere, re-applied whenever the
            checker changes device).
        model: the detector reference to record in the saved config (default: the detector's id).

    The guard's detector may be a second opinion (:func:`nsfw_safety.cascade.second_opinion`): a
    cascade or an ensemble of two detectors, which the checker saves and reloads with both.

    ``device`` is where the detector runs. ``dtype`` is the dtype the pipeline last cast its
    components to (``pipe.to(torch.float16)``, ``torch_dtype=``), because ``pipe.dtype`` reads
    its first component in name order, which is ``safety_checker``; before any cast it is the
    compute dtype. The detector always runs in :attr:`compute_dtype`.

    Attributes:
        last_result: the :class:`FilterResult` of the last call (scores, reasons, actions); for a
            video pipeline a :class:`~nsfw_safety.video.VideoBatchResult` (per video: flagged
            frames, their scores, what was censored); None when the last pipeline call was not
            checked (``output_type="latent"``), whether the checker was passed as
            ``safety_checker=`` or attached.
        feature_extractor: a light feature extractor for pipelines built without one.
        video_window: video pipelines: also censor this many frames either side of a flagged
            frame (see :func:`nsfw_safety.video.check_video`); default 0.
        video_censor: video pipelines: ``"frames"`` (default) or ``"clip"`` (every frame of a
            video with a flagged frame).
    """

    video_window: int = 0
    video_censor: str = "frames"

    config_name = "config.json"

    def __init__(self, guard: SafetyFilter | Detector, level: str | None = None, threshold: float | None = None, *,
                 dtype: torch.dtype | str | None = None, model: str | None = None, **settings):
        super().__init__()
        rule = {k: v for k, v in dict(level=level, threshold=threshold).items() if v is not None}
        if isinstance(guard, Detector):
            guard = SafetyFilter(guard, **rule, **settings)
        elif not isinstance(guard, SafetyFilter):
            raise TypeError(f"guard must be a SafetyFilter or a Detector, got {type(guard).__name__}")
        elif rule or settings:
            raise TypeError(f"settings {sorted(rule | settings)} cannot be combined with a ready SafetyFilter: "
                            f"give them to the SafetyFilter, or pass its detector instead")
        if guard.detector is None:
            raise TypeError("a safety checker needs a classifier: its SafetyFilter is region-only (detector=None)")
        detector = guard.detector
        self.guard = guard
        self.classifier = detector.model  # a submodule, so the pipeline's .to() and offload move it
        if dtype is None and detector.dtype != resolve_dtype(None, detector.device):
            dtype = detector.dtype
        self._pinned_dtype = None if dtype in (None, "auto") else resolve_dtype(dtype, detector.device)
        self._host_dtype: torch.dtype | None = None
        self.last_result: FilterResult | None = None
        self._checked = False  # since the end of the last pipeline call
        self.feature_extractor = light_feature_extractor()
        policy, censoring = guard.policy, guard.censoring.to_dict()
        del censoring["placeholder"]  # saved as an image beside the config
        try:
            first, second = _pair(detector)
            second_config = None if second is None else _second_config(detector, second)
        except TypeError:  # a larger combination works, but cannot be saved (save_pretrained says so)
            first, second_config = members_of(detector)[0], None
        self.register_to_config(
            model=model or first.model_id, revision=first.revision, level=policy.level,
            threshold=policy.threshold, thresholds=policy.thresholds, on_error=guard.on_error, **censoring,
            compute_dtype=None if self._pinned_dtype is None else str(self._pinned_dtype).removeprefix("torch."),
            second_opinion=second_config,
            regions=guard.regions.to_dict() if guard.regions is not None else None,
        )

    # --- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike = "eva", *,
                        level: str | None = None, threshold: float | None = None,
                        thresholds: Mapping[str, float] | None = None, action: str | None = None,
                        on_error: str | None = None, blur_strength: float | None = None,
                        block: float | None = None, color: Sequence[float] | None = None,
                        placeholder: Any = None, revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                        compile: bool = False, max_batch_size: int = 32, torch_dtype: torch.dtype | None = None,
                        second_opinion: str | os.PathLike | Detector | None = None,
                        band: tuple[float, float] | None = None, combine: str | None = None,
                        regions: RegionSettings | Mapping[str, Any] | bool | None = None,
                        **loader_kwargs) -> NSFWSafetyChecker:
        """Load a checker.

        Args:
            pretrained_model_name_or_path: a detector (registry name such as ``"eva"``, hub id,
                or checkpoint directory, as for :func:`nsfw_safety.load_detector`), or a directory
                written by :meth:`save_pretrained` (e.g. ``<pipeline>/safety_checker``), whose
                settings become the defaults.
            level, threshold, thresholds: the flagging rule (see :class:`SafetyFilter`); giving
                any of them replaces the saved rule as a whole. Default: medium >= 0.5.
            action, on_error, blur_strength, block, color, placeholder: as for :class:`SafetyFilter`.
            revision, token, cache_dir, local_files_only, device, compile, max_batch_size: as for
                :func:`nsfw_safety.load_detector`.
            dtype: the compute dtype (default "auto": bf16 on CUDA and on CPUs with native bf16,
                fp32 elsewhere), kept whatever the pipeline's ``torch_dtype`` is.
            torch_dtype: the pipeline's dtype, only reported as :attr:`dtype` (diffusers passes
                it when it loads a saved pipeline).
            second_opinion: a second detector (a name, hub id, directory or a loaded detector; a
                saved checker's own by default), combined with the first as
                :func:`nsfw_safety.cascade.second_opinion` does: ``band`` on the rule's level
                (default: the images the first flags), ``combine`` ``"override"`` (default),
                ``"mean"``, ``"max"``, or ``"any"``/``"all"`` (both models on every image).
            regions: region mode (see :class:`SafetyFilter`): a :class:`RegionSettings`, a dict of
                its settings (``RegionSettings.to_dict``'s keys, any of them), True for the
                defaults, or False for none; default: the saved settings, else none. The saved
                config records the region model by reference (None: the installed nudenet
                package's model; else the ``.onnx`` file's path), never a copy of it.
            loader_kwargs: the rest of what diffusers' pipeline loader passes (``device_map``,
                ``variant``, ...); ignored.
        Raises:
            ModelLoadError: the detector cannot be found or built.
        """
        unknown = sorted(set(loader_kwargs) - _LOADER_KWARGS)
        if unknown:
            log.warning("NSFWSafetyChecker.from_pretrained ignores unknown argument(s) %s", unknown)
        saved = _saved_config(pretrained_model_name_or_path, cls.__name__)
        censoring = CensorSettings().to_dict()
        del censoring["placeholder"]
        settings = dict(level=DEFAULT_LEVEL, threshold=DEFAULT_THRESHOLD, thresholds=None, on_error="block",
                        **censoring)
        model, origin = pretrained_model_name_or_path, None
        second = dict(model=second_opinion, band=band, combine=combine, names=None)
        if saved is not None:
            source = Path(pretrained_model_name_or_path)
            model, origin = source / DETECTOR_DIR, saved.get("model")
            kept = saved.get("second_opinion")
            if kept and second_opinion is None:  # the saved one, with its names, settings and origin
                second.update(model=source / SECOND_DIR, names=kept["names"], level=kept.get("level"), kept=kept)
                second.update({k: kept[k] for k in ("band", "combine") if second[k] is None})
            settings.update({k: saved[k] for k in settings if saved.get(k) is not None})
            if placeholder is None and (source / PLACEHOLDER_FILE).is_file():
                placeholder = source / PLACEHOLDER_FILE
            if dtype is None:
                dtype = saved.get("compute_dtype")
            if regions is None:
                regions = saved.get("regions")
        if level is not None or threshold is not None or thresholds is not None:
            settings.update(level=level or DEFAULT_LEVEL, threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                            thresholds=thresholds)
        given = dict(action=action, on_error=on_error, blur_strength=blur_strength, block=block, color=color)
        settings.update({k: v for k, v in given.items() if v is not None})
        detector = load_detector(model, revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=local_files_only, device=device, dtype=dtype,
                                 compile=compile, max_batch_size=max_batch_size)
        if second["model"] is not None:
            if not is_detector(second["model"]):
                second["model"] = load_detector(second["model"], token=token, cache_dir=cache_dir,
                                                local_files_only=local_files_only, device=detector.device,
                                                dtype=dtype, compile=compile, max_batch_size=max_batch_size)
            names = second["names"] or (model_name(origin or model), model_name(second["model"]))
            detector = combine_detectors(detector, second["model"], band=second["band"],
                                         level=second.get("level") or settings["level"],
                                         threshold=settings["threshold"], combine=second["combine"] or "override",
                                         names=names)
        elif band is not None or combine is not None:
            raise ValueError("band and combine need a second_opinion model")
        guard = SafetyFilter(detector, settings.pop("level"), settings.pop("threshold"),
                             placeholder=placeholder, regions=_region_settings(regions), **settings)
        checker = cls(guard, dtype=dtype, model=origin)
        if "kept" in second:  # record the second model it was saved from, not the folder of its copy
            kept = second["kept"]
            checker.register_to_config(second_opinion={**checker.config.second_opinion, "model": kept["model"],
                                                       "revision": kept.get("revision")})
        checker._host_dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else None
        return checker

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs) -> None:
        """Write the checker to ``save_directory`` so :meth:`from_pretrained` restores it.

        Writes ``config.json`` (the settings), ``detector/`` (a verbatim copy of the detector's
        checkpoint files: config, safetensors weights, preprocessing; so the saved pipeline
        loads offline), ``second_opinion/`` likewise for a second opinion's model, and, for a
        custom placeholder, ``placeholder.png``. diffusers' own keyword arguments
        (``safe_serialization``, ``variant``, ...) are accepted and ignored.
        """
        if not is_main_process:
            return
        first, second = _pair(self.guard.detector)
        out = Path(save_directory)
        if out.is_file():
            raise ValueError(f"save_directory {str(out)!r} is a file, expected a directory")
        members = [(DETECTOR_DIR, first)] + ([(SECOND_DIR, second)] if second is not None else [])
        for _, member in members:
            if member.path is None or not Path(member.path).is_dir():
                raise ValueError(f"cannot save the checker: the checkpoint directory {member.path} "
                                 f"of {member.model_id} is gone")
        for folder, member in members:
            target = out / folder
            target.mkdir(parents=True, exist_ok=True)
            if not target.samefile(member.path):  # re-saving a reloaded pipeline in place
                for file in sorted(Path(member.path).iterdir()):
                    if file.is_file() and file.name.endswith(_CHECKPOINT_SUFFIXES):
                        shutil.copy2(file, target / file.name)
        card = self.guard.censoring.placeholder
        if card is not None:
            tensor_to_pil(card).save(out / PLACEHOLDER_FILE)
        self.save_config(out)

    # --- device and dtype --------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The pipeline's dtype as last given to :meth:`to`, else :attr:`compute_dtype`."""
        return self._host_dtype or self.compute_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the detector runs in (its weights')."""
        return self.guard.detector.dtype

    def to(self, *args, **kwargs) -> NSFWSafetyChecker:
        """Move to a device. A dtype is recorded as :attr:`dtype` but does not cast the
        detector: it keeps its compute dtype (see the class docstring)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)  # nn.Module.to's own parser
        if dtype is not None:
            self._host_dtype = dtype
        if device is not None:
            super().to(device, non_blocking=non_blocking)
        target = self._pinned_dtype or resolve_dtype(None, self.device)
        if self.compute_dtype != target:
            super().to(target)
        return self

    # --- checking ------------------------------------------------------------------------------

    def check(self, images: torch.Tensor | np.ndarray, *, value_range=(0.0, 1.0), layout: str | None = None,
              censored_range=None, guard: SafetyFilter | None = None) -> FilterResult:
        """Run the filter, keep the result in :attr:`last_result`, and log what was flagged.

        Arguments as for :meth:`SafetyFilter.__call__`; ``guard`` is a filter to use for this call
        instead of :attr:`guard` (other settings over the same detector).
        """
        guard = self.guard if guard is None else guard
        result = guard(images, value_range=value_range, layout=layout, censored_range=censored_range)
        self.last_result, self._checked = result, True
        if result.any_flagged:
            hits = [f"#{i}: {r} -> {a}" for i, (f, r, a) in enumerate(zip(result.flagged, result.reasons,
                                                                         result.actions)) if f]
            log.warning("nsfw-safety flagged %d of %d images (%s)", len(hits), len(result.flagged), "; ".join(hits))
        return result

    def _reset_stateful_cache(self, *args, **kwargs) -> None:
        """Called by diffusers on every component at the end of every pipeline call
        (``maybe_free_model_hooks``, diffusers 0.33+): a call that checked nothing (``output_type=
        "latent"``) leaves ``last_result`` None, not the previous call's result."""
        if not self._checked:
            self.last_result = None
        self._checked = False

    def check_videos(self, videos: torch.Tensor, *, layout: str = "BCFHW") -> VideoBatchResult:
        """Check a batch of videos frame by frame, keep the result in :attr:`last_result`, and log
        what was flagged.

        Args:
            videos: (B, C, F, H, W) float in [0, 1], a video pipeline's decoded frames (or another
                ``layout`` of :func:`nsfw_safety.video.check_videos`).
        """
        result = check_videos(videos, self.guard, window=self.video_window, censor=self.video_censor, layout=layout)
        self.last_result, self._checked = result, True
        if result.any_flagged:
            hits = [f"video {i}: {v.reason}" for i, v in enumerate(result.videos) if v.flagged]
            log.warning("nsfw-safety flagged %d of %d videos (%s)", len(hits), len(result.videos), "; ".join(hits))
        return result

    def forward(self, images: torch.Tensor | np.ndarray, clip_input: Any = None) -> tuple[Any, list[bool]]:
        """The ``safety_checker`` call of the SD pipelines.

        Args:
            images: (B, 3, H, W) float tensor in [-1, 1], the VAE's output (not clamped), as the
                SD pipelines pass it; or (B, H, W, 3) float numpy in [0, 1], as the pipelines that
                decode to numpy pass it (T2I-Adapter, text-to-video-zero).
            clip_input: the pipeline's CLIP features; ignored.
        Returns:
            images: same kind, shape, dtype and device; unflagged images unchanged, flagged ones
                censored and in [0, 1] (the pipeline does not denormalize flagged images).
            has_nsfw_concept: B bools.
        """
        if isinstance(images, torch.Tensor):
            result = self.check(images, value_range=(-1.0, 1.0), layout="BCHW", censored_range=(0.0, 1.0))
        elif isinstance(images, np.ndarray):
            result = self.check(images, value_range=(0.0, 1.0), layout="BHWC")
        else:
            raise TypeError(f"images must be a (B, 3, H, W) tensor or a (B, H, W, 3) numpy array, "
                            f"got {type(images).__name__}")
        return result.images, result.flagged


def _pair(detector: Any) -> tuple[Detector, Detector | None]:
    """(first, second) of what a checker can save: a detector, or a cascade or an ensemble of two."""
    if isinstance(detector, Detector):
        return detector, None
    if isinstance(detector, (Cascade, Ensemble)) and len(detector.members) == 2 and all(
            isinstance(m, Detector) for m in detector.members):
        return detector.members
    raise TypeError(f"a checker holds a detector, or a cascade or an ensemble of two detectors; got {detector!r}")


def _second_config(detector: Cascade | Ensemble, second: Detector) -> dict[str, Any]:
    """The saved description of a second opinion: its model and how it combines with the first."""
    cascade = isinstance(detector, Cascade)
    return {"model": second.model_id, "revision": second.revision, "combine": detector.rule,
            "band": list(detector.band) if cascade else None, "level": detector.level if cascade else None,
            "names": list(detector.names)}


def _region_settings(regions: RegionSettings | Mapping[str, Any] | bool | None) -> RegionSettings | None:
    if regions is None or regions is False:
        return None
    if regions is True:
        return RegionSettings()
    if isinstance(regions, Mapping):
        return RegionSettings.from_dict(regions)
    if isinstance(regions, RegionSettings):
        return regions
    raise TypeError(f"regions must be a RegionSettings, a dict of its settings, True, False or None; "
                    f"got {type(regions).__name__}")


def _saved_config(path: Any, class_name: str) -> dict | None:
    """The settings in a directory written by ``NSFWSafetyChecker.save_pretrained``, else None."""
    if not isinstance(path, (str, os.PathLike)) or not (Path(path) / "config.json").is_file():
        return None
    config = json.loads((Path(path) / "config.json").read_text())
    return config if config.get("_class_name") == class_name else None


# --- attach: zero-copy mode and pipelines without a safety_checker -------------------------------

def attach(pipe: Any, checker_or_filter: NSFWSafetyChecker | SafetyFilter | Detector | None = None,
           **kwargs) -> NSFWSafetyChecker:
    """Check every image ``pipe`` decodes, on the decoded tensor's device.

    * Pipelines with a ``safety_checker`` slot (the SD 1.x/2.x family): the checker becomes
      ``pipe.safety_checker`` and ``pipe.run_safety_checker`` hands it the VAE output directly,
      skipping the PIL conversion and the CLIP feature extractor. A pipeline without a feature
      extractor gets the checker's light one, so it still saves and reloads.
    * Pipelines without one (SDXL, SD3, Flux, and others that decode and then call
      ``pipe.image_processor.postprocess``): that call is wrapped; flagged images are censored
      before they are converted.
    * Video pipelines (those with a ``pipe.video_processor``: Wan, CogVideoX, LTX, HunyuanVideo,
      Mochi, AnimateDiff, SVD): ``postprocess_video`` is wrapped; every frame is checked, flagged
      frames (and ``checker.video_window`` frames either side) are censored, and
      ``last_result`` is a :class:`~nsfw_safety.video.VideoBatchResult` with per-frame flags.

    ``output_type="latent"`` is never checked: the first such call logs a warning and sets
    ``last_result`` to None. Call :func:`detach` to undo.

    Args:
        pipe: a diffusers pipeline.
        checker_or_filter: an :class:`NSFWSafetyChecker`, a :class:`SafetyFilter`, a
            :class:`Detector` or a cascade (``kwargs`` then go to :class:`SafetyFilter`, but for
            ``second_opinion``, ``band`` and ``combine``, which make a second opinion as
            :meth:`NSFWSafetyChecker.from_pretrained` does), or None (``kwargs`` go to
            :meth:`NSFWSafetyChecker.from_pretrained`; ``model=`` names the detector).
            Either way ``regions=`` turns region mode on: only the flagged parts of a flagged
            image are censored (the drop-in then returns the whole image in [0, 1], the rest of
            it as the pipeline would have denormalized it).
    Returns:
        The checker, also at ``pipe.nsfw_safety``; its ``last_result`` holds each call's scores.
    Raises:
        TypeError: the pipeline has none of the seams, or returns a 3-tuple from its safety
            checker (x4 upscaler, DeepFloyd IF) and has no ``image_processor`` either.
    """
    checker = _as_checker(checker_or_filter, kwargs)
    if "nsfw_safety" in vars(pipe):
        detach(pipe)
    state = {"checked": False, "warned": False}
    undo: list = []

    def follow(image: Any) -> None:
        if isinstance(image, torch.Tensor) and checker.device != image.device:
            checker.to(image.device)  # zero-copy: the checker goes to the images, not back

    if _has_two_tuple_checker(pipe):
        old_checker, old_extractor = pipe.safety_checker, pipe.feature_extractor

        def run_safety_checker(image, device, dtype):
            follow(image)
            out = checker(images=image)
            state["checked"] = True
            return out

        # register_modules, not setattr: a slot built as None stays (None, None) in the config
        # on setattr, and the checker would not be saved
        pipe.register_modules(safety_checker=checker, feature_extractor=old_extractor or checker.feature_extractor)
        undo.append(lambda: pipe.register_modules(safety_checker=old_checker, feature_extractor=old_extractor))
        _patch(pipe, "run_safety_checker", run_safety_checker, undo)
    elif isinstance(getattr(pipe, "video_processor", None), VideoProcessor):
        videos = pipe.video_processor
        postprocess_video_original = videos.postprocess_video

        def postprocess_video(video, output_type="np", **kw):
            if output_type == "latent" or not isinstance(video, torch.Tensor):
                return postprocess_video_original(video, output_type, **kw)
            follow(video)
            # (B, C, F, H, W) to [0, 1] exactly as the processor would, so unflagged frames come out unchanged
            unit = videos.denormalize(video) if videos.config.do_normalize else video
            result = checker.check_videos(unit, layout="BCFHW")
            state["checked"] = True
            kw["do_denormalize"] = [False] * video.shape[2]  # postprocess sees each video as F images
            return postprocess_video_original(result.frames, output_type, **kw)

        _patch(videos, "postprocess_video", postprocess_video, undo)
    elif isinstance(getattr(pipe, "image_processor", None), VaeImageProcessor):
        processor = pipe.image_processor
        postprocess_original = processor.postprocess

        def postprocess(image, output_type="pil", do_denormalize=None, **kw):
            if output_type == "latent" or not isinstance(image, torch.Tensor):
                return postprocess_original(image, output_type, do_denormalize, **kw)
            follow(image)
            # to [0, 1] exactly as the processor would, so unflagged images come out unchanged
            if do_denormalize is None:
                do_denormalize = [processor.config.do_normalize] * len(image)
            unit = torch.stack([processor.denormalize(x) if d else x for x, d in zip(image, do_denormalize)])
            result = checker.check(unit, value_range=(0.0, 1.0), layout="BCHW")
            state["checked"] = True
            return postprocess_original(result.images, output_type, [False] * len(image), **kw)

        _patch(processor, "postprocess", postprocess, undo)
    else:
        raise TypeError(f"cannot attach to {type(pipe).__name__}: {_unguardable(pipe)}")

    free_original = pipe.maybe_free_model_hooks

    def maybe_free_model_hooks():  # the pipelines call this at the end of every __call__
        free_original()
        if not state["checked"]:
            checker.last_result = None
            if not state["warned"]:
                state["warned"] = True
                log.warning("a %s call was not checked by nsfw-safety: output_type='latent' is never "
                            "checked (decode the latents and check the images yourself)", type(pipe).__name__)
        state["checked"] = False

    _patch(pipe, "maybe_free_model_hooks", maybe_free_model_hooks, undo)
    pipe.nsfw_safety = checker
    pipe._nsfw_safety_undo = undo
    return checker


def detach(pipe: Any) -> None:
    """Undo :func:`attach`: the pipeline's own methods and components come back."""
    if "nsfw_safety" not in vars(pipe):
        raise ValueError(f"{type(pipe).__name__} has no nsfw-safety checker attached")
    for step in reversed(pipe._nsfw_safety_undo):
        step()
    del pipe.nsfw_safety, pipe._nsfw_safety_undo


def _patch(obj: Any, name: str, value: Any, undo: list) -> None:
    """Set an instance attribute, and record how to put back what was there."""
    missing = object()
    before = vars(obj).get(name, missing)
    setattr(obj, name, value)
    undo.append(lambda: delattr(obj, name) if before is missing else setattr(obj, name, before))


def _as_checker(checker_or_filter: Any, kwargs: dict) -> NSFWSafetyChecker:
    if checker_or_filter is None:
        return NSFWSafetyChecker.from_pretrained(kwargs.pop("model", "eva"), **kwargs)
    if is_detector(checker_or_filter):
        detector, second = checker_or_filter, kwargs.pop("second_opinion", None)
        band, combine = kwargs.pop("band", None), kwargs.pop("combine", None)
        if second is not None:
            detector = combine_detectors(detector, second, band=band, combine=combine or "override",
                                         level=kwargs.get("level", DEFAULT_LEVEL),
                                         threshold=kwargs.get("threshold", DEFAULT_THRESHOLD))
        elif band is not None or combine is not None:
            raise ValueError("band and combine need a second_opinion model")
        if "regions" in kwargs:
            kwargs["regions"] = _region_settings(kwargs["regions"])
        return NSFWSafetyChecker(SafetyFilter(detector, **kwargs))
    if kwargs:
        raise TypeError(f"settings {sorted(kwargs)} cannot be combined with a ready "
                        f"{type(checker_or_filter).__name__}")
    if isinstance(checker_or_filter, NSFWSafetyChecker):
        return checker_or_filter
    if isinstance(checker_or_filter, SafetyFilter):
        return NSFWSafetyChecker(checker_or_filter)
    raise TypeError(f"checker_or_filter must be an NSFWSafetyChecker, SafetyFilter, Detector or None, "
                    f"got {type(checker_or_filter).__name__}")


def _unguardable(pipe: Any) -> str:
    """Why :func:`attach` finds no seam in ``pipe``."""
    seams = ("it has no safety_checker that returns (images, flags), no VideoProcessor at "
             "pipe.video_processor and no VaeImageProcessor at pipe.image_processor")
    processor = getattr(pipe, "image_processor", None)
    if processor is not None:
        return (f"{seams}; its image_processor is a {type(processor).__name__}, whose postprocess "
                f"cannot be relied on to receive the decoded images")
    decoder = next((n for n in ("movq", "vae", "vqvae") if isinstance(getattr(pipe, n, None), torch.nn.Module)), None)
    if decoder is not None:
        return (f"{seams}; it turns the output of pipe.{decoder} into images itself, inside __call__, so no "
                f"call sees the decoded images before they are returned: check the output with "
                f"SafetyFilter, or generate with output_type='pt' and check that")
    return seams


def _has_two_tuple_checker(pipe: Any) -> bool:
    """True for pipelines whose ``run_safety_checker(image, device, dtype)`` returns (images, flags)."""
    has_slot = "safety_checker" in getattr(pipe, "components", {})
    if not has_slot or not callable(getattr(pipe, "run_safety_checker", None)):
        return False
    # the x4 upscaler and DeepFloyd IF return (images, nsfw, watermark)
    return not any(c.__name__ == "StableDiffusionUpscalePipeline"
                   or c.__module__.startswith("diffusers.pipelines.deepfloyd_if") for c in type(pipe).__mro__)
