"""Segmentation: config, data (crops, splits), losses, the method components (BCP, PatchCL,
DRS, SVDA), validation/test, and the trainer that runs a segmentation method in the loop."""
