"""omnifuse_fast: fused kernels for multimodal learning on low-quality data.

OmniFuse (CRA imputation, DWFuse, TLA), MM learning and MIMO as PyTorch ops and modules,
each with a plain-PyTorch reference path and compiled fast paths (C++ CPU, Triton, CUDA).
The semantics are those of SPEC.md; every op takes ``backend=`` ("auto" by default).
"""

from omnifuse_fast import (
    _dispatch,
    _ext,  # noqa: F401  (loads the compiled ops, or warns once)
)
from omnifuse_fast._checks import set_value_checks, value_checks_enabled
from omnifuse_fast._dispatch import BACKENDS, available_backends
from omnifuse_fast.api import OmniFuseClassifier
from omnifuse_fast.nn import (
    CascadeResidualAutoencoder,
    DWFuseLoss,
    FrozenTextEncoder,
    MIMOBalancer,
    MLPEncoder,
    ModalityMixer,
    OmniFuse,
    OmniFuseImputer,
    TLAMiner,
)
from omnifuse_fast.ops import *  # noqa: F403  (the public ops: the names of _dispatch.OPS)

__version__ = "0.1.0"

_dispatch.preload()

__all__ = [
    "BACKENDS",
    "CascadeResidualAutoencoder",
    "DWFuseLoss",
    "FrozenTextEncoder",
    "MIMOBalancer",
    "MLPEncoder",
    "ModalityMixer",
    "OmniFuse",
    "OmniFuseClassifier",
    "OmniFuseImputer",
    "TLAMiner",
    "available_backends",
    "set_value_checks",
    "value_checks_enabled",
    *_dispatch.OPS,
]
