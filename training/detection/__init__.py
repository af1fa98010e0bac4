"""Nodule detection: config, LUNA16 scans and patches, augmentation, losses, FocalMix's
components, hard-negative mining, evaluation, operating points, and the trainer that runs a
detection method in the loop."""
