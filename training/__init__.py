"""Training: networks, losses, semi-supervised methods and trainers (imports torch).

The FocalMix issue adds the detector and its trainer; the A&D issue the
segmentation trainer. Until then this package holds nothing.
"""
