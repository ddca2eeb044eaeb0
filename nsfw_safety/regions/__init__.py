"""Region censoring: find body parts (or faces) with NudeNet's detector, censor only those.

    from nsfw_safety.regions import RegionDetector, region_mask, censor_regions

    found = RegionDetector()(images).select("exposed", threshold=0.4, expand=0.2)
    mask = region_mask(found, shape="ellipse", feather=0.05)     # (N, H, W) in [0, 1]
    out = censor_regions(images, mask, "blur", regions=found)

    # or in the filter: the classifier decides whether, the regions where
    guard = SafetyFilter(load_detector("eva"), regions=RegionSettings(expand=0.2, shape="ellipse"))

Needs the ``regions`` extra (nudenet's model and onnxruntime) for the detector only; the mask
and the censor are plain torch.
"""

from .detector import (CLASS_SETS, DEFAULT_CLASSES, MIN_SCORE, NMS_IOU, NUDENET_LABELS, Region,
                       RegionDetector, Regions)
from .mask import SHAPES, censor_regions, region_mask
from .settings import RegionSettings, locate

__all__ = ["CLASS_SETS", "DEFAULT_CLASSES", "MIN_SCORE", "NMS_IOU", "NUDENET_LABELS", "Region",
           "RegionDetector", "RegionSettings", "Regions", "SHAPES", "censor_regions", "locate", "region_mask"]
