"""A Modular Diffusers block that checks and censors the decoded images.

    from diffusers.modular_pipelines import FluxAutoBlocks
    from nsfw_safety.diffusers import NSFWSafetyChecker
    from nsfw_safety.modular import insert_after_decode

    blocks = insert_after_decode(FluxAutoBlocks())          # ... decode -> nsfw_safety
    pipe = blocks.init_pipeline("black-forest-labs/FLUX.1-dev")
    pipe.load_components(torch_dtype=torch.bfloat16)
    pipe.update_components(safety_checker=NSFWSafetyChecker.from_pretrained("eva"))
    state = pipe(prompt="...", nsfw_action="pixelate")      # settings are block inputs
    state.get("images"), state.get("nsfw_content_detected"), state.get("nsfw_result")

The block is a thin adapter: the pipeline component ``safety_checker`` (an
:class:`~nsfw_safety.diffusers.NSFWSafetyChecker`) runs the one :class:`SafetyFilter` path on
the images the decode step made, in whatever output type it made them.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import PIL.Image
import torch
from diffusers.modular_pipelines import InputParam, ModularPipelineBlocks, OutputParam, PipelineState
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec

from .diffusers import NSFWSafetyChecker
from .filter import FilterResult, SafetyFilter

log = logging.getLogger(__name__)

__all__ = ["NSFWSafetyBlock", "insert_after_decode"]

#: The block inputs that override the checker's own settings for one call (None: the checker's).
SETTINGS = ("level", "threshold", "thresholds", "action")


class NSFWSafetyBlock(ModularPipelineBlocks):
    """Checks the decoded ``images`` and censors the flagged ones.

    Components:
        safety_checker: an :class:`~nsfw_safety.diffusers.NSFWSafetyChecker`; set it with
            ``pipe.update_components(safety_checker=...)``. Without one the block raises rather
            than pass images unchecked.
    Inputs:
        images: what the decode step made: a list of PIL images, a (B, H, W, 3) float array or a
            (B, 3, H, W) float tensor in [0, 1].
        output_type: ``"latent"`` images are latents, never checked (a warning is logged once).
        nsfw_level, nsfw_threshold, nsfw_thresholds, nsfw_action: this call's rule and action
            (see :class:`SafetyFilter`); None keeps the checker's.
    Outputs:
        images: the same kind, flagged images censored, the others untouched.
        nsfw_content_detected: one bool per image (None for latents).
        nsfw_result: the :class:`FilterResult` (scores, reasons, actions), None for latents.
    """

    model_name = None  # fits every model family's blocks

    def __init__(self):
        super().__init__()
        self._warned_latent = False

    @property
    def description(self) -> str:
        return "Checks the decoded images with nsfw-safety and censors the flagged ones (insert after 'decode')"

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("safety_checker", NSFWSafetyChecker, description="nsfw-safety's checker",
                              default_creation_method="from_pretrained")]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("images", required=True, description="the decoded images, in the output type"),
            InputParam("output_type", default="pil"),
            InputParam("nsfw_level", type_hint=str, description="flag at this level or above: low, medium, high"),
            InputParam("nsfw_threshold", type_hint=float, description="flag when the level's score reaches it"),
            InputParam("nsfw_thresholds", type_hint=dict, description="per-level thresholds instead"),
            InputParam("nsfw_action", type_hint=str, description="blur, pixelate, black, placeholder or none"),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam("images", description="the images with the flagged ones censored"),
            OutputParam("nsfw_content_detected", type_hint=list, description="one bool per image"),
            OutputParam("nsfw_result", type_hint=FilterResult, description="scores, flags, reasons and actions"),
        ]

    @torch.no_grad()
    def __call__(self, components: Any, state: PipelineState) -> tuple[Any, PipelineState]:
        block = self.get_block_state(state)
        checker = getattr(components, "safety_checker", None)
        if not isinstance(checker, NSFWSafetyChecker):
            raise ValueError(f"the nsfw_safety block needs an NSFWSafetyChecker as the pipeline's safety_checker, got "
                             f"{type(checker).__name__}: pipe.update_components(safety_checker="
                             f"NSFWSafetyChecker.from_pretrained('eva'))")
        if block.output_type == "latent":
            if not self._warned_latent:
                self._warned_latent = True
                log.warning("output_type='latent' is never checked by nsfw-safety: decode the latents and check "
                            "the images yourself")
            checker.last_result = None
            block.nsfw_content_detected = block.nsfw_result = None
        else:
            overrides = {name: getattr(block, f"nsfw_{name}") for name in SETTINGS}
            guard = with_settings(checker, {k: v for k, v in overrides.items() if v is not None})
            images = block.images
            if isinstance(images, torch.Tensor) and images.device != checker.device:
                checker.to(images.device)  # the checker goes to the images, not back
            result = checker.check(images, value_range=(0.0, 1.0), layout=_layout(images), guard=guard)
            block.images = result.images
            block.nsfw_content_detected, block.nsfw_result = result.flagged, result
        self.set_block_state(state, block)
        return components, state


def with_settings(checker: NSFWSafetyChecker, overrides: Mapping[str, Any]) -> SafetyFilter | None:
    """A filter over the checker's detector with ``overrides`` replacing its settings; None without any.

    ``level``/``threshold`` replace the checker's own and drop its per-level ``thresholds``;
    ``thresholds`` replaces the whole rule.
    """
    if not overrides:
        return None
    config = checker.config
    settings = dict(level=config.level, threshold=config.threshold, thresholds=config.thresholds,
                    action=config.action, on_error=config.on_error, blur_strength=config.blur_strength,
                    block=config.block, color=tuple(config.color),
                    placeholder=checker.guard.options.get("placeholder"))
    if "level" in overrides or "threshold" in overrides:
        settings["thresholds"] = None
    settings.update(overrides)
    detector = checker.guard.detector
    return SafetyFilter(detector, settings.pop("level"), settings.pop("threshold"), **settings)


def insert_after_decode(blocks: ModularPipelineBlocks, block: NSFWSafetyBlock | None = None,
                        name: str = "nsfw_safety") -> ModularPipelineBlocks:
    """Insert ``block`` (default: a new :class:`NSFWSafetyBlock`) right after ``blocks``' "decode" step.

    Returns ``blocks``, changed in place. Raises ``ValueError`` when it has no "decode" step.
    """
    steps = list(blocks.sub_blocks)
    if "decode" not in steps:
        raise ValueError(f"{type(blocks).__name__} has no 'decode' step to guard (its steps: {steps})")
    blocks.sub_blocks.insert(name, block if block is not None else NSFWSafetyBlock(), steps.index("decode") + 1)
    return blocks


def _layout(images: Any) -> str | None:
    """diffusers' layouts: "pt" is (B, 3, H, W), "np" is (B, H, W, 3); PIL lists need none."""
    if isinstance(images, torch.Tensor):
        return "BCHW"
    if isinstance(images, np.ndarray):
        return "BHWC"
    if isinstance(images, (list, tuple)) and all(isinstance(im, PIL.Image.Image) for im in images):
        return None
    raise TypeError(f"the decoded images must be PIL images, a numpy array or a tensor, got {type(images).__name__}")
