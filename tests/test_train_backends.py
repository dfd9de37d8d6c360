"""One short training run per fast backend: the training loop meets the compiled and Triton
kernels (the other training tests pin ``backend="reference"``).

Each run is tiny (two epochs on the synthetic three-view data of tests/test_train.py); it must
train (a separable problem learned) and the metrics' per-family record of the training steps
(``backends_train``, from the dispatcher's usage record) must show that every op family the
method uses (all five over the three methods) ran on the backend asked for. Triton runs in the
interpreter on CPU tensors.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from _harness import triton_interpreter
from test_train import SMALL, synthetic_splits

from omnifuse_fast.train import TrainConfig, Trainer

# op families each method runs through the dispatcher
FAMILIES = {"omnifuse": {"cra", "dwfuse", "tla"}, "mm": {"mix"}, "mimo": {"mimo"}}


def _train(method: str, backend: str, tmp_path):
    torch.manual_seed(0)
    extra = {"mm_stage1_epochs": 1} if method == "mm" else {}
    config = TrainConfig(**SMALL, epochs=2, lr=1e-2, method=method, backend=backend, **extra)
    result = Trainer(config, tmp_path, synthetic_splits()).fit()
    return result, result["backends_train"]


@pytest.mark.parametrize("method", sorted(FAMILIES))
@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=pytest.mark.backend(b), id=b) for b in ("cpu", "triton")]
)
def test_short_training_runs_on_the_backend(backend, method, tmp_path):
    interp = triton_interpreter() if backend == "triton" else contextlib.nullcontext()
    with interp:
        result, usage = _train(method, backend, tmp_path)
    assert result["epochs"] == 2 and math.isfinite(result["test_auroc"])
    assert result["test_auroc"] > 0.6, result  # separable classes: it learned something
    for family in FAMILIES[method]:
        assert usage.get(family) == backend, (family, usage)
