"""Public functional ops: validate once, pick a backend, call it."""

from omnifuse_fast import _dispatch
from omnifuse_fast.ops.cra import cra_forward  # noqa: F401
from omnifuse_fast.ops.dwfuse import dwfuse_loss, dwfuse_weights  # noqa: F401
from omnifuse_fast.ops.mimo import mgda_min_norm, mimo_combine  # noqa: F401
from omnifuse_fast.ops.mix import modality_mix, soft_cross_entropy  # noqa: F401
from omnifuse_fast.ops.tla import combination_ids, tla_loss, tla_stats  # noqa: F401

# The public ops are the names of _dispatch.OPS, each imported above (noqa: re-exported here;
# tests/test_import.py checks that every one is exported).
__all__ = list(_dispatch.OPS)
