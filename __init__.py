"""ComfyUI entry point: this repository, cloned into ``ComfyUI/custom_nodes/``, is a node pack.

ComfyUI imports a pack folder through its ``__init__.py``, as a package named after the folder,
and reads its nodes from it. It installs nothing and puts nothing on ``sys.path``:
``requirements.txt`` installs only the dependencies, so when ``nsfw_safety`` is not installed
this folder is appended to ``sys.path`` (appended, so an installed copy and ComfyUI's own
modules always win).

It exports one node API, chosen at import (ComfyUI never calls ``comfy_entrypoint`` on a module
that also exports ``NODE_CLASS_MAPPINGS``): the V3 ``comfy_entrypoint`` where ComfyUI provides
the pinned ``comfy_api`` version, the classic ``NODE_CLASS_MAPPINGS`` elsewhere. Same node ids
either way; ``NSFW_SAFETY_NODE_API=v1`` forces the classic nodes (see ``comfyui_node/__init__.py``).
"""

import importlib
import importlib.util
import os
import sys

if importlib.util.find_spec("nsfw_safety") is None:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

# As a pack, comfyui_node is this package's subpackage. Imported as a plain module (pytest does
# that in a clone whose folder name, such as nsfw-safety, is not a Python name), this folder is
# on sys.path and comfyui_node is a top-level package beside it.
_nodes = importlib.import_module(f"{__package__}.comfyui_node" if __package__ else "comfyui_node")
__all__ = list(_nodes.__all__)  # comfy_entrypoint, or the V1 mappings: never both
globals().update({name: getattr(_nodes, name) for name in __all__})
