"""Detection geometry shared by training, evaluation, scoring and serving (torch-free).

* :mod:`~medssl.detection.anchors`: the cubic anchor grid of a 3D FPN, cube IoU,
  anchor assignment and box encoding.
* :mod:`~medssl.detection.cube_group`: the 48 flips and 90-degree rotations of a cube,
  with exact inverses, for arrays and voxel coordinates.
* :mod:`~medssl.detection.nms`: 3D non-maximum suppression of cubes.
"""

from medssl.detection.anchors import (
    AnchorGrid,
    AnchorSpec,
    AnchorTargets,
    assign_anchors,
    cube_iou,
    encode_boxes,
)
from medssl.detection.cube_group import CUBE_GROUP, CubeSymmetry
from medssl.detection.nms import nms_3d

__all__ = [
    "CUBE_GROUP",
    "AnchorGrid",
    "AnchorSpec",
    "AnchorTargets",
    "CubeSymmetry",
    "assign_anchors",
    "cube_iou",
    "encode_boxes",
    "nms_3d",
]
