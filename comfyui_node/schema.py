"""A node described once, and its two ComfyUI forms: the classic (V1) class and the V3 class.

A :class:`Node` says what ComfyUI shows (id, name, category, inputs, outputs, tooltips) and
which function runs it. :func:`classic` and :func:`v3` turn it into the class each API expects,
so the two APIs cannot drift apart. Combo choices are functions, called whenever ComfyUI asks
for the schema: it re-validates them at every prompt, and a model folder may appear meanwhile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

COMBO = "COMBO"


@dataclass(frozen=True)
class Input:
    """One input socket or widget.

    Attributes:
        name: the input's id, also the keyword its value is passed as.
        type: a ComfyUI type (``"IMAGE"``, ``"FLOAT"``, ...), :data:`COMBO` for a list of
            choices, or a type of the pack's own (``"NSFW_DETECTOR"``).
        choices: for a combo, the function that lists them.
        optional: an input the node runs without (V1's ``"optional"`` inputs, V3's
            ``optional=True``), e.g. a widget a saved workflow may lack; its function then gets
            its keyword default.
    """

    name: str
    type: str
    tooltip: str | None = None
    default: Any = None
    choices: Callable[[], Sequence[str]] | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    optional: bool = False

    def options(self) -> dict[str, Any]:
        """The widget options that are set (default, min, max, step, tooltip)."""
        given = dict(default=self.default, min=self.min, max=self.max, step=self.step, tooltip=self.tooltip)
        return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True)
class Output:
    type: str
    name: str
    tooltip: str | None = None


@dataclass(frozen=True)
class Node:
    """A node: what ComfyUI shows, and ``run(**inputs) -> tuple`` of one value per output.

    ``function`` names the classic class's method that calls ``run`` (V1's ``FUNCTION``).
    """

    node_id: str
    display_name: str
    category: str
    description: str
    function: str
    run: Callable[..., tuple]
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]


def classic(node: Node) -> type:
    """The classic (V1) node class: ``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION`` and the rest."""

    def input_types(cls) -> dict:
        spec = {"required": {}, "optional": {}}
        for i in node.inputs:
            kind = list(i.choices()) if i.type == COMBO else i.type
            spec["optional" if i.optional else "required"][i.name] = (kind, i.options()) if i.options() else (kind,)
        return spec if spec["optional"] else {"required": spec["required"]}

    def run(self, *args, **inputs) -> tuple:
        return node.run(*args, **inputs)

    run.__name__ = run.__qualname__ = node.function
    run.__doc__ = node.run.__doc__
    return type(node.node_id, (), {
        "__doc__": node.description, "__module__": node.run.__module__, "NODE": node,
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(o.type for o in node.outputs),
        "RETURN_NAMES": tuple(o.name for o in node.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip or "" for o in node.outputs),
        "FUNCTION": node.function, node.function: run,
        "CATEGORY": node.category, "DESCRIPTION": node.description,
    })


def v3(io: ModuleType, node: Node) -> type:
    """The V3 node class (an ``io.ComfyNode``) for the ``io`` module of a ``comfy_api`` version."""

    def define_schema(cls):
        inputs = []
        for i in node.inputs:
            extra = {"options": list(i.choices())} if i.type == COMBO else {}
            if i.optional:
                extra["optional"] = True
            inputs.append(_socket(io, i.type).Input(i.name, **extra, **i.options()))
        outputs = [_socket(io, o.type).Output(display_name=o.name, tooltip=o.tooltip) for o in node.outputs]
        return io.Schema(node_id=node.node_id, display_name=node.display_name, category=node.category,
                         description=node.description, inputs=inputs, outputs=outputs)

    def execute(cls, **inputs):
        return io.NodeOutput(*node.run(**inputs))

    return type(node.node_id, (io.ComfyNode,), {
        "__doc__": node.description, "__module__": node.run.__module__, "NODE": node,
        "define_schema": classmethod(define_schema), "execute": classmethod(execute),
    })


@functools.lru_cache(maxsize=None)
def _socket(io: ModuleType, kind: str) -> type:
    """The ``io`` class of a type: ComfyUI's own (``"IMAGE"`` -> ``io.Image``), else ``io.Custom(kind)``."""
    own = getattr(io, kind.title(), None)
    return own if getattr(own, "io_type", None) == kind else io.Custom(kind)
