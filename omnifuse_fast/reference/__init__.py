"""The reference path: SPEC.md in plain, readable PyTorch. The ground truth for every backend."""

from omnifuse_fast.reference.cra import cra_forward
from omnifuse_fast.reference.dwfuse import dwfuse_loss, dwfuse_weights
from omnifuse_fast.reference.mimo import mgda_min_norm, mimo_combine
from omnifuse_fast.reference.mix import modality_mix, soft_cross_entropy
from omnifuse_fast.reference.tla import combination_ids, tla_loss, tla_stats

__all__ = [
    "combination_ids",
    "cra_forward",
    "dwfuse_loss",
    "dwfuse_weights",
    "mgda_min_norm",
    "mimo_combine",
    "modality_mix",
    "soft_cross_entropy",
    "tla_loss",
    "tla_stats",
]
