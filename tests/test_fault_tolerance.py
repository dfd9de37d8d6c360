"""Faults: SIGKILL mid-checkpoint, kills at random points, corrupt files, non-finite losses.

The kill tests run training in a subprocess (``_child.py``-style script below) and kill it with
SIGKILL, which no handler can intercept: whatever is on disk afterwards is what a crash leaves.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train import synthetic_splits

from omnifuse_fast.train import CheckpointError, TrainConfig, Trainer, load_checkpoint
from omnifuse_fast.train.trainer import NonFiniteLossError

TESTS = Path(__file__).resolve().parent
SMALL = dict(dim=4, hidden=8, num_blocks=2, encoder_hidden=8, head_hidden=8, batch_size=16)
EPOCHS = 4
RANDOM_EPOCHS = 16  # a longer run: a wide window for the random kills

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

# Train (or resume) to EPOCHS in OUT. With PAUSE_AT = k, the k-th checkpoint write of this
# process stops between its temporary file being complete and the rename, says so in a marker
# file and sleeps: the parent kills it there.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_train import synthetic_splits
    from omnifuse_fast.train import TrainConfig, Trainer
    from omnifuse_fast.train import checkpoint as ck

    out, pause_at, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class PausingOS:
        calls = 0
        def __getattr__(self, name):
            return getattr(os, name)
        def replace(self, src, dst):
            PausingOS.calls += 1
            if PausingOS.calls == pause_at:
                with open(os.path.join(out, "paused"), "w") as f:
                    f.write(src)
                time.sleep(120)
            os.replace(src, dst)

    ck.os = PausingOS()
    data = synthetic_splits()
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        trainer = Trainer.resume(out, splits=data)
    else:
        cfg = TrainConfig(**{config!r}, epochs=epochs)
        trainer = Trainer(cfg, out, data)
    trainer.fit()
    open(os.path.join(out, "done"), "w").close()
    """
)


def _config(**kw) -> dict:
    return {**SMALL, "epochs": EPOCHS, "lr": 1e-2, "backend": "reference", **kw}


def _child(out: Path, pause_at: int = 0, epochs: int = EPOCHS) -> subprocess.Popen:
    script = out.parent / f"{out.name}_child.py"
    config = {k: v for k, v in _config().items() if k != "epochs"}
    script.write_text(CHILD.format(tests=str(TESTS), config=config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(pause_at), str(epochs)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def straight(epochs: int) -> dict[str, torch.Tensor]:
    """The model of an uninterrupted run (the reference for every resumed one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(TrainConfig(**_config(epochs=epochs)), None, synthetic_splits())
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _assert_same_model(out: Path, epochs: int) -> None:
    want = straight(epochs)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == epochs
    for k, v in want.items():
        assert torch.equal(state["model"][k], v), k


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = _child(out, pause_at=3)  # the third epoch's write: epochs 1 and 2 are on disk
    _wait_for(out / "paused", proc)
    tmp = Path((out / "paused").read_text())
    assert tmp.exists() and tmp.stat().st_size > 0  # the new file is whole, not yet renamed
    _kill(proc)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2  # the previous one, intact
    assert tmp.exists()  # SIGKILL leaves the temporary file behind ...
    resumed = _child(out)  # ... resuming removes it and completes the run
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    resumed.stderr.close()
    assert not tmp.exists() and (out / "done").exists()
    _assert_same_model(out, EPOCHS)  # bit-exact: as if it had never been killed


def test_kills_at_random_points_then_resume_match_an_uninterrupted_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rng = random.Random(20260101)
    kills = 0
    for _ in range(12):
        proc = _child(out, epochs=RANDOM_EPOCHS)
        if kills < 2:
            # once the run has a checkpoint, kill it anywhere: mid-step, mid-write, mid-eval
            _wait_for(out / "checkpoint.pt", proc)
            time.sleep(rng.uniform(0.0, 0.5))
            if proc.poll() is None:
                _kill(proc)
                kills += 1
                state = load_checkpoint(out / "checkpoint.pt")  # always a whole checkpoint
                assert 1 <= state["epoch"] <= RANDOM_EPOCHS
                continue
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
        proc.stderr.close()
        break
    assert (out / "done").exists() and kills >= 1
    _assert_same_model(out, RANDOM_EPOCHS)


def _saved_run(tmp_path: Path) -> Path:
    trainer = Trainer(TrainConfig(**_config(epochs=1)), tmp_path, synthetic_splits())
    trainer.fit()
    return tmp_path / "checkpoint.pt"


def test_truncated_or_bit_flipped_checkpoints_are_refused_naming_the_file(tmp_path):
    path = _saved_run(tmp_path)
    data = path.read_bytes()
    rng = random.Random(0)
    cuts = sorted({0, 1, 22, len(data) - 1, *(rng.randrange(len(data)) for _ in range(12))})
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value), cut
    refused = 0
    for _ in range(30):  # one flipped bit anywhere: refused, or (metadata only) the same state
        flipped = bytearray(data)
        pos = rng.randrange(len(flipped))
        flipped[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            assert str(path) in str(err), pos
            refused += 1
            continue
        path.write_bytes(data)
        clean = load_checkpoint(path)
        for k, v in clean["model"].items():
            assert torch.equal(state["model"][k], v), (pos, k)
    assert refused >= 15


def test_cli_resume_of_a_truncated_checkpoint_is_one_clear_line(tmp_path):
    path = _saved_run(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    proc = subprocess.run(
        [sys.executable, "-m", "omnifuse_fast", "train", "--resume", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert str(path) in proc.stderr and "corrupt" in proc.stderr


def _poison(trainer: Trainer, term: str, at_step: int) -> None:
    """Make the model's loss term ``term`` NaN from the ``at_step``-th forward on."""
    model, calls = trainer.model, {"n": 0}
    forward = model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if out.losses:
            calls["n"] += 1
            if calls["n"] >= at_step:
                out.losses[term] = out.losses[term] * float("nan")
                out.losses["total"] = out.losses["total"] + out.losses[term]
        return out

    model.forward = poisoned


@pytest.mark.parametrize("term,name", [("tla", "L_TLA"), ("backward", "L_backward")])
def test_non_finite_loss_stops_naming_step_and_term(tmp_path, term, name):
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**_config(epochs=3)), tmp_path, synthetic_splits())
    trainer._one_epoch(None)  # epoch 1 is fine and checkpointed
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _poison(trainer, term, at_step=2)
    with pytest.raises(NonFiniteLossError) as err:
        trainer._one_epoch(None)
    msg = str(err.value)
    assert "epoch 2, step 2" in msg and f"term {term!r}" in msg and name in msg
    assert str(tmp_path / "checkpoint.pt") in msg and "holds epoch 1" in msg
    # step 1 of epoch 2 updated the model; the bad step did not: everything is still finite
    assert all(
        torch.isfinite(v).all()
        for v in trainer.model.state_dict().values()
        if v.is_floating_point()
    )
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_a_check_every_n_steps_still_names_the_bad_step_and_term(tmp_path):
    """``check_every=3``: no sync in between; the check names step 2 and its term, and says
    how many updates ran past it (the epoch's checkpoint is never written after it)."""
    torch.set_num_threads(1)
    config = TrainConfig(**_config(epochs=3, check_every=3))
    trainer = Trainer(config, tmp_path, synthetic_splits())
    trainer._one_epoch(None)
    _poison(trainer, "tla", at_step=2)
    with pytest.raises(NonFiniteLossError) as err:
        trainer._one_epoch(None)
    msg = str(err.value)
    assert "epoch 2, step 2" in msg and "term 'tla'" in msg and "L_TLA" in msg
    assert "every 3 steps" in msg and "after 1 update(s)" in msg and "holds epoch 1" in msg
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_the_finite_check_can_be_switched_off(tmp_path):
    trainer = Trainer(
        TrainConfig(**_config(epochs=1)), None, synthetic_splits(), check_finite=False
    )
    _poison(trainer, "tla", at_step=1)
    terms = trainer.train_epoch()  # no error: the NaN goes through (the user asked for it)
    assert terms["tla"] != terms["tla"]


def test_a_diverging_run_stops_with_a_named_step(tmp_path):
    """lr 1e20: the update after step 1 blows the weights up; step 2's forward overflows."""
    trainer = Trainer(TrainConfig(**_config(epochs=2, lr=1e20)), None, synthetic_splits())
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2: .*overflowed"):
        trainer.fit()


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("cpu", marks=pytest.mark.backend("cpu"))]
)
def test_an_op_refusing_overflowed_logits_names_the_step(backend):
    """Finite weights whose logits overflow: the loss op refuses them (the reference's Python
    check, or the C++ kernel's own, a plain ValueError), and the trainer names the step."""
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**_config(epochs=1, backend=backend)), None, synthetic_splits())
    _, heads, _ = trainer.model.parameter_groups()
    with torch.no_grad():
        for p in (p for head in heads for p in head):
            p.fill_(1e37)  # finite, but two layers of them overflow fp32
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train_epoch()
    msg = str(err.value)
    assert msg.startswith("non-finite values at epoch 1, step 1: the forward pass overflowed")
    assert "must be finite; it holds NaN or inf" in msg  # what the op said, quoted


def test_cli_reports_a_non_finite_loss_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "omnifuse_fast",
            "train",
            "--epochs",
            "1",
            "--lr",
            "1e20",
            "--dim",
            "4",
            "--num-blocks",
            "1",
            "--out",
            str(tmp_path),
            "--quiet",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and "step" in proc.stderr
