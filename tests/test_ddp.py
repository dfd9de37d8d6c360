"""DDP training: two gloo ranks on loopback take the steps one process takes on the global batch.

Two spawned processes train with ``Trainer`` under an initialized process group (what
``torchrun`` gives) and are compared with single-process training on the same data, seeds and
global batch size: the per-epoch losses and every loss term, the final parameters (within fp32
reduction-order tolerance: the gradient is summed over two shards instead of one batch) and
the mined lazy combinations (identical). The batch sizes leave a ragged last batch, one of
them a single sample (so one rank trains on a zero-weight stand-in).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import synthetic_splits

from omnifuse_fast.train import TrainConfig, Trainer
from omnifuse_fast.train.distributed import DistContext, objective_coefficients

SMALL = dict(dim=4, hidden=8, num_blocks=2, encoder_hidden=8, head_hidden=8, lr=3e-3)
JOBS = [  # (name, config overrides); 64 training samples
    ("omnifuse", dict(method="omnifuse", epochs=3, batch_size=24)),  # 24, 24, 16
    ("omnifuse-subsets", dict(method="omnifuse", tla_mode="subsets", epochs=3, batch_size=21)),
    ("concat", dict(method="concat", epochs=2, batch_size=21)),  # last batch: 1 sample
    ("mm", dict(method="mm", epochs=3, mm_stage1_epochs=1, batch_size=24)),
    ("mimo", dict(method="mimo", epochs=2, batch_size=24)),
]


def _config(overrides: dict) -> TrainConfig:
    return TrainConfig(**{**SMALL, "backend": "reference", **overrides})


def _run(overrides: dict, distributed: DistContext | None, trainer=None) -> dict:
    torch.set_num_threads(1)
    if trainer is None:
        trainer = Trainer(_config(overrides), None, synthetic_splits(), distributed=distributed)
    for _ in range(trainer.epoch, trainer.config.epochs):
        trainer._one_epoch(None)
    return {
        "history": [
            {"loss": h["train_loss"], "terms": h["terms"], "lazy": h["lazy"]}
            for h in trainer.history
        ],
        "params": {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()},
        "pool": None if trainer.pool is None else trainer.pool.tolist(),
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resumed(out_dir: str) -> dict:
    """Two epochs (rank 0 checkpoints), then every rank resumes from that file to three."""
    first = Trainer(_config(RESUME | {"epochs": 2}), out_dir, synthetic_splits())
    first.fit()
    dist.barrier()  # the checkpoint is on disk before anyone reads it
    torch.manual_seed(999)  # whatever happened in between must not matter
    return _run({}, None, Trainer.resume(out_dir, epochs=3, splits=synthetic_splits()))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    warnings.simplefilter("ignore", FutureWarning)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        # distributed=None: the trainer finds the initialized group itself (as under torchrun)
        got = {name: _run(over, None) for name, over in JOBS}
        got["resumed"] = _resumed(os.path.join(out_dir, "run"))
        # a file, not a queue: a queue's pipe fills up and blocks the exit that join waits for
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(got, f)
    finally:
        dist.destroy_process_group()


def spawn_two_ranks(worker, out_dir) -> dict[int, dict]:
    """Run ``worker(rank, 2, port, out_dir)`` in two spawned processes; each pickles its
    results to ``out_dir/rank{rank}.pkl``, returned here as ``{rank: results}``."""
    mp.start_processes(
        worker, args=(2, _free_port(), str(out_dir)), nprocs=2, join=True, start_method="spawn"
    )
    results = {}
    for rank in range(2):
        with open(out_dir / f"rank{rank}.pkl", "rb") as f:
            results[rank] = pickle.load(f)
    return results


RESUME = dict(method="omnifuse", batch_size=24, epochs=3)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[int, dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return spawn_two_ranks(_worker, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("name", [name for name, _ in JOBS] + ["resumed"])
def test_two_ranks_train_like_one_process_on_the_global_batch(two_ranks, name):
    """(``resumed``: a two-rank run checkpointed by rank 0 and resumed by both ranks.)"""
    overrides = RESUME if name == "resumed" else dict(JOBS)[name]
    single = _run(overrides, DistContext())
    for rank in (0, 1):
        got = two_ranks[rank][name]
        assert [h["lazy"] for h in got["history"]] == [h["lazy"] for h in single["history"]]
        assert got["pool"] == single["pool"]
        for h_got, h_want in zip(got["history"], single["history"], strict=True):
            assert h_got["terms"].keys() == h_want["terms"].keys()
            assert h_got["loss"] == pytest.approx(h_want["loss"], rel=1e-4, abs=1e-5)
            for k, v in h_want["terms"].items():
                assert h_got["terms"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (rank, k)
        for k, v in single["params"].items():
            torch.testing.assert_close(
                torch.from_numpy(got["params"][k]), torch.from_numpy(v), rtol=1e-4, atol=2e-5, msg=k
            )
    # the ranks hold the same model, bit for bit (DDP averages the same gradients everywhere)
    for k, v in two_ranks[0][name]["params"].items():
        assert (v == two_ranks[1][name]["params"][k]).all(), k


def test_ddp_would_differ_without_synchronization(two_ranks):
    """The comparison above can fail: one shard alone trains a visibly different model."""
    single = _run(dict(JOBS)["omnifuse"], DistContext())
    half = dict(JOBS)["omnifuse"] | {"batch_size": 12}  # what one rank's shard alone would do
    alone = _run(half, DistContext())
    diff = max(abs(alone["params"][k] - v).max() for k, v in single["params"].items())
    assert diff > 1e-3


def test_objective_coefficients_rebuild_the_models_total():
    """distributed.py re-sums eq. 18 from its leaf terms: the coefficients must match."""
    for overrides in (
        dict(method="omnifuse"),
        dict(method="omnifuse", use_dwfuse=False, lambdas=(0.7, 3.0, 0.25)),
        dict(method="concat"),
    ):
        trainer = Trainer(_config(overrides), None, synthetic_splits(), distributed=DistContext())
        trainer.model.miner.lazy_id.fill_(3)  # a lazy combination, so L_TLA is a real term
        train = trainer.splits["train"]
        out = trainer.model(train.views, train.observed, train.labels)
        coef = objective_coefficients(trainer.model)
        rebuilt = sum(coef[k] * v for k, v in out.losses.items() if k in coef)
        torch.testing.assert_close(rebuilt, out.losses["total"])


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun smoke test on Linux only")
def test_cli_train_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node=2 -m omnifuse_fast train``: one JSON line, rank 0's files."""
    pytest.importorskip("torch.distributed.run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "omnifuse_fast", "train", "--epochs", "1", "--dim", "4", "--num-blocks", "1",
        "--batch-size", "128", "--out", str(tmp_path / "run"), "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    import json

    result = json.loads(lines[0])
    assert result["world_size"] == 2 and result["epochs"] == 1
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert (tmp_path / "run" / "metrics.json").is_file()
