"""Seeding: one call for the main process, one hook for DataLoader workers."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["seed_everything", "worker_init_fn"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed :mod:`random`, numpy's global RNG and torch (CPU and every GPU) with ``seed``.

    Args:
        seed: an int in ``[0, 2**32)`` (numpy's limit).
        deterministic: also make torch pick deterministic kernels
            (``torch.use_deterministic_algorithms(True)``, cuDNN deterministic, no cuDNN
            autotuning, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``). Slower; an op without a
            deterministic implementation then raises. ``False`` switches these back off.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses (workers started by spawn)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def worker_init_fn(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: seed :mod:`random` and numpy from torch's worker seed.

    torch gives each worker the seed ``base_seed + worker_id`` (``base_seed`` drawn from the
    main process's torch RNG each epoch). torch >= 1.9 also seeds numpy and :mod:`random` in
    workers by itself, with its own derivation; this hook makes the rule explicit and ours:
    ``np.random.seed(seed % 2**32)`` and ``random.seed(seed)`` with ``seed`` = torch's worker
    seed, so augmentations differ across workers and epochs, repeat under
    :func:`seed_everything`, and a worker's draws can be reproduced from its seed alone.
    """
    info = torch.utils.data.get_worker_info()
    seed = info.seed if info is not None else torch.initial_seed() + worker_id
    np.random.seed(seed % 2**32)
    random.seed(seed)
