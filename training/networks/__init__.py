"""Networks: the 3D VNet (and A&D's Diff-VNet), the 2D UNet, the FPN nodule detector, and the
builders training and export share (:mod:`medssl.training.networks.segmenter`)."""
