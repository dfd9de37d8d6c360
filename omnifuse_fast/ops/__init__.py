"""Public functional ops: validate once, pick a backend, call it."""

from omnifuse_fast.ops.cra import cra_forward
from omnifuse_fast.ops.dwfuse import dwfuse_loss, dwfuse_weights
from omnifuse_fast.ops.mimo import mgda_min_norm, mimo_combine
from omnifuse_fast.ops.mix import modality_mix, soft_cross_entropy
from omnifuse_fast.ops.tla import combination_ids, tla_loss, tla_stats

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
