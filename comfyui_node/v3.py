"""The same nodes for ComfyUI's V3 API, pinned to one ``comfy_api`` version, with the same node ids.

ComfyUI advises pinning a versioned ``comfy_api`` (``latest`` may still change), so the classes
are written against :data:`API_VERSION`. They are generated from the one table,
:data:`.nodes.NODES`, as the classic ones are. Where that version cannot be imported (an older
ComfyUI, plain Python) this module still imports, with ``AVAILABLE = False`` and no
``comfy_entrypoint``; the package then registers the classic nodes (see ``comfyui_node/__init__.py``).
"""

from __future__ import annotations

import importlib

from . import nodes, schema

#: The ``comfy_api`` version the V3 classes are written against (its ``io`` and ``ComfyExtension``).
API_VERSION = "v0_0_2"

try:
    _api = importlib.import_module(f"comfy_api.{API_VERSION}")
except ImportError:  # ComfyUI without this version of the V3 API, or no ComfyUI at all
    _api = None

AVAILABLE = _api is not None

if AVAILABLE:
    io, ComfyExtension = _api.io, _api.ComfyExtension
    NODE_CLASSES = {node.node_id: schema.v3(io, node) for node in nodes.NODES}
    NSFWDetectorLoader = NODE_CLASSES["NSFWDetectorLoader"]
    NSFWSafetyFilter = NODE_CLASSES["NSFWSafetyFilter"]
    NSFWSafetySwitch = NODE_CLASSES["NSFWSafetySwitch"]

    class NSFWSafetyExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return list(NODE_CLASSES.values())

    async def comfy_entrypoint() -> NSFWSafetyExtension:
        return NSFWSafetyExtension()
