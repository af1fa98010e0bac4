"""Data-parallel training across processes (``torchrun``), and the same code on one process.

Launch with ``torchrun --nproc_per_node N -m medssl...``: torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them. Without them (a plain ``python`` run) it returns a one-process :class:`DistEnv`
and starts no process group, and every helper here degrades to a no-op.

Data sharding: :func:`shard_indices` rather than ``DistributedSampler``, because medssl's
trainers draw from several index streams (labeled and unlabeled scans at a fixed ratio) and
need one plain list per stream. Like ``DistributedSampler`` it shuffles identically on every
rank (from ``seed`` and ``epoch``), pads to a multiple of the world size by repeating the
head, and gives each rank the same count, so every rank runs the same number of steps and
DDP's gradient all-reduce never waits on a rank that ran out of data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistEnv",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "init_distributed",
    "is_main",
    "shard_indices",
    "unwrap",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a data-parallel run.

    Attributes:
        rank: global process index, ``0 .. world_size - 1``; rank 0 logs and saves.
        local_rank: process index on this machine; picks the GPU ``cuda:local_rank``.
        world_size: number of processes; 1 without torchrun.
        device: the device this process computes on.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group connects more than one process."""
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def init_distributed(prefer_cuda: bool = True) -> DistEnv:
    """Join the process group torchrun describes in the environment, or run alone.

    Args:
        prefer_cuda: compute on ``cuda:LOCAL_RANK`` (backend NCCL) when CUDA is available;
            ``False`` forces CPU and the gloo backend.

    Returns:
        The :class:`DistEnv` of this process. With ``WORLD_SIZE`` unset or 1 no process group
        is started.

    Raises:
        ValueError: the torchrun variables are inconsistent or ``MASTER_ADDR``/``MASTER_PORT``
            is missing; the message names the variable.
    """
    use_cuda = prefer_cuda and torch.cuda.is_available()
    world_size = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK")
    local_rank = rank if local_rank is None else local_rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    if world_size == 1:
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return DistEnv(
            rank=0, local_rank=local_rank if use_cuda else 0, world_size=1, device=device
        )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(
                f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun "
                "(python -m torch.distributed.run --nproc_per_node N ...)"
            )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_main() -> bool:
    """True on rank 0, and in a process without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks, as a new tensor (the input is left unchanged).

    Every rank must call it with a tensor of the same shape and dtype (floating point).
    Without a process group it returns a copy.
    """
    out = tensor.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (MoCo's
    ``concat_all_gather``), the same result on every rank; the first dimension may differ from
    rank to rank (padded for the collective, trimmed after). No gradient flows through it.
    Without a process group it returns ``tensor`` detached.
    """
    tensor = tensor.detach()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=tensor.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device))
    longest = int(max(int(n) for n in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)])


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """Move ``model`` to ``env.device``; wrap it in DistributedDataParallel when world_size > 1.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts
    from the same weights, and averages gradients in ``backward``. Uses
    ``find_unused_parameters=False``: every parameter must take part in every loss.
    """
    model = model.to(env.device)
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (what to checkpoint), or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def cleanup() -> None:
    """Leave the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(
    n: int, env: DistEnv, seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> list[int]:
    """This rank's share of ``range(n)`` for one epoch.

    Args:
        n: dataset length, >= 1.
        env: the process's place in the run.
        seed: the same on every rank.
        epoch: changes the shuffle each epoch.
        shuffle: permute before sharding (``False``: contiguous order, for evaluation).

    Returns:
        ``ceil(n / world_size)`` indices. Ranks are disjoint except for the few indices
        repeated to pad ``n`` to a multiple of ``world_size``; together they cover every index.
    """
    if n < 1:
        raise ValueError(f"cannot shard an empty dataset (n={n})")
    if shuffle:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    per_rank = -(-n // env.world_size)
    total = per_rank * env.world_size
    while len(order) < total:
        order += order[: total - len(order)]
    return order[env.rank : total : env.world_size]
