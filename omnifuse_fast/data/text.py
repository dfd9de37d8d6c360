"""Text columns as a modality: strings embedded once by a frozen local transformers encoder.

The encoder is loaded from a LOCAL directory only (``local_files_only=True``: never a
download), its last hidden state is mean-pooled over real tokens
(:class:`omnifuse_fast.nn.FrozenTextEncoder`), and the embeddings are cached on disk under a
key that hashes the encoder's path, the pooling settings and every text, so a second run on
the same column skips the transformer entirely.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CACHE_ENV = "OMNIFUSE_FAST_CACHE"


def default_cache_dir() -> Path:
    """``$OMNIFUSE_FAST_CACHE/text``, else ``~/.cache/omnifuse_fast/text``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "omnifuse_fast"
    return Path(root) / "text"


def is_missing_text(value: object) -> bool:
    """None, NaN or a blank string: the text modality of that row is missing."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN
        return True
    return isinstance(value, str) and not value.strip()


def cache_key(model_path: str | os.PathLike, texts: Sequence[str], max_length: int) -> str:
    """sha256 of the encoder's resolved path, ``max_length`` and the texts (length-prefixed)."""
    h = hashlib.sha256()
    h.update(str(Path(model_path).resolve()).encode())
    h.update(f"\0{max_length}\0".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def embed_texts(
    texts: Sequence[object],
    model_path: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    column: str = "text",
) -> np.ndarray:
    """Mean-pooled embeddings ``[N, H]`` (float32) of ``texts``; missing texts give NaN rows.

    Args:
        texts: one string per row; None, NaN or blank marks the modality missing in that row.
        model_path: a local directory holding a transformers model and its tokenizer.
        cache_dir: where embeddings are cached (default :func:`default_cache_dir`).
        batch_size: texts per forward pass.
        max_length: tokens kept per text (longer texts are truncated).
        column: the column's name, for error messages.

    Raises:
        ValueError: no ``model_path``, or one that is not a local directory.
    """
    if model_path is None:
        raise ValueError(
            f"text column {column!r} needs a text encoder: pass text_encoder=PATH "
            "(--text-encoder PATH), a local transformers model directory"
        )
    path = Path(model_path)
    if not path.is_dir():
        raise ValueError(
            f"text encoder {str(model_path)!r} is not a local directory (downloads are disabled)"
        )
    missing = np.array([is_missing_text(t) for t in texts], dtype=bool)
    present = [str(t) for t, m in zip(texts, missing) if not m]
    unique = sorted(set(present))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    file = cache / f"{cache_key(path, unique, max_length)}.npy"
    if file.is_file():
        table = np.load(file, allow_pickle=False)
    else:
        table = _encode(unique, path, batch_size, max_length)
        _save_atomic(file, table)
    dim = table.shape[1] if table.ndim == 2 else 0
    out = np.full((len(texts), dim), np.nan, dtype=np.float32)
    if present:
        row = {t: i for i, t in enumerate(unique)}
        out[~missing] = table[[row[t] for t in present]]
    return out


def _encode(texts: list[str], path: Path, batch_size: int, max_length: int) -> np.ndarray:
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from omnifuse_fast.nn.encoders import FrozenTextEncoder

    hf_logging.disable_progress_bar()  # stderr carries the run's progress, not loader bars
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    encoder = FrozenTextEncoder(str(path), local_files_only=True)
    chunks = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(torch.int64)
        chunks.append(encoder(ids, batch["attention_mask"]).float().numpy())
    if not chunks:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _save_atomic(file: Path, array: np.ndarray) -> None:
    """Write then rename, so a concurrent reader never sees half a cache file."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
