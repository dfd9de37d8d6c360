"""``Trainer``: mini-batch training of OmniFuse and the baselines, with bit-exact resume.

One epoch: a seeded shuffle, AdamW steps on the objective of the method, the TLA miner fed
every training batch and mined at the epoch's end, a validation pass, an atomic checkpoint
(written on a background thread while the next epoch trains; :meth:`Trainer.fit` returns
once it is on disk).
Everything random (the shuffle generator, the mixer's generator, the global torch / numpy /
python states that drive the imputer's supervision drop) is in the checkpoint, so training
N epochs straight and training k, stopping and resuming to N give the same bits on CPU.

One step path (:meth:`Trainer._step`) serves one process and a ``torchrun`` job alike: one
process is world size 1, whose shard of each global batch is the whole batch. Under
``torchrun`` (``WORLD_SIZE > 1``) the trainer joins the process group and trains with
DistributedDataParallel on contiguous shards of each global batch: the same steps as one
process with the same ``batch_size`` (see :mod:`omnifuse_fast.train.distributed`). Rank 0
alone logs, checkpoints and writes the outputs.

Every step's loss terms of eq. 18 are checked for non-finite values: by default before its
update (one device sync per step), or every ``check_every`` steps with no sync in between. A
bad term stops training with :class:`NonFiniteLossError`, naming the step and the term
(:mod:`omnifuse_fast.train.finite`). ``compile=True`` runs the step's forward and losses
through ``torch.compile`` (the backward through AOT autograd), on this same path;
``precision="bf16"`` runs them under ``torch.autocast`` (parameters, gradients and AdamW
stay fp32; evaluation runs in fp32).

Throughput: the result reports the steady-state ``ms_per_step`` and ``samples_per_s`` of this
process's training loop (:func:`steady_state`): the median over its epochs after the first,
which holds the compilation and warm-up.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_fast import _dispatch
from omnifuse_fast._checks import refuses_nonfinite
from omnifuse_fast.nn import MIMOBalancer, ModalityMixer, OmniFuse
from omnifuse_fast.nn.dwfuse import joint_cross_entropy
from omnifuse_fast.nn.imputer import drop_with
from omnifuse_fast.ops import soft_cross_entropy
from omnifuse_fast.train.checkpoint import (
    CHECKPOINT,
    FORMAT,
    CheckpointWriter,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from omnifuse_fast.train.config import TrainConfig
from omnifuse_fast.train.distributed import (
    DistContext,
    DistributedMIMOBalancer,
    rank_share,
    setup,
    teardown,
)
from omnifuse_fast.train.finite import (
    FiniteMonitor,
    NonFiniteLossError,
    diagnose,
)
from omnifuse_fast.train.flat_adamw import FlatAdamW, flat_adamw_supported
from omnifuse_fast.train.metrics import accuracy, macro_auroc, write_metrics
from omnifuse_fast.train.schedule import select_strong

__all__ = [
    "NonFiniteLossError",
    "Trainer",
    "build_model",
    "load_data",
    "make_optimizer",
    "steady_state",
]

EVAL_BATCH = 1024
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}  # TrainConfig.precision -> autocast dtype


def steady_state(
    epochs: list[tuple[int, int, float]], epoch_seconds: list[float] | None = None
) -> dict[str, float | int | None]:
    """Steady-state throughput from ``(steps, samples, seconds)`` per epoch of training loop,
    and (``epoch_seconds``) the steady-state time of a whole epoch.

    The first epoch a process runs is left out: it holds ``torch.compile``'s compilation
    (and the recompile of the last partial batch), first-call allocations and lazy
    initialization. Over the other epochs the median of each epoch's own rate is taken, so
    that a later one-off cost (MM learning's stage 2 compiling its mixing step) does not
    count either. Fewer than two epochs: no steady state (``None``). A whole epoch
    (``epoch_s``) is its training loop, the TLA mining, validation and the checkpoint's
    hand-off: the median over the same epochs.

    Returns:
        ``{"ms_per_step", "samples_per_s", "steady_epochs"}``, and ``"epoch_s"`` when
        ``epoch_seconds`` is given.
    """
    steady = [(n, b, t) for n, b, t in epochs[1:] if n > 0 and t > 0]
    whole = {}
    if epoch_seconds is not None:
        later = epoch_seconds[1:]
        whole = {"epoch_s": round(statistics.median(later), 4) if later else None}
    if not steady:
        return {"ms_per_step": None, "samples_per_s": None, "steady_epochs": 0, **whole}
    return {
        "ms_per_step": round(statistics.median(1e3 * t / n for n, _, t in steady), 4),
        "samples_per_s": round(statistics.median(b / t for _, b, t in steady), 2),
        "steady_epochs": len(steady),
        **whole,
    }


def _predict(model: torch.nn.Module, views: list[torch.Tensor], observed: torch.Tensor):
    """The evaluation's forward, ``model.predict_proba`` (compiled under ``compile=True``).
    The model is an argument, not bound: a trainer's model may be replaced after it is built
    (the experiments' baselines are)."""
    return model.predict_proba(views, observed)


def _add_usage(into: dict[str, set[str]]) -> None:
    """Fold the dispatcher's usage record since its last reset into ``into`` (per op family,
    the backends that ran)."""
    for family, used in _dispatch.backend_usage().items():
        into.setdefault(family, set()).update(used.split("+"))


def _joined(used: dict[str, set[str]]) -> dict[str, str]:
    """Per op family (in :data:`_dispatch.FAMILIES` order), the backends that ran ("a+b")."""
    return {f: "+".join(sorted(used[f])) for f in _dispatch.FAMILIES if f in used}


def _skip_guard_stance() -> Callable[[], Any] | None:
    """``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` as a factory of context
    managers, or None where this torch has no such stance."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return None
    if "skip_guard_eval_unsafe" not in inspect.signature(set_stance).parameters:
        return None
    return functools.partial(set_stance, skip_guard_eval_unsafe=True)


_SKIP_GUARDS = _skip_guard_stance()


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> FlatAdamW | torch.optim.AdamW:
    """AdamW over ``model``'s parameters with the config's settings.

    :class:`~omnifuse_fast.train.flat_adamw.FlatAdamW` where it can hold them (one floating
    dtype on one CPU or CUDA device): the trainable parameters become views of one flat
    tensor and a step is one fused kernel over it (frozen ones are left out). On the main
    job's 60 tensors that is 0.39 ms a step plus a 0.19 ms gather of the gradients (none
    when the compiled step takes the flat tensor) on the 2-core CPU, against 0.84 ms for
    torch's fused AdamW per tensor (3.1 ms for ``foreach``; benchmarks/NOTES.md). Elsewhere,
    torch's AdamW (``foreach``).
    """
    params = list(model.parameters())
    # frozen parameters (e.g. FrozenTextEncoder's backbone) never step: not in the flat tensor
    trainable = [p for p in params if p.requires_grad]
    if flat_adamw_supported(trainable):
        return FlatAdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)


@contextlib.contextmanager
def _swapped_parameters(model: torch.nn.Module, flat: torch.Tensor):
    """``model``'s parameters replaced by views of ``flat`` (split in ``parameters()`` order,
    every place a shared parameter sits) for the duration. A plain swap in the modules'
    ``_parameters``: dynamo traces it in about half the time ``torch.func.functional_call``'s
    reparametrization takes (the main job's first epoch: +1.2 s against +2.3 s, NOTES)."""
    params = list(model.parameters())
    pieces = flat.split([p.numel() for p in params])
    views = {id(p): t.view(p.shape) for p, t in zip(params, pieces, strict=True)}
    slots = [
        (module, name, p)
        for module in model.modules()
        for name, p in module._parameters.items()
        if p is not None
    ]
    for module, name, p in slots:
        module._parameters[name] = views[id(p)]
    try:
        yield
    finally:
        for module, name, p in slots:
            module._parameters[name] = p


class _ShardStep(torch.nn.Module):
    """What DDP wraps: the model, and a forward that is one rank's weighted step loss."""

    def __init__(self, model: OmniFuse, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, *args: Any) -> Any:
        return self._fn(*args)


def build_model(
    config: TrainConfig, view_dims: list[int], num_classes: int, multilabel: bool = False
) -> OmniFuse:
    """The model a config describes (the baselines switch every OmniFuse component off)."""
    return OmniFuse(
        view_dims,
        num_classes,
        dim=config.dim,
        hidden=config.hidden,
        num_blocks=config.num_blocks,
        encoder_hidden=config.encoder_hidden,
        head_hidden=config.head_hidden,
        drop_rate=config.drop_rate,
        alpha=config.alpha,
        beta=config.beta,
        lambdas=config.lambdas,
        use_dwfuse=config.use_dwfuse,
        use_tla=config.use_tla,
        use_imp_forward=config.use_imp_forward,
        use_imp_backward=config.use_imp_backward,
        tla_mode=config.tla_mode,
        backend=config.backend,
        multilabel=multilabel,
    )


def load_data(config: TrainConfig) -> dict[str, Any]:
    """The built-in data with the config's corruption (missing rate, noise)."""
    from omnifuse_fast.data import prepare_mfeat
    from omnifuse_fast.data.corruption import corrupt_for_config

    splits = prepare_mfeat(
        missing_rate=config.missing_rate,
        noise_views=config.noise_views,
        noise_std=config.noise_std,
        seed=config.seed,
    )
    return corrupt_for_config(splits, config)  # --corruption (none: unchanged)


class Trainer:
    """Train one model on ``{"train", "val", "test"}`` splits (``MultiViewSplit``-like).

    Args:
        config: the run.
        out_dir: where checkpoints, ``metrics.json`` and the curve go (None: nowhere).
        splits: the data; None loads the built-in data as the config says.
        progress: show a tqdm bar over epochs (only on a TTY).
        log: called with one line per epoch (e.g. ``print`` to stderr); None: silent.
        distributed: this rank's place in a job; None reads ``torchrun``'s environment
            (and initializes the process group when ``WORLD_SIZE > 1``).
        check_finite: stop with :class:`NonFiniteLossError` at the first non-finite loss
            term (on by default; one device sync every ``config.check_every`` steps).
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        splits: dict[str, Any] | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        distributed: DistContext | None = None,
        check_finite: bool = True,
    ) -> None:
        self.config = config
        self.out_dir = None if out_dir is None else Path(out_dir)
        if distributed is None:
            self.dist, self.device = setup(config.device)
        else:
            self.dist, self.device = distributed, torch.device(config.device)
        if not self.dist.is_main:  # one voice: rank 0 logs
            progress, log = False, None
        self.progress, self.log = progress, log
        self.check_finite = check_finite
        self._seed_everything(config.seed)
        splits = load_data(config) if splits is None else splits
        self.splits = {k: self._to_device(v) for k, v in splits.items()}
        train = self.splits["train"]
        self.view_dims = [int(x.shape[1]) for x in train.views]
        self.num_classes = int(train.num_classes)
        multilabel = train.labels.dim() == 2  # float [N, C] indicators
        self.model = build_model(config, self.view_dims, self.num_classes, multilabel)
        self.model = self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, config)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.mixer = ModalityMixer(len(self.view_dims), self.num_classes, seed=config.seed + 1)
        self.mixer.backend = config.backend
        self.balancer: MIMOBalancer | None = None
        if config.method == "mimo":
            shared, heads, fusion = self.model.parameter_groups()
            kind = DistributedMIMOBalancer if self.dist.enabled else MIMOBalancer
            self.balancer = kind(shared, heads, fusion, config.mimo_mode, config.backend)
        self.finite = FiniteMonitor(config.check_every)
        self._writer = CheckpointWriter()
        self._autocast = AUTOCAST[config.precision]
        # the step's forward and losses, and the evaluation's forward, compiled when asked
        self._loss_fn = self._compile(self._losses) if config.compile else self._losses
        self._proba_fn = self._compile(_predict, training=False) if config.compile else _predict
        self.ddp: torch.nn.Module | None = None
        if self.dist.enabled:
            self.ddp = self._wrap_ddp()
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.pool: torch.Tensor | None = None  # MM learning's selected samples (stage 2)
        self.best: dict[str, Any] | None = None
        self.train_seconds = 0.0
        # per op family, the backends that ran in this process's training steps and
        # evaluations (a compiled graph's are recorded when it is traced)
        self.backends_train: dict[str, set[str]] = {}
        self.backends_eval: dict[str, set[str]] = {}
        # (steps, global samples, seconds) of each epoch's training loop in this process
        self.loop_times: list[tuple[int, int, float]] = []
        self.epoch_times: list[float] = []  # each whole epoch in this process (fit's)
        self._bar: Any = None
        # batch sizes whose compiled step has passed all of dynamo's guards in this epoch's
        # loop; None outside the loop (every guard is checked): see _guards
        self._checked_sizes: set[int] | None = None
        # the optimizer's flat parameter tensor when the compiled step takes it as its input,
        # for the (model, optimizer) pair it was decided for: see _flat_input
        self._flat: tuple[tuple[int, int], torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ setup
    def _compile(self, fn: Callable[..., Any], training: bool = True) -> Callable[..., Any]:
        """``torch.compile`` of the step's forward and losses (``training``), or of the
        evaluation's forward.

        The step: inductor with static shapes, one graph specialized to the batch size and
        one to the last partial batch (automatic dynamic shapes would trace a slower symbolic
        graph at that recompile and run it for every later step). On CPU its kernels are
        called from generated C++ instead of Python (``cpp_wrapper``): the main job's step is
        10% faster (benchmarks/NOTES.md), for a longer first compile (cached on disk for
        later runs). The evaluation runs once an epoch: torch.compile's defaults (a second
        split size recompiles once with a dynamic batch size, later sizes reuse it).
        """
        if not training:
            return torch.compile(fn)
        if self.device.type == "cpu":
            return torch.compile(fn, dynamic=False, options={"cpp_wrapper": True})
        return torch.compile(fn, dynamic=False)

    def _guards(self, batch_size: int) -> contextlib.AbstractContextManager[Any]:
        """How much of dynamo's guard check the compiled step runs for this batch size.

        The full check (~0.4 ms a step on the main job's 2,000-node guard tree, measured in
        benchmarks/NOTES.md) runs for each batch size's first step of an epoch's loop: a
        change to the model or trainer since the last epoch recompiles there as usual. Later
        steps of the same size in the same loop check only the guards that tell the cached
        graphs apart (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``). That is
        safe here because between two steps of one loop only the loop itself runs, and it
        changes tensor values (the update, the miner's sums, the random states), never what
        a graph was specialized on.
        """
        checked = self._checked_sizes
        if not self.config.compile or checked is None or _SKIP_GUARDS is None:
            return contextlib.nullcontext()
        if batch_size not in checked:
            checked.add(batch_size)
            return contextlib.nullcontext()
        return _SKIP_GUARDS()

    def _wrap_ddp(self) -> torch.nn.Module:
        """DistributedDataParallel over the step (the ranks start from rank 0's weights)."""
        from torch.nn.parallel import DistributedDataParallel

        model = self.model
        # Parameters no loss term reaches: the unimodal heads without DWFuse, the backward
        # cascade without IMP-backward. DDP must know, or it waits for their gradients.
        imputer = model.imputer
        unused = not model.use_dwfuse or (imputer is not None and not imputer.use_backward)
        # The miner's buffers are per-rank sums (all-reduced at mining): never synced in forward.
        # Newer torch renames broadcast_buffers (init sync is harmless: all ranks hold zeros or
        # the same checkpoint).
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        return DistributedDataParallel(
            _ShardStep(model, self._loss_fn),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=unused,
            **{sync: False},
        )

    def close(self) -> None:
        """Leave the distributed job: wait for every rank, destroy the group if we made it."""
        teardown(self.dist)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def _to_device(self, split: Any) -> Any:
        if self.device.type == "cpu":
            return split
        moved = copy.copy(split)
        moved.views = [v.to(self.device) for v in split.views]
        moved.labels = split.labels.to(self.device)
        moved.observed = split.observed.to(self.device)
        return moved

    @classmethod
    def resume(
        cls,
        out_dir: str | Path,
        epochs: int | None = None,
        splits: dict[str, Any] | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Trainer:
        """Rebuild a run from ``out_dir/checkpoint.pt``; ``epochs`` extends (or sets) its end."""
        state = load_checkpoint(Path(out_dir) / CHECKPOINT)
        values = dict(state["config"])
        if epochs is not None:
            values["epochs"] = epochs
        trainer = cls(TrainConfig.from_dict(values), out_dir, splits, progress, log)
        trainer.load_state_dict(state)
        if trainer.dist.is_main:  # a write killed mid-way leaves its temporary file behind
            remove_stale_temporaries(out_dir)
        return trainer

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs."""
        return {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "mixer": self.mixer.state_dict(),
            "shuffle": self.shuffle.get_state(),
            "rng": rng_state(),
            "history": self.history,
            "pool": self.pool,
            "best": self.best,
            "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.mixer.load_state_dict(state["mixer"])
        self.shuffle.set_state(state["shuffle"])
        set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.pool = state.get("pool")
        self.best = state.get("best")
        self.train_seconds = float(state.get("train_seconds", 0.0))

    def _checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT

    def save(self, wait: bool = True) -> Path | None:
        """Write the checkpoint atomically (nothing without ``out_dir``, or off rank 0).

        ``wait=False`` (each epoch's checkpoint in :meth:`fit`) returns once the state is
        serialized and leaves the write to a background thread, overlapping the next epoch;
        :meth:`wait_saved` waits for it (``fit`` does before it returns or raises).
        """
        path = self._checkpoint_path()
        if path is None or not self.dist.is_main:
            return None
        self._writer.submit(self.state_dict(), path)
        if wait:
            self._writer.wait()
        return path

    def wait_saved(self) -> None:
        """Block until the last checkpoint is on disk; raise its write's error, if any."""
        self._writer.wait()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_proba(self, split: Any) -> torch.Tensor:
        """``softmax(o)`` for every sample of ``split``, in batches, eval mode (compiled
        under ``compile=True``)."""
        _dispatch.reset_backend_usage()
        chunks = []
        for i in range(0, len(split), EVAL_BATCH):
            idx = torch.arange(i, min(i + EVAL_BATCH, len(split)))
            views = [v[idx] for v in split.views]
            chunks.append(self._proba_fn(self.model, views, split.observed[idx]))
        _add_usage(self.backends_eval)
        return torch.cat(chunks).cpu()

    def evaluate(self, split: Any) -> dict[str, float]:
        """Accuracy and macro one-vs-rest AUROC on ``split``."""
        proba = self.predict_proba(split)
        labels = split.labels.cpu()
        return {"accuracy": accuracy(proba, labels), "auroc": macro_auroc(proba, labels)}

    # ------------------------------------------------------------------ training
    def _batch(self, split: Any, idx: torch.Tensor):
        return [v[idx] for v in split.views], split.observed[idx], split.labels[idx]

    def _mix_pick(self, batch_size: int) -> torch.Tensor:
        """Positions in the pool of the samples one step mixes (the shuffle generator)."""
        assert self.pool is not None
        return torch.randint(len(self.pool), (batch_size,), generator=self.shuffle)

    def _mix_rows(self, pick: torch.Tensor, rows: slice) -> torch.Tensor:
        """MM learning: mix the picked pool samples (the whole global batch: mixing crosses
        samples), then the soft CE of the joint head on the mixed ``rows`` (this rank's)."""
        assert self.pool is not None
        train = self.splits["train"]
        views, observed, labels = self._batch(train, self.pool[pick].to(self.device))
        out = self.model(views, observed, present=observed)  # no drop: mix what was observed
        v_mix, soft = self.mixer(out.v_full, labels)
        return soft_cross_entropy(
            self.model.joint_logits_from_embeddings(v_mix[rows]),
            soft[rows],
            backend=self.config.backend,
        )

    def _select_pool(self) -> None:
        train = self.splits["train"]
        proba = self.predict_proba(train)
        p_true = proba.gather(1, train.labels.cpu().view(-1, 1)).squeeze(1)
        cfg = self.config
        self.pool = select_strong(p_true, cfg.mm_tau, cfg.mm_top_fraction, minimum=2)
        if self.dist.enabled:  # identical by construction; rank 0's copy makes it certain
            holder = [self.pool]
            torch.distributed.broadcast_object_list(holder, src=0)
            self.pool = holder[0]
        self._say(f"MM learning: stage 2 mixes {len(self.pool)} of {len(train)} samples")

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training split; returns the mean loss terms.

        Raises:
            NonFiniteLossError: a loss term is NaN or infinite (checked before the update).
        """
        cfg, model, train = self.config, self.model, self.splits["train"]
        model.train()
        stage2 = cfg.method == "mm" and self.pool is not None
        # drawn on the CPU generator (resume), moved once: the steps index on the device
        order = torch.randperm(len(train), generator=self.shuffle).to(self.device)
        names: list[str] = []
        sums: torch.Tensor | None = None  # fp64, the logged terms summed over the steps
        batches = 0
        _dispatch.reset_backend_usage()  # what runs in these steps (not in validation)
        self._sync()
        start_time = time.perf_counter()
        self._checked_sizes = set()
        try:
            for step, start in enumerate(range(0, len(train), cfg.batch_size)):
                batch = order[start : start + cfg.batch_size]
                names, values = self._train_step(batch, stage2, step)
                sums = values if sums is None else sums + values  # on the device: no sync
                batches += 1
        finally:  # train_step outside this loop checks every guard
            self._checked_sizes = None
        if self.check_finite:  # before the epoch's checkpoint
            self.finite.flush(self._checkpoint_path())
        self._sync()
        self.loop_times.append((batches, len(train), time.perf_counter() - start_time))
        _add_usage(self.backends_train)
        if sums is None:
            return {}
        return dict(zip(names, (sums / max(batches, 1)).tolist()))

    def _sync(self) -> None:
        """Wait for the device (CUDA): the loop's timing brackets its work, not its launches."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(
        self, batch: torch.Tensor, stage2: bool = False, step: int = 0
    ) -> dict[str, torch.Tensor]:
        """One optimizer step on the global batch ``batch`` (indices into the training split):
        forward and losses with the TLA miner's update (one compiled region under
        ``compile=True``), the finiteness check when due, backward, AdamW. ``stage2``: MM
        learning's mixing step; ``step``: the position in the epoch (for error messages).
        Returns the logged loss terms (fp64), on the device (no host sync).

        Raises:
            NonFiniteLossError: a loss term is NaN or infinite (checked before the update
                when ``check_every`` is 1), or an op refused non-finite values.
        """
        names, values = self._train_step(batch, stage2, step)
        return dict(zip(names, values.unbind()))

    def _train_step(
        self, batch: torch.Tensor, stage2: bool, step: int
    ) -> tuple[list[str], torch.Tensor]:
        """:meth:`train_step`, returning the logged terms' names and their fp64 values as one
        vector (the epoch sums it with one add per step)."""
        try:
            names, values = self._step(batch, stage2, step)
        except (ValueError, RuntimeError) as exc:  # e.g. an op refusing inf embeddings
            if not (self.check_finite and refuses_nonfinite(exc)):
                raise
            try:  # a bad loss in an unchecked earlier step explains it best
                self.finite.flush(self._checkpoint_path())
            except NonFiniteLossError as err:
                raise err from exc
            raise diagnose(self.model, exc, self.epoch, step, self._checkpoint_path()) from exc
        self.optimizer.step()
        return names, values

    def _drop_rate(self) -> float:
        """The imputer's supervision drop rate; 0 for a model without an imputer (it is fed
        what was observed)."""
        imputer = getattr(self.model, "imputer", None)
        if imputer is None or not (imputer.use_forward or imputer.use_backward):
            return 0.0
        return float(imputer.drop_rate)

    def _draw(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The supervision drop's uniform draw for a whole global batch (the global RNG, as
        :func:`~omnifuse_fast.nn.imputer.supervision_drop` draws it), so that every rank can
        take its slice; None when nothing is dropped (no draw)."""
        if self._drop_rate() <= 0.0:
            return None
        shape = (len(batch), len(self.view_dims))
        return torch.rand(shape, device=self.device)

    def _present(self, batch: torch.Tensor, draw: torch.Tensor | None, rows: slice):
        """This rank's rows of the global batch's ``present`` (the drop applied to ``draw``)."""
        observed = self.splits["train"].observed[batch]
        if draw is not None:
            observed = drop_with(observed, draw, self._drop_rate())
        return observed[rows]

    def _step(self, batch: torch.Tensor, stage2: bool, step: int) -> tuple[list[str], torch.Tensor]:
        """One global batch: this rank's forward (with the TLA miner's update), the finiteness
        check, backward (no optimizer step). One process is world size 1: its shard is the
        whole batch.

        Returns the logged terms' names and their fp64 values ``[T]`` (detached).
        """
        local, rows = self.dist.shard(batch)
        real = len(local) > 0
        if not real:  # fewer samples than ranks: a zero-weight stand-in keeps DDP in step
            local, rows = batch[:1], slice(0, 1)
        draw = self._draw(batch)
        pick = self._mix_pick(len(batch)) if stage2 else None
        self.optimizer.zero_grad(set_to_none=True)
        args = (local.to(self.device), batch.to(self.device), draw, real, pick, rows)
        flat = self._flat_input()
        if flat is not None:
            args = (*args, flat)
        # MIMO writes .grad itself (from all-reduced gradients): not through DDP's hooks
        losses = self.ddp if self.ddp is not None and self.balancer is None else self._loss_fn
        with self._guards(len(batch)):
            loss, per_modality, names, values, logged = losses(*args)
        if self.check_finite:  # no sync until check_every steps are due
            self.finite.add(names, values, self.epoch, step, self._checkpoint_path())
        names, values = names[:logged], values[:logged]
        if self.balancer is not None:
            world = self.dist.world_size  # each rank's share sums to the global loss
            mimo = self.balancer.backward(loss / world, [m / world for m in per_modality])
            lam = mimo.weights[0].to(self.device, torch.float64).reshape(1)
            # the objective stays last
            names = [*names[:-1], "mimo_lambda", names[-1]]
            values = torch.cat([values[:-1], lam, values[-1:]])
        else:
            loss.backward()
        return names, values

    def _losses(self, idx, batch, draw, real, pick, rows, flat=None):
        """The step's loss on this rank, what it logs and checks; the TLA miner's update.

        ``idx``: this rank's rows of the training split; ``batch``: the global batch's, with
        ``draw`` the supervision drop's draw for it (None: no drop). Returns ``(loss, MIMO's
        per-modality losses or None, names of the terms to check, their fp64 values [T]
        (detached), how many of them (the first) are logged)``: one vector, so that the
        finiteness check and the epoch's sums cost one op each. With several ranks each term
        is reweighted to this rank's share of the global batch
        (:func:`~omnifuse_fast.train.distributed.rank_share`) and logged with its global
        value. Under ``precision="bf16"`` the forward and losses run in ``torch.autocast``
        (inside the compiled region when compiled; the backward then follows the forward's
        dtypes). ``flat``: the optimizer's flat parameter tensor, split into the model's
        parameters for this call (:meth:`_flat_input`), or None (the model's own).
        """
        views, observed, labels = self._batch(self.splits["train"], idx)
        present = self._present(batch, draw, rows)
        body = (views, observed, labels, present, real, pick, rows)
        with self._parameters_from(flat):
            if self._autocast is None:
                result, out = self._losses_body(*body)
            else:
                with torch.autocast(self.device.type, dtype=self._autocast):
                    result, out = self._losses_body(*body)
        if self.model.use_tla and real:  # the miner reads this batch's (detached) output
            with torch.no_grad():
                self.model.tla_observe(out, observed, labels)
        return result

    def _losses_body(self, views, observed, labels, present, real, pick, rows):
        cfg, model = self.config, self.model
        out = model(views, observed, labels, present=present)
        terms = dict(out.losses)
        if pick is not None:
            terms["mix"] = self._mix_rows(pick, rows)
        modalities = []  # MIMO's unimodal losses (BCE when multilabel)
        if self.balancer is not None:
            modalities = [f"modality {m}" for m in range(model.num_modalities)]
            for m, name in enumerate(modalities):
                terms[name] = joint_cross_entropy(out.modality_logits[:, m].float(), labels)
        if self.dist.enabled:
            values, terms = rank_share(model, out, observed, terms, real)
        else:  # world size 1: every share is the whole term
            values = {k: v.detach() for k, v in terms.items()}
        loss, objective = terms["total"], values["total"]
        if pick is not None:
            loss = cfg.mm_mu * terms["mix"] + (1.0 - cfg.mm_mu) * loss
            objective = cfg.mm_mu * values["mix"] + (1.0 - cfg.mm_mu) * objective
        logged = {k: values[k] for k in out.losses}  # the model's keys, in its order
        if pick is not None:
            logged["mix"] = values["mix"]
        logged["objective"] = objective
        per_modality = [terms[k] for k in modalities] or None
        checked = {**logged, **{k: values[k] for k in modalities}}
        stacked = torch.stack([v.detach().double().reshape(()) for v in checked.values()])
        detached = out._replace(
            **{f: v.detach() for f, v in zip(out._fields, out) if torch.is_tensor(v)}, losses={}
        )
        return (loss, per_modality, list(checked), stacked, len(logged)), detached

    def _parameters_from(self, flat: torch.Tensor | None) -> contextlib.AbstractContextManager:
        """The model's parameters as views of ``flat`` (split in order) for the duration, or
        its own (``flat`` None). The split's backward is one concatenation in the compiled
        graph, so the gradient reaches ``flat.grad`` whole."""
        if flat is None:
            return contextlib.nullcontext()
        return _swapped_parameters(self.model, flat)

    def _flat_input(self) -> torch.Tensor | None:
        """The optimizer's flat parameter tensor when the compiled step takes the parameters as
        that one input, else None.

        Then the backward hands AdamW one gradient: no per-parameter accumulation and no
        gather, and the graph has one parameter input instead of one per tensor (the main
        job's compiled step: 4.61 -> 4.03 ms, benchmarks/NOTES.md). Only under ``compile``
        (eagerly the split would add an op per parameter), with :class:`FlatAdamW` over
        exactly the model's parameters, none of them frozen, without DDP (its hooks are on
        the parameters) or MIMO (it differentiates per parameter), and only if the step's
        loss reaches every
        parameter: the flat gradient holds a zero, not a None, for a parameter it does not
        reach, and AdamW would then decay that parameter where torch's AdamW skips it. Decided
        once per (model, optimizer): the experiments replace both after construction.
        """
        key = (id(self.model), id(self.optimizer))
        if self._flat is None or self._flat[0] != key:
            opt = self.optimizer
            params = list(self.model.parameters())
            eligible = (
                self.config.compile
                and isinstance(opt, FlatAdamW)
                and self.ddp is None
                and self.balancer is None
                and len(opt.params) == len(params)
                and all(a is b for a, b in zip(opt.params, params, strict=True))
                and all(p.requires_grad for p in params)  # a frozen one stays out of flat.grad
            )
            use = eligible and self._every_parameter_trained()
            self._flat = (key, opt.flat if use else None)
        return self._flat[1]

    def _every_parameter_trained(self) -> bool:
        """Whether the step's loss reaches every parameter: probed once, eagerly, on two
        training rows (no drop, no mixing; the random state and the backend-usage record are
        restored, the miner is not fed)."""
        train = self.splits["train"]
        rows = min(2, len(train))
        views, observed, labels = self._batch(train, torch.arange(rows, device=self.device))
        params = list(self.model.parameters())
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _dispatch.unrecorded(), torch.enable_grad():
            body = self._losses_body(views, observed, labels, observed, True, None, slice(0, rows))
            grads = torch.autograd.grad(body[0][0], params, allow_unused=True)
        return all(g is not None for g in grads)

    def fit(self) -> dict[str, Any]:
        """Train from the current epoch to ``config.epochs``; test; write the outputs."""
        cfg = self.config
        epochs = range(self.epoch, cfg.epochs)
        bar = None
        if self.progress and sys.stderr.isatty() and len(epochs):
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.epochs, initial=self.epoch, desc=cfg.method, unit="epoch")
        self._bar = bar
        try:
            for _ in epochs:
                # each epoch's checkpoint is written while the next one trains
                self._one_epoch(bar, wait_save=False)
                if self._patience_ran_out():
                    self._say(f"early stop: no val AUROC gain in {cfg.patience} epochs")
                    break
        except BaseException:
            with contextlib.suppress(Exception):  # the error in flight is the one to report
                self.wait_saved()
            raise
        finally:
            self._bar = None
            if bar is not None:
                bar.close()
        self.wait_saved()  # the last epoch's checkpoint is on disk when fit ends
        return self.finish()

    def _one_epoch(self, bar: Any, wait_save: bool = True) -> None:
        cfg = self.config
        start = time.perf_counter()
        if cfg.method == "mm" and self.pool is None and self.epoch >= cfg.mm_stage1_epochs:
            self._select_pool()
        terms = self.train_epoch()
        lazy = self.model.miner.mine() if self.model.use_tla else None
        val = self.evaluate(self.splits["val"])
        self.train_seconds += time.perf_counter() - start
        self.epoch += 1
        record = {
            "epoch": self.epoch,
            "train_loss": terms.get("objective", float("nan")),
            "val_accuracy": val["accuracy"],
            "val_auroc": val["auroc"],
            "lazy": lazy,
            "terms": {k: v for k, v in terms.items() if k != "objective"},
        }
        self.history.append(record)
        key = (val["auroc"], val["accuracy"])
        if self.best is None or key > (self.best["val_auroc"], self.best["val_accuracy"]):
            self.best = {
                "epoch": self.epoch,
                "val_auroc": val["auroc"],
                "val_accuracy": val["accuracy"],
                "model": copy.deepcopy(self.model.state_dict()),
            }
        self.save(wait=wait_save)
        self.epoch_times.append(time.perf_counter() - start)
        line = (
            f"epoch {self.epoch}/{cfg.epochs} loss {record['train_loss']:.4f} "
            f"val acc {val['accuracy']:.4f} auroc {val['auroc']:.4f}"
            + (f" lazy {lazy}" if lazy is not None else "")
        )
        if bar is not None:
            bar.set_postfix_str(line.split(" ", 2)[2])
            bar.update(1)
        else:
            self._say(line)

    def _patience_ran_out(self) -> bool:
        """Early stopping: ``config.patience`` epochs since the best validation AUROC."""
        patience = self.config.patience
        if patience is None or self.best is None:
            return False
        return self.epoch - self.best["epoch"] >= patience

    def _say(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)  # above the bar, not through it
        elif self.log is not None:
            self.log(line)

    def finish(self) -> dict[str, Any]:
        """Test the selected model (best val AUROC, or the last) and write the outputs."""
        cfg = self.config
        final_state = None
        if cfg.select_best and self.best is not None:
            final_state = copy.deepcopy(self.model.state_dict())
            self.model.load_state_dict(self.best["model"])
        val = self.evaluate(self.splits["val"])
        test = self.evaluate(self.splits["test"])
        if final_state is not None:  # leave the trainer as training left it
            self.model.load_state_dict(final_state)
        result = {
            "method": cfg.method,
            "missing_rate": cfg.missing_rate,
            "epochs": self.epoch,
            "test_accuracy": test["accuracy"],
            "test_auroc": test["auroc"],
            "val_accuracy": val["accuracy"],
            "val_auroc": val["auroc"],
            "selected_epoch": self.best["epoch"] if cfg.select_best and self.best else self.epoch,
            "seconds": round(self.train_seconds, 3),
            "backend": cfg.backend,  # what was asked for; what ran, per op family:
            "backends_train": _joined(self.backends_train),
            "backends_eval": _joined(self.backends_eval),
            "lazy": self.model.miner.lazy if self.model.use_tla else None,
            "precision": cfg.precision,
            "compile": cfg.compile,
            # steady-state training-loop throughput of this process (see steady_state)
            **steady_state(self.loop_times, self.epoch_times),
        }
        if self.balancer is not None:
            result["mimo_subroutine_seconds"] = round(self.balancer.subroutine_seconds, 6)
        if self.dist.enabled:
            result["world_size"] = self.dist.world_size
        if self.out_dir is not None and self.dist.is_main:
            write_metrics(self.out_dir, result, cfg.to_dict(), self.history)
        return result
