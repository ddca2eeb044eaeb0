"""Pictures on which NudeNet's detector finds something, made from images scikit-image ships.

Nobody here drew or photographed them, and none shows a person unclothed: the region tests
need the detector to fire, and it fires on these.

* ``wheel_scene()``: scikit-image's colour wheel on a gray 600 x 800 canvas. The detector takes
  the wheel for ``BUTTOCKS_EXPOSED`` (0.58, box about (318, 114, 664, 443)), a false positive
  that gives a real region of the default "exposed" classes in part of the picture.
* ``astronaut()``: the astronaut photograph, with one face (``FACE_FEMALE`` 0.72, box about
  (173, 82, 276, 181)) and no "exposed" region: privacy mode, and the "nothing found" case.
"""

from __future__ import annotations

import numpy as np
import skimage.data

WHEEL_BOX = (317.6, 114.4, 663.9, 443.2)
FACE_BOX = (173.0, 82.5, 275.5, 180.8)


def wheel_scene() -> np.ndarray:
    """(600, 800, 3) uint8."""
    canvas = np.full((600, 800, 3), 128, np.uint8)
    canvas[100:470, 300:671] = skimage.data.colorwheel()[..., :3]
    return canvas


def astronaut() -> np.ndarray:
    """(512, 512, 3) uint8."""
    return np.ascontiguousarray(skimage.data.astronaut())
