"""ComfyUI nodes for nsfw-safety: a detector loader, a safety filter and a safety switch.

``NODE_CLASS_MAPPINGS`` are the classic (V1) nodes, which every ComfyUI version loads; the V3
versions of the same nodes are in :mod:`comfyui_node.v3`.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
