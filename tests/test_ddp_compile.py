"""DDP with ``compile=True``: two gloo ranks run the compiled step (forward and losses through
``torch.compile``, each rank's share all-reduced inside it) and take the steps one eager process
takes on the global batch. The compile backend is ``aot_eager`` (dynamo + AOT autograd, no
inductor code generation: minutes on a small CPU); ``torchrun`` runs the same trainer path.
"""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
from _harness import compile_as_aot_eager
from test_ddp import _run, spawn_two_ranks

from omnifuse_fast.train.distributed import DistContext

JOB = dict(method="omnifuse", epochs=2, batch_size=24)  # 24, 24, 16: a ragged last batch


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    warnings.simplefilter("ignore", FutureWarning)
    torch.compile = compile_as_aot_eager()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        from torch._dynamo.utils import counters

        got = _run({**JOB, "compile": True}, None)
        got["graphs"] = counters["stats"]["unique_graphs"]
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(got, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_compiled_ranks(tmp_path_factory) -> dict[int, dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return spawn_two_ranks(_worker, tmp_path_factory.mktemp("ddp_compile"))


def test_two_compiled_ranks_train_like_one_eager_process(two_compiled_ranks):
    single = _run(JOB, DistContext())
    for rank in (0, 1):
        got = two_compiled_ranks[rank]
        assert got["graphs"] >= 1  # the step was compiled, not run eagerly
        assert [h["lazy"] for h in got["history"]] == [h["lazy"] for h in single["history"]]
        for h_got, h_want in zip(got["history"], single["history"], strict=True):
            assert h_got["terms"].keys() == h_want["terms"].keys()
            assert h_got["loss"] == pytest.approx(h_want["loss"], rel=1e-4, abs=1e-5)
        for k, v in single["params"].items():
            torch.testing.assert_close(
                torch.from_numpy(got["params"][k]), torch.from_numpy(v), rtol=1e-4, atol=2e-5, msg=k
            )
    for k, v in two_compiled_ranks[0]["params"].items():
        assert (v == two_compiled_ranks[1]["params"][k]).all(), k
