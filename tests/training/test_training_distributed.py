"""Data-parallel training on 2 CPU processes (gloo): ranks see different data, end identical."""

from __future__ import annotations

import os
import socket
import time

import pytest

torch = pytest.importorskip("torch")
mp = pytest.importorskip("torch.multiprocessing")

from medssl.training.distributed import (
    DistEnv,
    all_gather_cat,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    is_main,
    shard_indices,
    unwrap,
    wrap_ddp,
)

pytestmark = [pytest.mark.integration, pytest.mark.ddp, pytest.mark.slow]

WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One torchrun-like process: env vars in, a tiny Conv3d trained 3 steps, results out."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    env = init_distributed(prefer_cuda=False)
    try:
        torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
        model = wrap_ddp(torch.nn.Conv3d(1, 2, kernel_size=3, padding=1), env)
        initial = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        data = torch.Generator().manual_seed(rank)  # different data on every rank
        for _ in range(STEPS):
            x = torch.randn(2, 1, 6, 6, 6, generator=data)
            target = torch.randn(2, 2, 6, 6, 6, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        mean = all_reduce_mean(torch.tensor([float(rank)]))
        barrier()
        torch.save(
            {
                "env": (env.rank, env.local_rank, env.world_size, str(env.device)),
                "is_main": is_main(),
                "initial": initial,
                "final": {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()},
                "mean": mean.item(),
                "shard": shard_indices(7, env, seed=1, epoch=2),
                "wrapped": type(model).__name__,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        cleanup()


def test_two_gloo_ranks_train_to_identical_parameters(tmp_path):
    ctx = mp.start_processes(
        _worker,
        args=(_free_port(), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "distributed workers did not finish in 90 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["env"] for r in res] == [(0, 0, 2, "cpu"), (1, 1, 2, "cpu")]
    assert [r["is_main"] for r in res] == [True, False]
    assert all(r["wrapped"] == "DistributedDataParallel" for r in res)
    for name in res[0]["final"]:
        assert torch.equal(res[0]["initial"][name], res[1]["initial"][name]), name
        assert torch.equal(res[0]["final"][name], res[1]["final"][name]), name
        assert not torch.allclose(res[0]["final"][name], res[0]["initial"][name]), name
    assert [r["mean"] for r in res] == [0.5, 0.5]
    shards = [r["shard"] for r in res]
    assert len(shards[0]) == len(shards[1]) == 4
    assert set(shards[0]) | set(shards[1]) == set(range(7))


def test_single_process_env_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed(prefer_cuda=False)
    assert env == DistEnv(0, 0, 1, torch.device("cpu")) and env.is_main and is_main()
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, env) is model and unwrap(model) is model
    t = torch.tensor([3.0])
    assert torch.equal(all_reduce_mean(t), t)
    barrier()
    cleanup()


def test_init_distributed_names_missing_master_addr(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed(prefer_cuda=False)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        init_distributed(prefer_cuda=False)


def test_shard_indices_are_disjoint_same_size_and_change_per_epoch():
    envs = [DistEnv(rank=r, world_size=3) for r in range(3)]
    shards = [shard_indices(10, e, seed=0, epoch=0) for e in envs]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set().union(*shards) == set(range(10))
    assert sum(len(s) for s in shards) - 10 == 2  # two indices repeated as padding
    assert shard_indices(10, envs[0], seed=0, epoch=1) != shards[0]
    assert shard_indices(10, envs[0], seed=0, epoch=0) == shards[0]
    assert shard_indices(6, envs[1], shuffle=False) == [1, 4]
    with pytest.raises(ValueError, match="n=0"):
        shard_indices(0, envs[0])


def _ad_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank of A&D under DDP: the whole Diff-VNet step is one forward (three decoders,
    shared encoder), so find_unused_parameters=False must hold and ranks must stay identical."""
    from medssl.cli.train import resolve_config
    from medssl.config import load_config
    from medssl.training.methods.ad import ad_step
    from medssl.training.networks.vnet import DiffVNet, VNetConfig
    from medssl.training.segmentation.config import SegmentationExperiment
    from medssl.training.segmentation.drs import DifficultyWeights

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    env = init_distributed(prefer_cuda=False)
    try:
        cfg = load_config(
            SegmentationExperiment,
            resolve_config("seg-imbssl-cpu"),
            {"ad.diffusion_process.sample_steps": 2},
        )
        torch.manual_seed(100 + rank)
        model = wrap_ddp(DiffVNet(VNetConfig(width=4), 3), env)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        drs = DifficultyWeights(3)
        data = torch.Generator().manual_seed(rank)
        for step in range(2):
            labeled = {
                "image": torch.randn(2, 1, 16, 32, 32, generator=data),
                "label": torch.randint(0, 3, (2, 16, 32, 32), generator=data),
            }
            unlabeled = {"image": torch.randn(2, 1, 16, 32, 32, generator=data)}
            loss = ad_step(model, unwrap(model), labeled, unlabeled, drs, step, cfg, data)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(
            {k: v.detach().clone() for k, v in unwrap(model).named_parameters()},
            os.path.join(out_dir, f"ad{rank}.pt"),
        )
    finally:
        cleanup()


def test_ad_step_trains_under_ddp_with_every_parameter_used(tmp_path):
    ctx = mp.start_processes(
        _ad_worker,
        args=(_free_port(), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "distributed A&D workers did not finish in 180 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp_path / f"ad{r}.pt") for r in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name


def _issue9_worker(rank: int, port: int, out_dir: str) -> None:
    """CPL memory and PatchCL under DDP: ranks with different batches must end with the same
    memory, the same weights and the same embedding queues."""
    from medssl.training.methods.base import ema_update
    from medssl.training.methods.common import filter_pseudo_labels
    from medssl.training.methods.patchcl import PatchCLParts, patchcl_step
    from medssl.training.networks.vnet import VNet
    from medssl.training.segmentation.config import SegmentationExperiment, SegModelConfig
    from medssl.training.segmentation.patchcl import EmbeddingQueues, ProjectionHead
    from medssl.training.threshold import FlexMatchThreshold

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    env = init_distributed(prefer_cuda=False)
    try:
        data = torch.Generator().manual_seed(rank)
        gathered = all_gather_cat(
            torch.full((rank + 1, 2), float(rank))
        )  # different sizes per rank
        policy = FlexMatchThreshold(3, 40, tau=0.5)
        probs = torch.softmax(torch.randn(2, 3, 4, generator=data) * 3, dim=1)
        ids = torch.randint(0, 40, (2, 4), generator=data)
        filter_pseudo_labels(policy, probs, ids)

        cfg = SegmentationExperiment(method="patchcl", model=SegModelConfig(width=4))
        torch.manual_seed(100 + rank)
        model = wrap_ddp(VNet(cfg.model, 2), env)
        teacher = VNet(cfg.model, 2)
        teacher.load_state_dict(unwrap(model).state_dict())
        head = ProjectionHead(64)
        parts = PatchCLParts(wrap_ddp(head, env), ProjectionHead(64), EmbeddingQueues(2, 128, 64))
        parts.teacher_head.load_state_dict(head.state_dict())
        opt = torch.optim.SGD([*model.parameters(), *parts.head.parameters()], lr=0.05)
        for step in (
            0,
            8000,
        ):  # warm-up (0.2 of the default 30000 steps: no PLGCL), then with PLGCL
            labeled = {
                "image": torch.rand(2, 1, 16, 32, 32, generator=data) * 2 - 1,
                "label": torch.randint(0, 2, (2, 16, 32, 32), generator=data),
            }
            unlabeled = {"image": torch.rand(2, 1, 16, 32, 32, generator=data) * 2 - 1}
            unlabeled["strong"] = unlabeled["image"] * 0.9
            losses = patchcl_step(model, teacher, parts, labeled, unlabeled, step, cfg)
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
            ema_update(teacher, unwrap(model), 0.99)
            ema_update(parts.teacher_head, unwrap(parts.head), 0.99)
        torch.save(
            {
                "gathered": gathered,
                "memory": policy.memory.clone(),
                "probs": probs,
                "ids": ids,
                "plgcl": float(losses["plgcl"]),
                "queues": parts.queues.state_dict(),
                "model": {k: v.detach().clone() for k, v in unwrap(model).named_parameters()},
                "head": {k: v.detach().clone() for k, v in unwrap(parts.head).named_parameters()},
            },
            os.path.join(out_dir, f"i9-{rank}.pt"),
        )
    finally:
        cleanup()


def test_cpl_memory_and_patchcl_queues_and_weights_agree_across_ddp_ranks(tmp_path):
    from medssl.training.threshold import FlexMatchThreshold

    ctx = mp.start_processes(
        _issue9_worker,
        args=(_free_port(), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "distributed workers did not finish in 180 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp_path / f"i9-{r}.pt", weights_only=False) for r in range(WORLD)]
    expected = torch.cat([torch.full((1, 2), 0.0), torch.full((2, 2), 1.0)])
    assert all(torch.equal(r["gathered"], expected) for r in ranks)
    # the memory is what one process gets from both ranks' batches, on both ranks
    single = FlexMatchThreshold(3, 40, tau=0.5)
    single.update(torch.cat([r["probs"] for r in ranks]), torch.cat([r["ids"] for r in ranks]))
    assert torch.equal(ranks[0]["memory"], ranks[1]["memory"])
    assert torch.equal(ranks[0]["memory"], single.memory)
    assert ranks[0]["plgcl"] > 0
    for part in ("model", "head"):
        for name in ranks[0][part]:
            assert torch.equal(ranks[0][part][name], ranks[1][part][name]), f"{part}.{name}"
    for name in ("buffer", "fill", "pointer"):
        assert torch.equal(ranks[0]["queues"][name], ranks[1]["queues"][name]), name
    assert int(ranks[0]["queues"]["fill"].sum()) > 0
