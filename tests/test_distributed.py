"""TLAMiner under torch.distributed: two gloo ranks on loopback mine what one process does."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omnifuse_fast.nn import TLAMiner

M = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logits_for_ce(ce: list[float]) -> torch.Tensor:
    """Two-class logits whose CE against label 0 is each given value."""
    gap = torch.tensor([math.log(math.expm1(c)) for c in ce])
    return torch.stack([torch.zeros_like(gap), gap], dim=1)


def crafted() -> tuple[list[tuple], int]:
    """Per-rank data where rank 0 alone would mine 3, rank 1 alone 6, and both together 5."""
    rank0 = (_logits_for_ce([3.0, 2.5]), torch.zeros(2, dtype=torch.long), torch.tensor([3, 5]))
    rank1 = (_logits_for_ce([1.0, 1.5]), torch.zeros(2, dtype=torch.long), torch.tensor([3, 6]))
    return [rank0, rank1], 5


def random_data(seed: int, n: int = 96) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 4, generator=g) * 2
    labels = torch.randint(0, 4, (n,), generator=g)
    comb = torch.randint(1, 1 << M, (n,), generator=g)
    return logits, labels, comb


def _mine(shards: list[tuple], reduction: str) -> tuple[int | None, int]:
    miner = TLAMiner(M, reduction=reduction, backend="reference")
    for logits, labels, comb in shards:
        for i in range(0, len(labels), 16):  # several batches per epoch
            miner.update(logits[i : i + 16], labels[i : i + 16], comb[i : i + 16])
    lazy = miner.mine()
    assert int(miner.counts.sum()) == 0  # the epoch's statistics are reset on every rank
    return lazy, int(miner.epoch)


def _worker(rank: int, world: int, port: int, jobs: list, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        out = [_mine([shards[rank]], reduction) for shards, reduction in jobs]
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_two_ranks_mine_the_same_lazy_combination_as_one_process():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    crafted_shards, crafted_lazy = crafted()
    jobs = [(crafted_shards, "mean")]
    for seed, reduction in ((0, "mean"), (1, "sum"), (2, "mean")):
        logits, labels, comb = random_data(seed)
        # interleaved shards: neither rank sees a whole combination
        jobs.append(([(logits[r::2], labels[r::2], comb[r::2]) for r in range(2)], reduction))
    want = [_mine(shards, reduction) for shards, reduction in jobs]  # one process, all data
    assert want[0][0] == crafted_lazy
    # alone, each rank of the crafted case would mine something else: the all-reduce matters
    assert _mine([crafted_shards[0]], "mean")[0] == 3 and _mine([crafted_shards[1]], "mean")[0] == 6

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(2, _free_port(), jobs, results), nprocs=2, join=True, start_method="spawn"
    )
    got = dict(results.get() for _ in range(2))
    assert got[0] == got[1] == want
