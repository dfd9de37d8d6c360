"""A whole OmniFuse training step per provider: forward with the joint objective (eq. 18),
backward, AdamW step, and the TLA miner's update, as ``omnifuse_fast.train.Trainer`` does it.

Providers: ``reference`` (the model with ``backend="reference"``), ``compile``
(``torch.compile`` of that model's forward; backward through AOTAutograd, optimizer eager) and
each fast backend that runs every op the model calls. No roofline floor: the step mixes
matmuls, small reductions and the optimizer; the speedups and memory are the measure.
"""

from __future__ import annotations

import pytest
import torch
from _harness import (
    DEVICE,
    PROVIDERS,
    WARMUP,
    Case,
    measure_memory,
    params,
    pick,
    randint,
    randn,
    record,
)

import omnifuse_fast

# The ops OmniFuse calls in a training step (imputer, DWFuse, TLA loss and miner).
MODEL_OPS = ("cra_forward", "dwfuse_loss", "combination_ids", "tla_loss", "tla_stats")
MFEAT_VIEW_DIMS = (76, 216, 64, 240, 47, 6)  # the built-in data's six views
TRAIN = "train"


def _omnifuse():
    """The model class, imported lazily: the suite runs before omnifuse_fast.nn exists."""
    try:
        from omnifuse_fast.nn import OmniFuse
    except ImportError as exc:
        pytest.skip(f"omnifuse_fast.nn.OmniFuse is not available ({exc})")
    return OmniFuse


def _case(b, m, d, h, k, c, in_dim=0):
    dims = {"B": b, "M": m, "D": d, "H": h, "K": k, "C": c}
    return Case("train_step", dims | ({"In": in_dim} if in_dim else {}), TRAIN)


def _cases() -> list[Case]:
    smoke = [_case(64, 3, 16, 32, 2, 10)]
    # MFEAT-sized (the CLI's defaults: D=32, H=64, K=5) and the reference widths.
    default = [_case(1024, 6, 32, 64, 5, 10), _case(4096, 4, 128, 256, 5, 25, in_dim=256)]
    large = [_case(65536, 4, 128, 256, 5, 25, in_dim=256), _case(1 << 18, 8, 64, 128, 5, 100, 128)]
    return pick(smoke, default, large)


def _batch(case: Case):
    b, m, c = case.dims["B"], case.dims["M"], case.dims["C"]
    view_dims = [case.dims["In"]] * m if "In" in case.dims else list(MFEAT_VIEW_DIMS[:m])
    views = [randn(b, d, seed=10 + i) for i, d in enumerate(view_dims)]
    observed = randint(0, 10, b, m, seed=20) < 7  # about 30% of the views missing
    observed[:, 0] |= ~observed.any(dim=1)  # every sample keeps at least one view
    for i, x in enumerate(views):  # missing rows are zero-filled, as the data loader does
        x[~observed[:, i]] = 0
    return view_dims, views, observed, randint(0, c, b, seed=30)


@pytest.mark.parametrize("case,provider", params(_cases(), ops=MODEL_OPS))
def test_train_step(benchmark, case, provider):
    omnifuse_cls = _omnifuse()
    omnifuse_fast.set_value_checks(False)
    view_dims, views, observed, labels = _batch(case)
    torch.manual_seed(0)
    backend = "reference" if provider in ("reference", "compile") else provider
    model = omnifuse_cls(
        view_dims,
        case.dims["C"],
        dim=case.dims["D"],
        hidden=case.dims["H"],
        num_blocks=case.dims["K"],
        backend=backend,
    ).to(DEVICE)
    model.train()
    forward = torch.compile(model, dynamic=False) if provider == "compile" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    # One mined epoch first, so that a lazy combination exists and L_TLA is active.
    with torch.no_grad():
        model.tla_observe(model(views, observed, labels), observed, labels)
    model.miner.mine()

    def step():
        out = forward(views, observed, labels)
        optimizer.zero_grad(set_to_none=True)
        out.losses["total"].backward()
        optimizer.step()
        model.tla_observe(out, observed, labels)
        sync()
        return out.losses["total"]

    for _ in range(WARMUP):
        step()
    exclude = [*model.parameters(), *model.buffers(), *views, observed, labels]
    memory = measure_memory(step, lambda: forward(views, observed, labels), exclude)
    extra = {"params": sum(p.numel() for p in model.parameters()), "providers": list(PROVIDERS)}
    record(benchmark, case, provider, step, None, {**memory, **extra})
