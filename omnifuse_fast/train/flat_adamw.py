"""``FlatAdamW``: AdamW over parameters that share one flat storage, one fused kernel a step.

torch's fused AdamW steps the main job's 60 parameter tensors (394,694 values) in 0.84 ms on
the 2-core CPU, mostly per tensor: the Python of ``step`` (grouping, state lookups), the step
counters' ``_foreach_add_`` (one ``add_`` per tensor on CPU) and the kernel's per-tensor
set-up (benchmarks/NOTES.md). Here the parameters become views of one flat tensor when the
optimizer is built (``p.data``; the model keeps its ``Parameter`` objects), and a step is one
``torch.cat`` of the gradients plus torch's fused AdamW over the flat tensor. The flat tensor
is a leaf that requires grad: a step that takes it as its input (``flat.split`` into the
parameters' shapes, e.g. through ``torch.func.functional_call``) leaves the whole gradient in
``flat.grad``, and the gather is skipped.

Semantics are torch's AdamW (decoupled weight decay), element by element, with one difference:
a parameter with no gradient in a step is left as it was (value and moments, as torch skips
it), but the step count is one for all, so a parameter that first gets a gradient late starts
with the others' bias correction rather than its own. The trainer's objectives reach the same
parameters in every step, so it never arises there.

``state_dict`` holds the flat moments as three tensors (a checkpoint pickles three tensors, not
three per parameter: 3 ms less per save on the main job); :meth:`FlatAdamW.torch_state_dict`
gives torch AdamW's per-parameter layout, and :meth:`FlatAdamW.load_state_dict` reads either,
so checkpoints written with ``torch.optim.AdamW`` resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["FlatAdamW", "flat_adamw_supported"]


def flat_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether :class:`FlatAdamW` can hold ``params``: floating point, one dtype and one
    device of a kind torch's fused AdamW runs on (CPU, CUDA)."""
    if not params:
        return False
    first = params[0]
    return all(
        p.is_floating_point()
        and p.dtype == first.dtype
        and p.device == first.device
        and p.device.type in ("cpu", "cuda")
        for p in params
    )


class FlatAdamW:
    """AdamW whose parameters are views of one flat tensor, stepped by one fused kernel.

    Args:
        params: the parameters (all one floating dtype, one CPU or CUDA device; see
            :func:`flat_adamw_supported`). Their data moves into the flat storage now.
        lr, betas, eps, weight_decay: as :class:`torch.optim.AdamW`. ``param_groups[0]``
            holds them; a change there (e.g. of ``"lr"``) applies from the next step.

    Raises:
        ValueError: ``params`` mixes dtypes or devices, or is empty.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        self.params = list(params)
        if not flat_adamw_supported(self.params):
            raise ValueError(
                "FlatAdamW: params must be non-empty, floating point, of one dtype and on one "
                "CPU or CUDA device"
            )
        sizes = [p.numel() for p in self.params]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        first = self.params[0]
        self.flat = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for p, view in zip(self.params, self._views(self.flat), strict=True):
                view.copy_(p)
                p.data = view  # the same Parameter object, now a view of the flat storage
        self.flat.requires_grad_(True)  # a leaf: a step that reads it leaves flat.grad
        self._grad = torch.empty_like(self.flat)
        self._opt = torch.optim.AdamW(
            [self.flat], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True
        )
        self.param_groups = self._opt.param_groups
        self._exp_avg = torch.zeros_like(self.flat)
        self._exp_avg_sq = torch.zeros_like(self.flat)
        # fused AdamW keeps its step count as an fp32 scalar on the parameter's device
        step = torch.zeros((), dtype=torch.float32, device=self.flat.device)
        self._opt.state[self.flat] = {
            "step": step,
            "exp_avg": self._exp_avg,
            "exp_avg_sq": self._exp_avg_sq,
        }
        self._stepped = [False] * len(self.params)  # has had a gradient (has state)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` cut into the parameters' shapes, in order."""
        return [
            flat[s : s + p.numel()].view_as(p)
            for s, p in zip(self._starts, self.params, strict=True)
        ]

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW update of every parameter with a gradient (or, when ``flat.grad`` is set,
        of every parameter, with that gradient).

        Raises:
            ValueError: both ``flat.grad`` and a parameter's own gradient are set, or a
                gradient is sparse or of another dtype.
        """
        if self.flat.grad is not None:
            self._step_flat()
            return
        grads = [p.grad for p in self.params]
        missing = [i for i, g in enumerate(grads) if g is None]
        if len(missing) == len(grads):
            return  # torch's AdamW does nothing without gradients either
        for i, g in enumerate(grads):
            if g is None:
                grads[i] = torch.zeros_like(self.params[i])
            elif g.dtype != self.flat.dtype or g.is_sparse:
                raise ValueError(
                    f"FlatAdamW: the gradient of parameter {i} is {g.dtype}"
                    f"{' sparse' if g.is_sparse else ''}, expected dense {self.flat.dtype}"
                )
        # parameters without a gradient are left as they are, as torch skips them (moments
        # that never moved are zeros, which a zero gradient keeps: only the value to restore)
        kept = [
            [t.clone() for t in self._slices(i)[: 3 if self._stepped[i] else 1]] for i in missing
        ]
        torch.cat([g.reshape(-1) for g in grads], out=self._grad)
        self.flat.grad = self._grad
        self._opt.step()
        self.flat.grad = None
        for i, saved in zip(missing, kept, strict=True):
            for dst, src in zip(self._slices(i)[: len(saved)], saved, strict=True):
                dst.copy_(src)
        present = set(range(len(grads))) - set(missing)
        self._stepped = [s or i in present for i, s in enumerate(self._stepped)]

    def _step_flat(self) -> None:
        """The step from ``flat.grad``: every parameter has a gradient there (zero where the
        loss did not reach it; the caller takes the flat gradient only where the loss reaches
        every parameter)."""
        given = [i for i, p in enumerate(self.params) if p.grad is not None]
        if given:
            raise ValueError(
                f"FlatAdamW: flat.grad and the gradients of parameters {given} are both set; "
                "a step reads one or the other"
            )
        if self.flat.grad.dtype != self.flat.dtype or self.flat.grad.is_sparse:
            raise ValueError(f"FlatAdamW: flat.grad must be dense {self.flat.dtype}")
        self._opt.step()
        self._stepped = [True] * len(self.params)

    def _slices(self, i: int) -> list[torch.Tensor]:
        """Parameter ``i``'s value and moments: views of the flat tensors."""
        s, n = self._starts[i], self.params[i].numel()
        return [t[s : s + n] for t in (self.flat, self._exp_avg, self._exp_avg_sq)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients and ``flat.grad`` (None, or zeros in place)."""
        for p in (*self.params, self.flat):
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    def state_dict(self) -> dict[str, Any]:
        """The flat state: ``{"state": {"flat": {"step", "exp_avg", "exp_avg_sq", "stepped"}},
        "param_groups": [...]}`` (``stepped``: which parameters have had a gradient)."""
        flat = {
            "step": self._opt.state[self.flat]["step"],
            "exp_avg": self._exp_avg,
            "exp_avg_sq": self._exp_avg_sq,
            "stepped": torch.tensor(self._stepped, dtype=torch.bool),
        }
        return {"state": {"flat": flat}, "param_groups": self._groups()}

    def torch_state_dict(self) -> dict[str, Any]:
        """torch AdamW's layout: per parameter index (those that have had a gradient), its
        ``step`` and moments (views of the flat moments); one param group."""
        step = self._opt.state[self.flat]["step"]
        moments = zip(self._views(self._exp_avg), self._views(self._exp_avg_sq), strict=True)
        state = {
            i: {"step": step, "exp_avg": m, "exp_avg_sq": v}
            for i, (m, v) in enumerate(moments)
            if self._stepped[i]
        }
        return {"state": state, "param_groups": self._groups()}

    def _groups(self) -> list[dict[str, Any]]:
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return [{**group, "params": list(range(len(self.params)))}]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s or :meth:`torch_state_dict`'s output, or a
        ``torch.optim.AdamW`` state dict over the same parameters in the same order.

        Raises:
            ValueError: the state is for other parameters (an index or shape that does not
                fit) or its parameters' step counts differ.
        """
        entries = state_dict["state"]
        if "flat" in entries:
            self._load_flat(entries["flat"])
        else:
            self._load_per_parameter(entries)
        for key in ("lr", "betas", "eps", "weight_decay"):
            groups = state_dict.get("param_groups") or [{}]
            if key in groups[0]:
                self.param_groups[0][key] = groups[0][key]

    def _load_flat(self, flat: dict[str, Any]) -> None:
        stepped = flat["stepped"].tolist()
        for name in ("exp_avg", "exp_avg_sq"):
            if flat[name].shape != self.flat.shape or len(stepped) != len(self.params):
                raise ValueError(
                    f"FlatAdamW.load_state_dict: {name} has shape {tuple(flat[name].shape)} for "
                    f"{len(stepped)} parameters, expected {tuple(self.flat.shape)} for "
                    f"{len(self.params)}"
                )
        with torch.no_grad():
            self._exp_avg.copy_(flat["exp_avg"])
            self._exp_avg_sq.copy_(flat["exp_avg_sq"])
            self._opt.state[self.flat]["step"].fill_(float(flat["step"]))
        self._stepped = [bool(s) for s in stepped]

    def _load_per_parameter(self, entries: dict[Any, Any]) -> None:
        steps = {float(e["step"]) for e in entries.values()}
        if len(steps) > 1:
            raise ValueError(
                f"FlatAdamW.load_state_dict: the parameters' step counts differ ({sorted(steps)})"
                "; one flat optimizer keeps one"
            )
        with torch.no_grad():
            self._exp_avg.zero_()
            self._exp_avg_sq.zero_()
            ms, vs = self._views(self._exp_avg), self._views(self._exp_avg_sq)
            stepped = [False] * len(self.params)
            for key, entry in entries.items():
                i = int(key)
                if not 0 <= i < len(self.params):
                    raise ValueError(
                        f"FlatAdamW.load_state_dict: state for parameter {i}, but there are "
                        f"{len(self.params)}"
                    )
                for dst, name in ((ms[i], "exp_avg"), (vs[i], "exp_avg_sq")):
                    if entry[name].shape != dst.shape:
                        raise ValueError(
                            f"FlatAdamW.load_state_dict: {name} of parameter {i} has shape "
                            f"{tuple(entry[name].shape)}, expected {tuple(dst.shape)}"
                        )
                    dst.copy_(entry[name])
                stepped[i] = True
            self._opt.state[self.flat]["step"].fill_(steps.pop() if steps else 0.0)
        self._stepped = stepped
