"""Synthetic CT with ground truth: the only data these machines have."""
