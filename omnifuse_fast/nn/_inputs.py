"""Checks of what a user passes to the modules, with messages in the user's terms.

The functional ops check their own arguments; a module knows more (its parameters' dtype, which
blocks are missing, M), so it can name the argument the user passed and say what to do.
"""

from __future__ import annotations

import torch

from omnifuse_fast import _checks


def autocasting(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (then mixed dtypes are expected)."""
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def module_dtype(name: str, t: torch.Tensor, param: torch.Tensor, module: str) -> None:
    """``t`` has the dtype of the module's parameters (outside autocast)."""
    if t.dtype != param.dtype and not autocasting(t.device):
        raise TypeError(
            f"{name} is {str(t.dtype).replace('torch.', '')} while the {module}'s parameters are "
            f"{str(param.dtype).replace('torch.', '')}: cast the input ({name}.to("
            f"{param.dtype})) or the module (module.to({t.dtype})), or run under torch.autocast"
        )


def finite_where(name: str, v: torch.Tensor, observed: torch.Tensor) -> None:
    """Value check: the observed blocks of ``v [B, M, D]`` are finite (missing ones may not be)."""
    if not _checks.value_checks_enabled() or v.numel() == 0:
        return
    bad = ~torch.isfinite(v).all(dim=-1) & observed  # [B, M]
    if bool(bad.any()):
        row, mod = (int(i) for i in bad.nonzero()[0])
        raise _checks.NonFiniteInputError(
            f"{name} must be finite in its observed blocks; it holds NaN or inf in an observed "
            f"block (sample {row}, modality {mod}): only blocks marked missing "
            f"(observed[{row}, {mod}] = False) may hold anything. "
            f"Mark that block missing, or fix what produced it (e.g. the encoder of modality "
            f"{mod} overflowed)"
        )


def finite_rows(name: str, x: torch.Tensor, observed_rows: torch.Tensor, modality: int) -> None:
    """Value check: the observed rows of view ``x [B, D_m]`` are finite."""
    if not _checks.value_checks_enabled() or x.numel() == 0:
        return
    bad = ~torch.isfinite(x).all(dim=1) & observed_rows
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise _checks.NonFiniteInputError(
            f"{name} must be finite in its observed rows; it holds NaN or inf in row {row}, "
            f"which observed marks present (observed[{row}, {modality}] = True): rows of a "
            f"missing view may hold anything. Mark the row missing or clean the input"
        )


def lazy_id(name: str, lazy: int, num_modalities: int) -> int:
    """A combination id in ``0 .. 2**M - 1`` (0: none mined yet)."""
    top = (1 << num_modalities) - 1
    if isinstance(lazy, bool) or not isinstance(lazy, int):
        raise TypeError(f"{name} must be an int combination id, got {type(lazy).__name__}")
    if not 0 <= lazy <= top:
        raise ValueError(
            f"{name} must be a combination id of the {num_modalities} modalities, in 1..{top} "
            f"(or 0 for none), got {lazy}: an id >= 2**M names a modality this model does not "
            f"have"
        )
    return lazy
