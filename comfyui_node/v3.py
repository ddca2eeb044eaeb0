"""The same nodes for ComfyUI's V3 API (``comfy_api.latest``), with the same node ids.

Where ``comfy_api`` cannot be imported (older ComfyUI, plain Python) this module still imports,
with ``AVAILABLE = False`` and no ``comfy_entrypoint``. ComfyUI never calls ``comfy_entrypoint``
of a module that also exports ``NODE_CLASS_MAPPINGS``, so the pack's root ``__init__.py``
exports this entry point instead of the V1 mappings only when asked to
(``NSFW_SAFETY_NODE_API=v3``). The execution is shared with the V1 nodes in :mod:`.nodes`.
"""

from __future__ import annotations

from nsfw_safety import NSFW_LEVELS
from nsfw_safety.models import DEFAULT_MODEL

from . import management, nodes

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # ComfyUI without the V3 API, or no ComfyUI at all
    ComfyExtension = io = None

AVAILABLE = io is not None

if AVAILABLE:
    DetectorSocket = io.Custom(nodes.DETECTOR)

    def _rule_inputs(action_tooltip: str) -> list:
        return [
            io.Image.Input("images"),
            DetectorSocket.Input("detector"),
            io.Combo.Input("level", options=list(NSFW_LEVELS), default="medium"),
            io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01),
            io.Combo.Input("action", options=list(nodes.ACTIONS), default="blur", tooltip=action_tooltip),
        ]

    class NSFWDetectorLoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="NSFWDetectorLoader", display_name="NSFW Detector Loader", category=nodes.CATEGORY,
                description=nodes.NSFWDetectorLoader.DESCRIPTION,
                inputs=[io.Combo.Input("model", options=management.model_choices(), default=DEFAULT_MODEL),
                        io.Combo.Input("dtype", options=list(management.DTYPES), default="auto")],
                outputs=[DetectorSocket.Output(display_name="detector")])

        @classmethod
        def execute(cls, model: str, dtype: str):
            return io.NodeOutput(management.load(model, dtype))

    class NSFWSafetyFilter(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="NSFWSafetyFilter", display_name="NSFW Safety Filter", category=nodes.CATEGORY,
                description=nodes.NSFWSafetyFilter.DESCRIPTION,
                inputs=_rule_inputs("what to do with flagged images; none only flags them"),
                outputs=[io.Image.Output(display_name="images"), io.Boolean.Output(display_name="nsfw"),
                         io.Float.Output(display_name="max_score"), io.String.Output(display_name="report"),
                         io.Mask.Output(display_name="mask")])

        @classmethod
        def execute(cls, images, detector, level: str, threshold: float, action: str):
            return io.NodeOutput(*nodes.NSFWSafetyFilter().filter(images, detector, level, threshold, action))

    class NSFWSafetySwitch(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="NSFWSafetySwitch", display_name="NSFW Safety Switch", category=nodes.CATEGORY,
                description=nodes.NSFWSafetySwitch.DESCRIPTION,
                inputs=_rule_inputs("applied to the flagged output; none routes them unchanged"),
                outputs=[io.Image.Output(display_name="safe"), io.Image.Output(display_name="flagged"),
                         io.Boolean.Output(display_name="nsfw"), io.String.Output(display_name="report")])

        @classmethod
        def execute(cls, images, detector, level: str, threshold: float, action: str):
            return io.NodeOutput(*nodes.NSFWSafetySwitch().switch(images, detector, level, threshold, action))

    class NSFWSafetyExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return [NSFWDetectorLoader, NSFWSafetyFilter, NSFWSafetySwitch]

    async def comfy_entrypoint() -> NSFWSafetyExtension:
        return NSFWSafetyExtension()
