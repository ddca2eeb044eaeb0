"""ComfyUI nodes for nsfw-safety: a detector loader, a safety filter and a safety switch.

Each node is described once in :data:`.nodes.NODES`, and both of ComfyUI's node APIs are
generated from it: the classic (V1) classes (:data:`.nodes.NODE_CLASS_MAPPINGS`) and the V3
classes (:mod:`.v3`), with the same node ids, so saved workflows load with either.

ComfyUI never calls ``comfy_entrypoint`` on a module that also exports ``NODE_CLASS_MAPPINGS``,
so the API is chosen here, at import, and only one is exported:

* V3 first: where ComfyUI provides the pinned ``comfy_api`` version (:data:`.v3.API_VERSION`),
  only ``comfy_entrypoint``;
* else (an older ComfyUI, plain Python) ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``.

``NSFW_SAFETY_NODE_API=v1`` forces the classic nodes; ``v3`` asks for V3 and warns when it is missing.
"""

import logging
import os

from . import nodes, v3

CHOICES = ("auto", "v1", "v3")


def node_api() -> str:
    """``"v3"`` or ``"v1"``: the node API this ComfyUI gets."""
    wanted = os.environ.get("NSFW_SAFETY_NODE_API", "auto").strip().lower() or "auto"
    log = logging.getLogger(__name__)
    if wanted not in CHOICES:
        log.warning("NSFW_SAFETY_NODE_API=%r is not one of %s: choosing automatically", wanted, CHOICES)
        wanted = "auto"
    if wanted == "v1":
        return "v1"
    if v3.AVAILABLE:
        return "v3"
    if wanted == "v3":
        log.warning("NSFW_SAFETY_NODE_API=v3, but this ComfyUI has no comfy_api.%s: using the classic nodes",
                    v3.API_VERSION)
    return "v1"


API = node_api()

if API == "v3":
    comfy_entrypoint = v3.comfy_entrypoint
    __all__ = ["comfy_entrypoint"]
else:
    NODE_CLASS_MAPPINGS = nodes.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = nodes.NODE_DISPLAY_NAME_MAPPINGS
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
