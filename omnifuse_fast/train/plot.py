"""The training-curve figure (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_training_curve(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Plot training loss and validation accuracy / AUROC per epoch into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    losses = [h["train_loss"] for h in history]
    ax_loss.plot(epochs, losses, color="tab:red")
    ax_loss.set(xlabel="epoch", ylabel="training loss")
    if losses and min(losses) > 0:
        ax_loss.set_yscale("log")
    ax_val.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    ax_val.plot(epochs, [h["val_auroc"] for h in history], label="val AUROC")
    ax_val.set(xlabel="epoch", ylabel="validation", ylim=(0.0, 1.01))
    ax_val.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
