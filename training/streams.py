"""Endless, resumable batch streams for the training loop.

Every trainer dataset here makes sample ``i`` a pure function of ``(seed, i)`` (and of what the
dataset holds), so a stream is just a running index: step ``s`` of a run with batch size ``B``
reads samples ``s·B .. s·B + B - 1``, strided over DDP ranks. A resumed run starts the stream at
its checkpoint's step and continues the same samples, with any number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medssl.training.distributed import DistEnv
from medssl.training.seed import worker_init_fn

__all__ = ["IndexStream", "batch_stream", "to_device"]


class IndexStream(Sampler[int]):
    """Sample indices ``start, start + 1, ...`` (``count`` of them), strided over DDP ranks."""

    def __init__(self, start: int, count: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.count, self.rank, self.world_size = start, count, rank, world_size

    def __iter__(self) -> Iterator[int]:
        for i in range(self.count):
            yield (self.start + i) * self.world_size + self.rank

    def __len__(self) -> int:
        return self.count


def batch_stream(
    dataset: Dataset[Any], batch: int, start: int, count: int, workers: int, env: DistEnv
) -> Iterator[Any]:
    """Batches ``start .. start + count - 1`` of ``dataset`` (``batch`` samples each) for this
    rank, loaded by ``workers`` DataLoader processes (0: in this process)."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=IndexStream(start * batch, count * batch, env.rank, env.world_size),
        num_workers=workers,
        worker_init_fn=worker_init_fn,
        persistent_workers=workers > 0,
        pin_memory=env.device.type == "cuda",
        drop_last=True,
        # iter() draws the workers' base seed from this generator, not from the global RNG
        # that a resume restored (samples depend only on their index, so a fixed seed costs
        # nothing), so a resumed run continues the same stream.
        generator=torch.Generator().manual_seed(0),
    )
    return iter(loader)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` on ``device`` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
