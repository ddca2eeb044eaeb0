"""ComfyUI nodes for nsfw-safety: a detector loader, a safety filter and a safety switch.

Each node is described once in :data:`.nodes.NODES`. ``NODE_CLASS_MAPPINGS`` are the classic
(V1) classes generated from it, which every ComfyUI version loads; :mod:`comfyui_node.v3`
generates the V3 classes of the same nodes from the same table.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
