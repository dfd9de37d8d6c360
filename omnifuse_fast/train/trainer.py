"""``Trainer``: mini-batch training of OmniFuse and the baselines, with bit-exact resume.

One epoch: a seeded shuffle, AdamW steps on the objective of the method, the TLA miner fed
every training batch and mined at the epoch's end, a validation pass, an atomic checkpoint.
Everything random (the shuffle generator, the mixer's generator, the global torch / numpy /
python states that drive the imputer's supervision drop) is in the checkpoint, so training
N epochs straight and training k, stopping and resuming to N give the same bits on CPU.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from omnifuse_fast import _dispatch
from omnifuse_fast.nn import MIMOBalancer, ModalityMixer, OmniFuse
from omnifuse_fast.ops import soft_cross_entropy
from omnifuse_fast.train.checkpoint import (
    FORMAT,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from omnifuse_fast.train.config import TrainConfig
from omnifuse_fast.train.metrics import accuracy, macro_auroc
from omnifuse_fast.train.plot import save_training_curve
from omnifuse_fast.train.schedule import select_strong

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVE = "training_curve.png"
EVAL_BATCH = 1024


def build_model(config: TrainConfig, view_dims: list[int], num_classes: int) -> OmniFuse:
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

    return prepare_mfeat(
        missing_rate=config.missing_rate,
        noise_views=config.noise_views,
        noise_std=config.noise_std,
        seed=config.seed,
    )


class Trainer:
    """Train one model on ``{"train", "val", "test"}`` splits (``MultiViewSplit``-like).

    Args:
        config: the run.
        out_dir: where checkpoints, ``metrics.json`` and the curve go (None: nowhere).
        splits: the data; None loads the built-in data as the config says.
        progress: show a tqdm bar over epochs (only on a TTY).
        log: called with one line per epoch (e.g. ``print`` to stderr); None: silent.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        splits: dict[str, Any] | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.progress, self.log = progress, log
        self.device = torch.device(config.device)
        self._seed_everything(config.seed)
        splits = load_data(config) if splits is None else splits
        self.splits = {k: self._to_device(v) for k, v in splits.items()}
        train = self.splits["train"]
        self.view_dims = [int(x.shape[1]) for x in train.views]
        self.num_classes = int(train.num_classes)
        self.model = build_model(config, self.view_dims, self.num_classes).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True
        )
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.mixer = ModalityMixer(len(self.view_dims), self.num_classes, seed=config.seed + 1)
        self.mixer.backend = config.backend
        self.balancer: MIMOBalancer | None = None
        if config.method == "mimo":
            shared, heads, fusion = self.model.parameter_groups()
            self.balancer = MIMOBalancer(shared, heads, fusion, config.mimo_mode, config.backend)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.pool: torch.Tensor | None = None  # MM learning's selected samples (stage 2)
        self.best: dict[str, Any] | None = None
        self.train_seconds = 0.0
        self._bar: Any = None

    # ------------------------------------------------------------------ setup
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
        """Write the checkpoint atomically (nothing without ``out_dir``)."""
        if self.out_dir is None:
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
        assert self.pool is not None
        pick = torch.randint(len(self.pool), (batch_size,), generator=self.shuffle)
        views, observed, labels = self._batch(train, self.pool[pick].to(self.device))
        out = self.model(views, observed, present=observed)  # no drop: mix what was observed
        v_mix, soft = self.mixer(out.v_full, labels)
        return soft_cross_entropy(
            self.model.joint_logits_from_embeddings(v_mix), soft, backend=self.config.backend
        )

    def _select_pool(self) -> None:
        train = self.splits["train"]
        proba = self.predict_proba(train)
        p_true = proba.gather(1, train.labels.cpu().view(-1, 1)).squeeze(1)
        cfg = self.config
        self.pool = select_strong(p_true, cfg.mm_tau, cfg.mm_top_fraction, minimum=2)
        self._say(f"MM learning: stage 2 mixes {len(self.pool)} of {len(train)} samples")

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training split; returns the mean loss terms."""
        cfg, model, train = self.config, self.model, self.splits["train"]
        model.train()
        stage2 = cfg.method == "mm" and self.pool is not None
        order = torch.randperm(len(train), generator=self.shuffle)
        sums: dict[str, float] = {}
        batches = 0
        for start in range(0, len(train), cfg.batch_size):
            idx = order[start : start + cfg.batch_size].to(self.device)
            views, observed, labels = self._batch(train, idx)
            out = model(views, observed, labels)
            loss = out.losses["total"]
            terms = dict(out.losses)
            if stage2:
                mix = self._mix_loss(train, len(idx))
                terms["mix"] = mix
                loss = cfg.mm_mu * mix + (1.0 - cfg.mm_mu) * loss
            self.optimizer.zero_grad(set_to_none=True)
            if self.balancer is not None:
                per_modality = [
                    F.cross_entropy(out.modality_logits[:, m].float(), labels)
                    for m in range(model.num_modalities)
                ]
                step = self.balancer.backward(loss, per_modality)
                terms["mimo_lambda"] = step.weights[0]
            else:
                loss.backward()
            self.optimizer.step()
            if model.use_tla:
                model.tla_observe(out, observed, labels)
            terms["objective"] = loss
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            batches += 1
        return {k: v / max(batches, 1) for k, v in sums.items()}

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
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            metrics = {**result, "config": cfg.to_dict(), "history": self.history}
            (self.out_dir / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
            if self.history:
                save_training_curve(self.history, self.out_dir / CURVE, title=cfg.method)
        return result
