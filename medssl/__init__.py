"""medssl: semi-supervised 3D CT models, from unlabeled archives to DICOM results.

This top-level package is the torch-free core: geometry, volume I/O, dataset
layouts, synthetic data. Training (``medssl.training``) is the only part that
imports torch.
"""

from medssl.errors import MedsslError
from medssl.finding import Finding
from medssl.volume import Volume, affine_from_geometry

__version__ = "0.1.0"

__all__ = ["Finding", "MedsslError", "Volume", "__version__", "affine_from_geometry"]
