"""The same nodes for ComfyUI's V3 API (``comfy_api.latest``), with the same node ids.

The classes are generated from the one table, :data:`.nodes.NODES`, as the classic ones are.
Where ``comfy_api`` cannot be imported (older ComfyUI, plain Python) this module still imports,
with ``AVAILABLE = False`` and no ``comfy_entrypoint``. ComfyUI never calls ``comfy_entrypoint``
of a module that also exports ``NODE_CLASS_MAPPINGS``, so the pack's root ``__init__.py``
exports this entry point instead of the V1 mappings only when asked to
(``NSFW_SAFETY_NODE_API=v3``).
"""

from __future__ import annotations

from . import nodes, schema

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # ComfyUI without the V3 API, or no ComfyUI at all
    ComfyExtension = io = None

AVAILABLE = io is not None

if AVAILABLE:
    NODE_CLASSES = {node.node_id: schema.v3(io, node) for node in nodes.NODES}
    NSFWDetectorLoader = NODE_CLASSES["NSFWDetectorLoader"]
    NSFWSafetyFilter = NODE_CLASSES["NSFWSafetyFilter"]
    NSFWSafetySwitch = NODE_CLASSES["NSFWSafetySwitch"]

    class NSFWSafetyExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODE_CLASSES.values())

    async def comfy_entrypoint() -> NSFWSafetyExtension:
        return NSFWSafetyExtension()
