"""ComfyUI entry point: this repository, cloned into ``ComfyUI/custom_nodes/``, is a node pack.

ComfyUI imports a pack folder through its ``__init__.py``, as a package named after the folder,
and reads ``NODE_CLASS_MAPPINGS`` from it. It installs nothing and puts nothing on ``sys.path``:
``requirements.txt`` installs only the dependencies, so when ``nsfw_safety`` is not installed
this folder is appended to ``sys.path`` (appended, so an installed copy and ComfyUI's own
modules always win).

The classic (V1) nodes are exported because every ComfyUI version loads them, and a module
that exports them is never asked for the V3 ``comfy_entrypoint``. Set
``NSFW_SAFETY_NODE_API=v3`` to export the V3 entry point (``comfyui_node/v3.py``, same node
ids, so workflows keep working) instead, where ComfyUI provides ``comfy_api``.
"""

import importlib
import importlib.util
import logging
import os
import sys

if importlib.util.find_spec("nsfw_safety") is None:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

# As a pack, comfyui_node is this package's subpackage. Imported as a plain module (pytest does
# that in a clone whose folder name, such as nsfw-safety, is not a Python name), this folder is
# on sys.path and comfyui_node is a top-level package beside it.
_nodes = importlib.import_module(f"{__package__}.comfyui_node" if __package__ else "comfyui_node")
_v3 = importlib.import_module(f"{_nodes.__name__}.v3")

_API = os.environ.get("NSFW_SAFETY_NODE_API", "v1").strip().lower()

if _API == "v3" and _v3.AVAILABLE:
    comfy_entrypoint = _v3.comfy_entrypoint
    __all__ = ["comfy_entrypoint"]
else:
    if _API == "v3":
        logging.getLogger(__name__).warning(
            "NSFW_SAFETY_NODE_API=v3, but this ComfyUI has no comfy_api: using the classic nodes")
    NODE_CLASS_MAPPINGS = _nodes.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _nodes.NODE_DISPLAY_NAME_MAPPINGS
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
