"""A whole OmniFuse training step as ``omnifuse-fast train`` runs it: ``Trainer.train_step``
(supervision drop, forward with the joint objective of eq. 18, the finiteness check, backward,
AdamW, the TLA miner's update), with L_TLA active.

Providers (each the trainer's own step, so that what is timed is what a user runs):

- ``reference``: ``--backend reference``, eager;
- ``compile``: ``torch.compile`` of that reference step (``--backend reference --compile``:
  the forward and losses through inductor with its default settings, the backward through
  AOT autograd, the optimizer eager);
- ``ours``: the default backend (``auto``: the C++ kernels on CPU, CUDA/Triton on a GPU), eager;
- ``ours+compile``: the default backend with ``--compile``.

The first ``OMNIFUSE_BENCH_WARMUP`` steps (default 2; compilation happens in the first) are not
timed: the median is the steady-state step. ``extra_info`` adds ``ms_per_step`` and
``samples_per_s`` (the batch over the median). No roofline floor: the step mixes matmuls, small
reductions and the optimizer; the speedups are the measure.
"""

from __future__ import annotations

import pytest
import torch
from _harness import (
    DEVICE,
    WARMUP,
    Case,
    measure_memory,
    pick,
    provider_reason,
    randint,
    randn,
    record,
)

import omnifuse_fast

MFEAT_VIEW_DIMS = (76, 216, 64, 240, 47, 6)  # the built-in data's six views
TRAIN = "train"
# provider -> (--backend, --compile)
STEP_PROVIDERS = {
    "reference": ("reference", False),
    "compile": ("reference", True),
    "ours": ("auto", False),
    "ours+compile": ("auto", True),
}


def _case(b, m, d, h, k, c, in_dim=0):
    dims = {"B": b, "M": m, "D": d, "H": h, "K": k, "C": c}
    return Case("train_step", dims | ({"In": in_dim} if in_dim else {}), TRAIN)


def _cases() -> list[Case]:
    smoke = [_case(64, 3, 16, 32, 2, 10)]
    # MFEAT-sized (the CLI's defaults: D=32, H=64, K=5, batch 64) and the widths.
    default = [
        _case(64, 6, 32, 64, 5, 10),
        _case(1024, 6, 32, 64, 5, 10),
        _case(4096, 4, 128, 256, 5, 25, in_dim=256),
    ]
    large = [_case(65536, 4, 128, 256, 5, 25, in_dim=256), _case(1 << 18, 8, 64, 128, 5, 100, 128)]
    return pick(smoke, default, large)


def _params() -> list:
    out = []
    for case in _cases():
        for provider, (_, compiled) in STEP_PROVIDERS.items():
            reason = provider_reason("train_step", "compile") if compiled else None
            marks = [pytest.mark.skip(reason=f"{provider}: {reason}")] if reason else []
            out.append(pytest.param(case, provider, id=f"{case.id}-{provider}", marks=marks))
    return out


def _split(case: Case):
    """The case's batch as a training split (every step trains on all of it)."""
    from omnifuse_fast.data import MultiViewSplit

    b, m, c = case.dims["B"], case.dims["M"], case.dims["C"]
    view_dims = [case.dims["In"]] * m if "In" in case.dims else list(MFEAT_VIEW_DIMS[:m])
    views = [randn(b, d, seed=10 + i).cpu() for i, d in enumerate(view_dims)]
    observed = randint(0, 10, b, m, seed=20).cpu() < 7  # about 30% of the views missing
    observed[:, 0] |= ~observed.any(dim=1)  # every sample keeps at least one view
    for i, x in enumerate(views):  # missing rows are zero-filled, as the data loader does
        x[~observed[:, i]] = 0
    labels = randint(0, c, b, seed=30).cpu()
    split = MultiViewSplit(
        views, labels, observed, torch.arange(b), [f"v{i}" for i in range(m)], view_dims, c
    )
    return {"train": split, "val": split, "test": split}


@pytest.mark.parametrize("case,provider", _params())
def test_train_step(benchmark, case, provider):
    from omnifuse_fast.train import TrainConfig, Trainer

    omnifuse_fast.set_value_checks(True)  # the default settings
    backend, compiled = STEP_PROVIDERS[provider]
    torch._dynamo.reset()  # each compiled case compiles for its own shapes
    config = TrainConfig(
        dim=case.dims["D"],
        hidden=case.dims["H"],
        num_blocks=case.dims["K"],
        batch_size=case.dims["B"],
        backend=backend,
        compile=compiled,
        device=str(DEVICE),
    )
    trainer = Trainer(config, None, _split(case))
    model, train = trainer.model, trainer.splits["train"]
    # One mined epoch first, so that a lazy combination exists and L_TLA is active.
    with torch.no_grad():
        model.tla_observe(model(train.views, train.observed, train.labels), *_obs_labels(train))
    model.miner.mine()
    model.train()
    batch = torch.arange(case.dims["B"], device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def step():
        terms = trainer.train_step(batch)
        sync()
        return terms

    for _ in range(WARMUP):  # the first call compiles
        step()
    exclude = [*model.parameters(), *model.buffers(), *train.views, train.observed, train.labels]
    memory = measure_memory(step, lambda: model(train.views, train.observed, train.labels), exclude)
    extra = {
        "params": sum(p.numel() for p in model.parameters()),
        "providers": list(STEP_PROVIDERS),
        "backend": backend,
        "compile": compiled,
    }
    median = record(benchmark, case, provider, step, None, {**memory, **extra})
    if median == median:  # timed (not --benchmark-disable)
        benchmark.extra_info["ms_per_step"] = median * 1e3
        benchmark.extra_info["samples_per_s"] = case.dims["B"] / median


def _obs_labels(split):
    return split.observed, split.labels
