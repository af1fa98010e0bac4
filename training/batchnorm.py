"""BatchNorm running statistics: leave them alone, or re-estimate them on inference windows.

* :func:`batch_statistics_only`: forward passes that normalise with the batch's statistics
  (train mode) but leave ``running_mean``, ``running_var`` and ``num_batches_tracked``
  exactly as they were. MixMatch's official code guesses labels this way: its guessing passes
  run with ``training=True``, and the BatchNorm update ops they create are excluded
  (``skip_ops`` / ``post_ops`` in google-research/mixmatch ``mixmatch.py``), so only the
  training forward pass moves the statistics.
* :func:`reestimate_batchnorm`: replace the running statistics by their cumulative average
  (``momentum=None``) over a fixed set of windows drawn the way inference draws them
  (:func:`inference_windows`: sliding windows of :func:`medssl.pipeline.windows.plan_windows`),
  so validation, test and the saved/exported weights normalise with statistics of the
  distribution the model is applied to, not of the training crops (nodule-centred, mixed,
  object-mixed). The pass itself is PyTorch's ``torch.optim.swa_utils.update_bn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from medssl.pipeline.windows import extract_window, plan_windows

__all__ = ["batch_statistics_only", "inference_windows", "reestimate_batchnorm"]


def _norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``module`` keep their running statistics.

    The layers still normalise as their mode says (train mode: the batch's statistics), with
    or without gradients. Inside the block each layer's ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` are stand-in copies the forward passes may update; on exit the
    original tensors are put back untouched (also after an exception, and also where a pass
    produced non-finite statistics). The originals are swapped, never written, so an autograd
    graph built inside the block stays valid (batch norm saves these tensors for backward).
    """
    saved = []
    for m in _norms(module):
        originals = {
            name: getattr(m, name)
            for name in ("running_mean", "running_var", "num_batches_tracked")
            if getattr(m, name) is not None
        }
        for name, tensor in originals.items():
            setattr(m, name, tensor.detach().clone())
        saved.append((m, originals))
    try:
        yield
    finally:
        for m, originals in saved:
            for name, tensor in originals.items():
                setattr(m, name, tensor)


def inference_windows(
    shapes: Sequence[Sequence[int]],
    *,
    window: int,
    overlap: float,
    count: int,
    seed: int,
    keep: Callable[[int, tuple[int, int, int]], bool] | None = None,
) -> list[tuple[int, tuple[int, int, int]]]:
    """A fixed, deterministic choice of sliding windows over several scans.

    Args:
        shapes: each scan's array shape ``(Z, Y, X)``, voxels of the model grid.
        window: the inference window edge, voxels.
        overlap: the inference overlap (as :func:`~medssl.pipeline.windows.plan_windows`).
        count: windows wanted (>= 1). Where the scans have fewer windows, all are used.
        seed: seed of the choice.
        keep: optional ``keep(scan_index, start)``: the windows inference would run (e.g.
            those touching the lung mask); others are never chosen.

    Returns:
        ``(scan_index, start (z, y, x))`` pairs, at most ``count``, sorted by scan then
        start (the same list for the same arguments).
    """
    if count < 1 or window < 1:
        raise ValueError(f"need count >= 1 and window >= 1, got count={count}, window={window}")
    candidates = [
        (i, s)
        for i, shape in enumerate(shapes)
        for s in plan_windows(shape, (window,) * 3, overlap)
        if keep is None or keep(i, s)
    ]
    if len(candidates) <= count:
        return candidates
    chosen = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return [candidates[j] for j in sorted(chosen.tolist())]


def reestimate_batchnorm(
    model: nn.Module,
    arrays: Sequence[np.ndarray],
    windows: Sequence[tuple[int, tuple[int, int, int]]],
    *,
    window: int,
    pad_value: float,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> int:
    """Set every BatchNorm layer's running statistics to the cumulative average over ``windows``.

    The statistics are reset, then each batch of ``batch_size`` windows runs through the
    model in train mode without gradients with ``momentum=None``
    (``torch.optim.swa_utils.update_bn``): ``running_mean`` becomes the mean of the batch
    means (the windows' mean when all batches are full), ``running_var`` the mean of the
    batches' unbiased variances. The model's train/eval mode and momenta are restored.

    Args:
        model: the network (unwrapped); called as ``model(x)`` with ``x (B, 1, W, W, W)``.
        arrays: the scans' preprocessed arrays ``(Z, Y, X)`` (model intensities).
        windows: ``(scan_index, start)`` from :func:`inference_windows`.
        window: window edge, voxels.
        pad_value: intensity outside a scan (as inference pads).
        batch_size: windows per forward pass (the last batch may be smaller).
        device: where the model is.

    Returns:
        The number of windows used (0 leaves the statistics untouched).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not windows:
        return 0
    dev = torch.device(device)

    def batches() -> Iterator[torch.Tensor]:
        for first in range(0, len(windows), batch_size):
            chunk = windows[first : first + batch_size]
            patches = np.stack(
                [extract_window(arrays[i], s, (window,) * 3, pad_value) for i, s in chunk]
            )
            yield torch.from_numpy(np.ascontiguousarray(patches[:, None], dtype=np.float32))

    torch.optim.swa_utils.update_bn(batches(), model, device=dev)
    return len(windows)
