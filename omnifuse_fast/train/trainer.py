"""``Trainer``: mini-batch training of OmniFuse and the baselines, with bit-exact resume.

One epoch: a seeded shuffle, AdamW steps on the objective of the method, the TLA miner fed
every training batch and mined at the epoch's end, a validation pass, an atomic checkpoint.
Everything random (the shuffle generator, the mixer's generator, the global torch / numpy /
python states that drive the imputer's supervision drop) is in the checkpoint, so training
N epochs straight and training k, stopping and resuming to N give the same bits on CPU.

Under ``torchrun`` (``WORLD_SIZE > 1``) the trainer joins the process group and trains with
DistributedDataParallel on contiguous shards of each global batch: the same steps as one
process with the same ``batch_size`` (see :mod:`omnifuse_fast.train.distributed`). Rank 0
alone logs, checkpoints and writes the outputs.

Every step checks the loss terms of eq. 18 for non-finite values (one device sync) and stops
with :class:`NonFiniteLossError`, naming the step and the term, before the bad update.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_fast import _dispatch
from omnifuse_fast.nn import MIMOBalancer, ModalityMixer, OmniFuse
from omnifuse_fast.nn.dwfuse import joint_cross_entropy
from omnifuse_fast.nn.imputer import supervision_drop
from omnifuse_fast.ops import soft_cross_entropy
from omnifuse_fast.train.checkpoint import (
    FORMAT,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from omnifuse_fast.train.config import TrainConfig
from omnifuse_fast.train.distributed import (
    LEAVES,
    DistContext,
    DistributedMIMOBalancer,
    global_terms,
    leaf_counts,
    objective_coefficients,
    setup,
    teardown,
)
from omnifuse_fast.train.metrics import accuracy, macro_auroc
from omnifuse_fast.train.plot import save_training_curve
from omnifuse_fast.train.schedule import select_strong

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVE = "training_curve.png"
EVAL_BATCH = 1024

# What each logged term is, for the non-finite-loss error.
TERM_DOC = {
    "forward": "L_forward, forward imputation (eq. 7)",
    "backward": "L_backward, backward imputation (eq. 8; lambda1 in eq. 18)",
    "enc": "L_enc, DWFuse's weighted unimodal CE (eq. 12, in lambda2 * L_DWFuse)",
    "ra": "L_ra, the joint head's CE (eq. 13, in lambda2 * L_DWFuse)",
    "dwfuse": "L_DWFuse (eq. 14; lambda2 in eq. 18)",
    "ce": "CE of the joint head (the lambda2 term of eq. 18 without DWFuse)",
    "tla": "L_TLA (eq. 17; lambda3 in eq. 18)",
    "total": "L, the joint objective (eq. 18)",
    "mix": "MM learning's soft-label CE on mixed samples",
    "objective": "the step's objective",
}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the term."""


def _temp_checkpoints(out_dir: Path) -> list[Path]:
    """Temporary files a killed :func:`save_checkpoint` left behind in ``out_dir``."""
    return sorted(out_dir.glob(f".{CHECKPOINT}.*.tmp"))


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


def resolved_backend(backend: str, device: torch.device) -> str:
    """The backend ``"auto"`` picks for the CRA op on ``device`` (or ``backend`` itself)."""
    if backend != "auto":
        return backend
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if _dispatch.unavailable_reason("cra_forward", name, device) is None:
            return name
    return "reference"


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
            term (one device sync per step; on by default).
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
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True
        )
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.mixer = ModalityMixer(len(self.view_dims), self.num_classes, seed=config.seed + 1)
        self.mixer.backend = config.backend
        self.balancer: MIMOBalancer | None = None
        if config.method == "mimo":
            shared, heads, fusion = self.model.parameter_groups()
            kind = DistributedMIMOBalancer if self.dist.enabled else MIMOBalancer
            self.balancer = kind(shared, heads, fusion, config.mimo_mode, config.backend)
        self.ddp: torch.nn.Module | None = None
        if self.dist.enabled:
            self.ddp = self._wrap_ddp()
        self.epoch = 0
        self._step_index = 0  # within the epoch, for error messages
        self.history: list[dict[str, Any]] = []
        self.pool: torch.Tensor | None = None  # MM learning's selected samples (stage 2)
        self.best: dict[str, Any] | None = None
        self.train_seconds = 0.0
        self._bar: Any = None

    # ------------------------------------------------------------------ setup
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
            _ShardStep(model, self._shard_loss),
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
        path = Path(out_dir) / CHECKPOINT
        state = load_checkpoint(path)
        values = dict(state["config"])
        if epochs is not None:
            values["epochs"] = epochs
        config = TrainConfig.from_dict(values)
        trainer = cls(config, out_dir, splits, progress, log)
        trainer.load_state_dict(state)
        if trainer.dist.is_main:  # a write killed mid-way leaves its temporary file behind
            for stale in _temp_checkpoints(Path(out_dir)):
                stale.unlink(missing_ok=True)
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

    def save(self) -> Path | None:
        """Write the checkpoint atomically (nothing without ``out_dir``, or off rank 0)."""
        if self.out_dir is None or not self.dist.is_main:
            return None
        return save_checkpoint(self.state_dict(), self.out_dir / CHECKPOINT)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_proba(self, split: Any) -> torch.Tensor:
        """``softmax(o)`` for every sample of ``split``, in batches, eval mode."""
        chunks = []
        for i in range(0, len(split), EVAL_BATCH):
            idx = torch.arange(i, min(i + EVAL_BATCH, len(split)))
            views = [v[idx] for v in split.views]
            chunks.append(self.model.predict_proba(views, split.observed[idx]))
        return torch.cat(chunks).cpu()

    def evaluate(self, split: Any) -> dict[str, float]:
        """Accuracy and macro one-vs-rest AUROC on ``split``."""
        proba = self.predict_proba(split)
        labels = split.labels.cpu()
        return {"accuracy": accuracy(proba, labels), "auroc": macro_auroc(proba, labels)}

    # ------------------------------------------------------------------ training
    def _batch(self, split: Any, idx: torch.Tensor):
        return [v[idx] for v in split.views], split.observed[idx], split.labels[idx]

    def _mix_loss(self, train: Any, batch_size: int) -> torch.Tensor:
        """MM learning: soft CE of the joint head on modality-mixed pool samples."""
        pick = self._mix_pick(batch_size)
        return self._mix_rows(train, pick, slice(0, batch_size))

    def _mix_pick(self, batch_size: int) -> torch.Tensor:
        """Positions in the pool of the samples one step mixes (the shuffle generator)."""
        assert self.pool is not None
        return torch.randint(len(self.pool), (batch_size,), generator=self.shuffle)

    def _mix_rows(self, train: Any, pick: torch.Tensor, rows: slice) -> torch.Tensor:
        """Mix the picked pool samples (the whole global batch: mixing crosses samples), then
        the soft CE of the mixed ``rows`` (a rank's shard; all of them in one process)."""
        assert self.pool is not None
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
        order = torch.randperm(len(train), generator=self.shuffle)
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        for step, start in enumerate(range(0, len(train), cfg.batch_size)):
            batch = order[start : start + cfg.batch_size]
            self._step_index = step
            try:
                if self.dist.enabled:
                    terms, out, observed, labels, real = self._distributed_step(
                        train, batch, stage2
                    )
                else:
                    terms, out, observed, labels, real = self._local_step(
                        train, batch, stage2, step
                    )
            except ValueError as exc:  # e.g. an op refusing inf embeddings after a blow-up
                self._diagnose(exc, step)
                raise
            self.optimizer.step()
            if model.use_tla and real:
                model.tla_observe(out, observed, labels)
            for k, v in terms.items():  # on the device: no sync per term
                sums[k] = sums[k] + v if k in sums else v.double()
            batches += 1
        return {k: float(v) / max(batches, 1) for k, v in sums.items()}

    def _local_step(self, train: Any, batch: torch.Tensor, stage2: bool, step: int):
        """One process, one batch: forward, finiteness check, backward (no optimizer step)."""
        cfg, model = self.config, self.model
        idx = batch.to(self.device)
        views, observed, labels = self._batch(train, idx)
        out = model(views, observed, labels)
        loss = out.losses["total"]
        terms = dict(out.losses)
        if stage2:
            mix = self._mix_loss(train, len(idx))
            terms["mix"] = mix
            loss = cfg.mm_mu * mix + (1.0 - cfg.mm_mu) * loss
        per_modality = None
        if self.balancer is not None:
            per_modality = [
                joint_cross_entropy(out.modality_logits[:, m].float(), labels)  # BCE multilabel
                for m in range(model.num_modalities)
            ]
        checked = {**terms, "objective": loss}
        for m, loss_m in enumerate(per_modality or ()):
            checked[f"modality {m}"] = loss_m
        self._check_finite(checked, step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.balancer is not None:
            assert per_modality is not None
            terms["mimo_lambda"] = self.balancer.backward(loss, per_modality).weights[0]
        else:
            loss.backward()
        terms["objective"] = loss
        return {k: v.detach() for k, v in terms.items()}, out, observed, labels, True

    def _check_finite(self, terms: dict[str, torch.Tensor], step: int) -> None:
        """Raise :class:`NonFiniteLossError` naming the first bad term (one sync when fine)."""
        if not self.check_finite:
            return
        values = torch.stack([v.detach().double().reshape(()) for v in terms.values()])
        if bool(torch.isfinite(values).all()):
            return
        bad = [(k, v) for k, v in zip(terms, values.tolist()) if not math.isfinite(v)]
        name, value = next(((k, v) for k, v in bad if k in LEAVES or k == "mix"), bad[0])
        what = TERM_DOC.get(name, "the loss of a unimodal head (MIMO)")
        others = ", ".join(k for k, _ in bad if k != name)
        saved = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        raise NonFiniteLossError(
            f"non-finite loss at epoch {self.epoch + 1}, step {step + 1}: "
            f"term {name!r} = {value} ({what})"
            + (f"; also non-finite: {others}" if others else "")
            + ". Training stopped before the update; the last checkpoint"
            + (f" ({saved})" if saved is not None else "")
            + f" holds epoch {self.epoch}."
        )

    def _diagnose(self, exc: ValueError, step: int) -> None:
        """Turn an op's "must be finite" refusal mid-training into a :class:`NonFiniteLossError`
        that says where training went wrong (the data were checked when they were loaded)."""
        if not self.check_finite or "finite" not in str(exc):
            return
        params = dict(self.model.named_parameters())
        bad = [n for n, p in params.items() if not bool(torch.isfinite(p).all())]
        if bad:
            what = f"parameters hold NaN/inf after the previous update (first: {bad[0]})"
        else:
            name, p = max(params.items(), key=lambda kv: float(kv[1].detach().abs().max()))
            what = (
                f"the forward pass overflowed (largest |parameter| "
                f"{float(p.detach().abs().max()):.3g}, in {name})"
            )
        raise NonFiniteLossError(
            f"non-finite values at epoch {self.epoch + 1}, step {step + 1}: {what}; the op "
            f"said: {exc}. Training stopped; the last checkpoint holds epoch {self.epoch}."
        ) from exc

    # ------------------------------------------------------------------ distributed step
    def _draw_present(self, observed: torch.Tensor) -> torch.Tensor:
        """The imputer's supervision drop for a whole global batch (the global RNG, like the
        model draws it in one process), so that every rank can take its slice."""
        imputer = self.model.imputer
        if imputer is None or not (imputer.use_forward or imputer.use_backward):
            return observed
        return supervision_drop(observed, imputer.drop_rate)

    def _distributed_step(self, train: Any, batch: torch.Tensor, stage2: bool):
        """This rank's shard of a global batch: forward, global terms and check, backward."""
        local, rows = self.dist.shard(batch)
        real = len(local) > 0
        if not real:  # fewer samples than ranks: a zero-weight stand-in keeps DDP in step
            local, rows = batch[:1], slice(0, 1)
        present = self._draw_present(train.observed[batch.to(self.device)])[rows]
        views, observed, labels = self._batch(train, local.to(self.device))
        pick = self._mix_pick(len(batch)) if stage2 else None
        self.optimizer.zero_grad(set_to_none=True)
        args = (views, observed, labels, present, real, pick, rows)
        if self.balancer is not None:  # MIMO writes .grad itself, from all-reduced gradients
            loss, per_modality, terms, out = self._shard_loss(*args)
            world = self.dist.world_size
            step = self.balancer.backward(loss / world, [m / world for m in per_modality])
            terms["mimo_lambda"] = step.weights[0].to(self.device)
            terms["objective"] = terms.pop("objective")
        else:
            assert self.ddp is not None
            loss, _, terms, out = self.ddp(*args)
            loss.backward()
        return terms, out, observed, labels, real

    def _shard_loss(self, views, observed, labels, present, real, pick, rows):
        """``world * sum_t c_t * term_t * n_{r,t} / n_t`` on this rank (what DDP averages).

        Returns ``(loss, weighted unimodal losses (MIMO) or None, global logged terms,
        detached model output)``.
        """
        cfg, model, train = self.config, self.model, self.splits["train"]
        out = model(views, observed, labels, present=present)
        terms = {k: v for k, v in out.losses.items() if k in LEAVES}
        counts = leaf_counts(model, out, observed)
        n = torch.tensor(observed.shape[0], device=observed.device)
        if pick is not None:
            terms["mix"] = self._mix_rows(train, pick, rows)
            counts["mix"] = n
        per_modality: list[torch.Tensor] = []
        if self.balancer is not None:
            for m in range(model.num_modalities):
                terms[f"modality {m}"] = joint_cross_entropy(
                    out.modality_logits[:, m].float(), labels
                )
                counts[f"modality {m}"] = n
        values, weights = global_terms(terms, counts, real)
        coef = objective_coefficients(model)
        total = sum(coef[k] * weights[k] * terms[k] for k in terms if k in LEAVES)
        total_value = sum(coef[k] * values[k] for k in values if k in LEAVES)
        logged: dict[str, torch.Tensor] = {}
        for k in out.losses:  # the single-process keys, in its order
            if k == "dwfuse":
                logged[k] = values["enc"] + model.dwfuse.alpha * values["ra"]
            elif k == "total":
                logged[k] = total_value
            else:
                logged[k] = values[k]
        loss, objective = total, total_value
        if pick is not None:
            logged["mix"] = values["mix"]
            mix = weights["mix"] * terms["mix"]
            loss = cfg.mm_mu * mix + (1.0 - cfg.mm_mu) * total
            objective = cfg.mm_mu * values["mix"] + (1.0 - cfg.mm_mu) * total_value
        logged["objective"] = objective
        checked = {**logged, **{k: v for k, v in values.items() if k.startswith("modality")}}
        self._check_finite(checked, self._step_index)
        if self.balancer is not None:
            per_modality = [
                weights[f"modality {m}"] * terms[f"modality {m}"]
                for m in range(model.num_modalities)
            ]
        detached = out._replace(
            **{
                f: getattr(out, f).detach() for f in out._fields if torch.is_tensor(getattr(out, f))
            },
            losses={},
        )
        return loss, per_modality or None, {k: v.detach() for k, v in logged.items()}, detached

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
                self._one_epoch(bar)
                if self._patience_ran_out():
                    self._say(f"early stop: no val AUROC gain in {cfg.patience} epochs")
                    break
        finally:
            self._bar = None
            if bar is not None:
                bar.close()
        return self.finish()

    def _one_epoch(self, bar: Any) -> None:
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
        self.save()
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
            "backend": resolved_backend(cfg.backend, self.device),
            "lazy": self.model.miner.lazy if self.model.use_tla else None,
        }
        if self.balancer is not None:
            result["mimo_subroutine_seconds"] = round(self.balancer.subroutine_seconds, 6)
        if self.dist.enabled:
            result["world_size"] = self.dist.world_size
        if self.out_dir is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            metrics = {**result, "config": cfg.to_dict(), "history": self.history}
            (self.out_dir / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
            if self.history:
                save_training_curve(self.history, self.out_dir / CURVE, title=cfg.method)
        return result
