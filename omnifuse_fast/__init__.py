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
from omnifuse_fast.ops import (
    combination_ids,
    cra_forward,
    dwfuse_loss,
    dwfuse_weights,
    mgda_min_norm,
    mimo_combine,
    modality_mix,
    soft_cross_entropy,
    tla_loss,
    tla_stats,
)

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
    "combination_ids",
    "cra_forward",
    "dwfuse_loss",
    "dwfuse_weights",
    "mgda_min_norm",
    "mimo_combine",
    "modality_mix",
    "set_value_checks",
    "soft_cross_entropy",
    "tla_loss",
    "tla_stats",
    "value_checks_enabled",
]
