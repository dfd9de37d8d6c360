"""Training: the trainer, its config, checkpoints, metrics and MM learning's schedule."""

from omnifuse_fast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from omnifuse_fast.train.config import METHODS, TrainConfig
from omnifuse_fast.train.metrics import accuracy, macro_auroc
from omnifuse_fast.train.schedule import select_strong
from omnifuse_fast.train.trainer import Trainer, build_model

__all__ = [
    "METHODS",
    "CheckpointError",
    "TrainConfig",
    "Trainer",
    "accuracy",
    "build_model",
    "load_checkpoint",
    "macro_auroc",
    "save_checkpoint",
    "select_strong",
]
