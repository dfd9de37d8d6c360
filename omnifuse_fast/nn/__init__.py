"""Modules: the OmniFuse model and its parts, MM learning's mixer and MIMO's balancer.

Every module computes through the functional ops of :mod:`omnifuse_fast` (its ``backend``
attribute picks the path); none re-implements their math.
"""

from omnifuse_fast.nn.cra import CascadeResidualAutoencoder
from omnifuse_fast.nn.dwfuse import DWFuseLoss, DWFuseTerms
from omnifuse_fast.nn.encoders import FrozenTextEncoder, MLPEncoder
from omnifuse_fast.nn.imputer import ImputerOutput, OmniFuseImputer, supervision_drop
from omnifuse_fast.nn.mimo import MIMOBalancer, MIMOStep
from omnifuse_fast.nn.mix import ModalityMixer
from omnifuse_fast.nn.model import OmniFuse, OmniFuseOutput
from omnifuse_fast.nn.tla import TLAMiner, expand_subsets

__all__ = [
    "CascadeResidualAutoencoder",
    "DWFuseLoss",
    "DWFuseTerms",
    "FrozenTextEncoder",
    "ImputerOutput",
    "MIMOBalancer",
    "MIMOStep",
    "MLPEncoder",
    "ModalityMixer",
    "OmniFuse",
    "OmniFuseImputer",
    "OmniFuseOutput",
    "TLAMiner",
    "expand_subsets",
    "supervision_drop",
]
