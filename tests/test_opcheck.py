"""torch.library.opcheck on every custom op: those of csrc/ops.cpp (forward and backward ops,
CPU kernels) and the Triton ones (omnifuse_fast/triton, run in the interpreter on CPU tensors).

Checks each op's schema against its kernel (no input mutated or aliased), that the fake impl
matches the kernel's outputs, that autograd is registered where inputs require grad, and that
AOT dispatch (the torch.compile path, dynamic shapes) works. The CUDA registrations get the same
check in tests/test_cuda_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from _harness import triton_interpreter
from _op_samples import compiled_samples, schemas, triton_args, triton_samples

from omnifuse_fast import _dispatch

_COMPILED = compiled_samples()
_TRITON = triton_samples()


def _ids(samples):
    return [f"{n}-{i}" for i, (n, _) in enumerate(samples)]


@pytest.fixture
def interpret():
    with triton_interpreter():
        _dispatch.load_error("triton")  # registers the Triton ops
        yield


@pytest.mark.backend("cpu")
def test_every_schema_has_a_sample():
    """A new schema in csrc/ops.cpp must get an opcheck sample in tests/_op_samples.py."""
    sampled = {name for name, _ in _COMPILED}
    registered = schemas("omnifuse_fast")
    assert registered and registered <= sampled, sorted(registered - sampled)


@pytest.mark.backend("cpu")
@pytest.mark.parametrize("name,args", _COMPILED, ids=_ids(_COMPILED))
def test_opcheck(name, args):
    _dispatch.load_error("cpu")  # the fake impls and autograd formulas
    torch.library.opcheck(getattr(torch.ops.omnifuse_fast, name).default, args)


@pytest.mark.backend("triton")
def test_every_triton_op_has_a_sample(interpret):
    """A new Triton custom op must get an opcheck sample in tests/_op_samples.py."""
    sampled = {name for name, _ in _TRITON}
    registered = schemas("omnifuse_fast_triton")
    assert registered and registered <= sampled, sorted(registered - sampled)


@pytest.mark.backend("triton")
@pytest.mark.parametrize("name,args", _TRITON, ids=_ids(_TRITON))
def test_opcheck_triton(name, args, interpret):
    import torch._functorch.config as functorch_config

    op = getattr(torch.ops.omnifuse_fast_triton, name).default
    # the interpreter cannot hand the kernels to functionalization: keep the ops opaque
    with functorch_config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(op, triton_args(name, args))
