"""Atomic checkpoints and the random states a bit-exact resume needs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 2  # 2: the optimizer state of FlatAdamW (flat moments); 1 (torch AdamW) still loads
READABLE = (1, 2)
CHECKPOINT = "checkpoint.pt"  # a run directory's checkpoint file
REQUIRED = ("format", "config", "epoch", "model", "optimizer", "rng", "history")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or is not one of ours; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a reader sees the old file or the new, whole.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, then
    ``os.replace`` swaps it in (atomic on POSIX and Windows) and the directory is fsynced so
    the rename itself survives a crash. On any error the temporary file is removed.
    """
    return write_atomic(serialize(state), path)


def serialize(state: dict[str, Any]) -> bytes:
    """``state`` as checkpoint bytes: torch's zip format, every record with its CRC-32.

    torch.load never checks those CRCs, so :func:`load_checkpoint` does (a flipped bit in
    tensor data would otherwise load silently). They cost nothing extra: the writer computes
    them anyway, unless a user turned that off, which is undone here.
    """
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    crc = getattr(getattr(config, "save", None), "compute_crc32", None)
    buffer = io.BytesIO()
    try:
        if crc is False:
            config.save.compute_crc32 = True
        torch.save(state, buffer)
    finally:
        if crc is False:
            config.save.compute_crc32 = False
    return buffer.getvalue()


def write_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`save_checkpoint`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


class CheckpointWriter:
    """Atomic checkpoint writes that overlap training: one at a time, on a background thread.

    :meth:`submit` serializes the state on the caller's thread (the bytes are the snapshot:
    training may change the tensors right after) and hands the write, fsyncs and rename to a
    thread; the next :meth:`submit`, and :meth:`wait`, first wait for the previous write and
    raise its error, if any. The thread is not a daemon: an ending interpreter finishes the
    write. A kill mid-write leaves the previous checkpoint whole, as with
    :func:`save_checkpoint`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, state: dict[str, Any], path: str | os.PathLike) -> None:
        """Serialize ``state`` now; write it to ``path`` in the background."""
        data = serialize(state)
        self.wait()
        self._thread = threading.Thread(
            target=self._write, args=(data, Path(path)), name="omnifuse-checkpoint"
        )
        self._thread.start()

    def _write(self, data: bytes, path: Path) -> None:
        try:
            write_atomic(data, path)
        except BaseException as exc:  # raised to the trainer by the next wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the pending write is on disk; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed :func:`save_checkpoint` left in ``out_dir``."""
    stale = sorted(Path(out_dir).glob(f".{CHECKPOINT}.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors only: ``weights_only``).

    Raises:
        CheckpointError: naming ``path``, when it is missing, unreadable or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path} (corrupt or not a checkpoint): {reason}"
        ) from exc
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"{path} is not an omnifuse_fast checkpoint (missing keys)")
    if state["format"] not in READABLE:
        raise CheckpointError(
            f"checkpoint {path} has format {state['format']}, expected one of {READABLE}"
        )
    if DIGEST in state:  # written by earlier versions: a digest of the content
        stored = state.pop(DIGEST)
        if stored != state_digest(state):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its content does not match its SHA-256 digest"
            )
    else:
        _check_crcs(path)
    return state


def _check_crcs(path: Path) -> None:
    """Every record's CRC-32 (the zip's own checksums), which torch.load does not check."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # a damaged header: BadZipFile, an unknown method, ...
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt): {exc}") from exc
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: record {bad!r} fails its CRC-32")


DIGEST = "sha256"  # the content digest of checkpoints from earlier versions


def state_digest(state: Any) -> str:
    """SHA-256 over a checkpoint's content: every tensor's dtype, shape and bytes, every
    plain value's type and repr, in order (what a load gives back hashes the same)."""
    h = hashlib.sha256()
    _digest(state, h)
    return h.hexdigest()


def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def rng_state() -> dict[str, Any]:
    """The global torch, numpy and python random states, in tensors and plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        # one tensor, not 625 ints: a checkpoint pickles and hashes it in one piece
        "python": (version, torch.tensor(internal, dtype=torch.int64), gauss),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]  # internal: a tensor, or ints (older files)
    internal = internal.tolist() if torch.is_tensor(internal) else internal
    random.setstate((version, tuple(internal), gauss))
