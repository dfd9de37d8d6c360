"""``TrainConfig``: everything a run depends on, stored in its checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from omnifuse_fast._dispatch import BACKENDS
from omnifuse_fast.data.corruption import Corruption

METHODS = ("omnifuse", "concat", "mm", "mimo")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """A training run: data, model, optimizer and schedule.

    ``method``: ``"omnifuse"`` (eq. 18, components switchable), ``"concat"`` (the baseline:
    joint head on concatenated embeddings, plain CE; ``lambdas`` is forced to 1s), ``"mm"`` (the baseline with MM learning's
    bilevel schedule) or ``"mimo"`` (the baseline with MIMO balancing of the fusion loss and
    the worst unimodal head).
    """

    method: str = "omnifuse"
    # data (the built-in UCI multiple features)
    missing_rate: float = 0.5
    noise_views: tuple[str, ...] = ()
    noise_std: float = 0.0
    corruption: str = "none"  # per-sample low quality (docs/CORRUPTION.md), on every split
    corrupt_views: int = 1
    corrupt_std: float | None = None
    # optimization
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    select_best: bool = True
    patience: int | None = None  # early stopping: epochs without a better val AUROC
    # model
    dim: int = 32
    hidden: int = 64
    num_blocks: int = 5
    encoder_hidden: int = 128
    head_hidden: int = 64
    drop_rate: float = 0.3
    alpha: float = 0.1
    beta: float = 0.5
    lambdas: tuple[float, float, float] = (1.0, 10.0, 0.5)
    use_dwfuse: bool = True
    use_tla: bool = True
    use_imp_forward: bool = True
    use_imp_backward: bool = True
    tla_mode: str = "observed"
    # MM learning (method "mm")
    mm_stage1_epochs: int | None = None  # None: half the epochs, fixed when the run starts
    # None: the pool is the top mm_top_fraction by p(true class). A threshold such as 0.9 kept
    # 97% of the rows on the built-in data (training p(true) saturates), so it selected nothing.
    mm_tau: float | None = None
    mm_top_fraction: float = 0.5
    mm_mu: float = 0.5
    # MIMO (method "mimo")
    mimo_mode: str = "mimo"
    backend: str = "auto"
    device: str = "cpu"
    # the step: torch.compile of its forward and losses (backward through AOT autograd), how
    # often the loss terms are checked for NaN/inf (one host sync per check), and the precision
    # of its forward and losses ("bf16": under torch.autocast; parameters and AdamW stay fp32)
    compile: bool = False
    check_every: int = 1
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method != "omnifuse":
            # The baselines use none of OmniFuse's components and train on plain CE(o, y)
            # (weight 1: MM learning's mu and MIMO's min-norm weights assume unscaled losses).
            self.use_dwfuse = self.use_tla = False
            self.use_imp_forward = self.use_imp_backward = False
            self.lambdas = (1.0, 1.0, 1.0)
        _check(0.0 <= self.missing_rate < 1.0, "missing_rate", "in [0, 1)", self.missing_rate)
        _check(self.noise_std >= 0.0, "noise_std", ">= 0", self.noise_std)
        Corruption(self.corruption, self.corrupt_views, self.corrupt_std)  # names a bad field
        self.noise_views = tuple(self.noise_views)
        self.lambdas = tuple(float(v) for v in self.lambdas)  # type: ignore[assignment]
        for name in ("epochs", "batch_size", "dim", "hidden", "num_blocks"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, ">= 1")
        for name in ("encoder_hidden", "head_hidden"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, ">= 1")
        _check(_is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0", self.seed)
        if self.patience is not None:
            _check(_is_int(self.patience) and self.patience >= 1, "patience", ">= 1 or None")
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", "> 0", self.lr)
        _check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _check(0.0 <= self.drop_rate < 1.0, "drop_rate", "in [0, 1)", self.drop_rate)
        _check(len(self.lambdas) == 3, "lambdas", "three numbers (l1, l2, l3)", self.lambdas)
        if self.mm_stage1_epochs is None:
            self.mm_stage1_epochs = max(1, self.epochs // 2)
        _check(
            _is_int(self.mm_stage1_epochs) and self.mm_stage1_epochs >= 0,
            "mm_stage1_epochs",
            "an int >= 0",
            self.mm_stage1_epochs,
        )
        if self.mm_tau is not None:
            _check(0.0 < self.mm_tau <= 1.0, "mm_tau", "in (0, 1]", self.mm_tau)
        _check(0.0 < self.mm_top_fraction <= 1.0, "mm_top_fraction", "in (0, 1]")
        _check(0.0 <= self.mm_mu <= 1.0, "mm_mu", "in [0, 1]", self.mm_mu)
        _check(self.mimo_mode in ("mimo", "mgda"), "mimo_mode", "'mimo' or 'mgda'")
        _check(self.tla_mode in ("observed", "subsets"), "tla_mode", "'observed' or 'subsets'")
        _check(self.backend == "auto" or self.backend in BACKENDS, "backend", f"auto or {BACKENDS}")
        _check(isinstance(self.compile, bool), "compile", "True or False", self.compile)
        _check(_is_int(self.check_every) and self.check_every >= 1, "check_every", ">= 1")
        _check(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}", self.precision)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (stored in checkpoints and metrics.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(ok: bool, name: str, what: str, value: Any = None) -> None:
    if not ok:
        got = "" if value is None else f", got {value!r}"
        raise ValueError(f"{name} must be {what}{got}")
