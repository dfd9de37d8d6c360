"""``omnifuse-fast train``: the JSON last line, the files, resume, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from omnifuse_fast.cli import main

KEYS = {
    "test_accuracy",
    "test_auroc",
    "val_accuracy",
    "val_auroc",
    "epochs",
    "method",
    "missing_rate",
    "seconds",
    "backend",
}
QUICK = ["--dim", "8", "--num-blocks", "2", "--quiet", "--backend", "reference"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the CLI sets its own thread count
    yield
    torch.set_num_threads(threads)


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_train_one_epoch_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    result = _last_json(capsys.readouterr().out)
    assert KEYS <= set(result) and result["epochs"] == 1 and result["method"] == "omnifuse"
    assert result["missing_rate"] == 0.5 and result["backend"] == "reference"
    assert 0.0 <= result["test_accuracy"] <= 1.0 and 0.5 < result["test_auroc"] <= 1.0
    assert {"checkpoint.pt", "metrics.json", "training_curve.png"} <= set(os.listdir(out))
    assert json.loads((out / "metrics.json").read_text())["test_auroc"] == result["test_auroc"]
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    resumed = _last_json(capsys.readouterr().out)
    assert resumed["epochs"] == 2 and resumed["backend"] == "reference"


def _module(*argv: str) -> subprocess.CompletedProcess:
    """``python -m omnifuse_fast ARGV``: the real command line, in a fresh process."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "omnifuse_fast", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_module_entry_point_concat(tmp_path):
    proc = _module(
        "train", "--method", "concat", "--epochs", "1", "--missing-rate", "0.3",
        "--noise-views", "fou,2", "--noise-std", "0.5", "--out", str(tmp_path), "--dim", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = _last_json(proc.stdout)
    assert result["method"] == "concat" and result["missing_rate"] == 0.3
    assert "epoch 1/1" in proc.stderr  # progress goes to stderr, not into the JSON line
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert config["noise_views"] == ["fou", "kar"] and config["noise_std"] == 0.5


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--missing-rate", "1.5"], "--missing-rate"),
        (["train", "--missing-rate", "nan"], "--missing-rate"),
        (["train", "--method", "late"], "--method"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--epochs", "two"], "--epochs"),
        (["train", "--noise-views", "fou,xyz"], "xyz"),
        (["train", "--method", "concat", "--no-tla"], "--no-tla"),
        (["train", "--resume"], "--out"),
        (["train", "--backend", "gpu"], "--backend"),
        ([], "COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and needle in err[-1]
    assert not any("Traceback" in line for line in err)


def test_resume_from_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", "--out", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and str(tmp_path / "checkpoint.pt") in err[0]


# a run with non-default settings of every kind: numbers, a view list, an ablation flag
RUN = [
    "train", "--seed", "3", "--lr", "0.002", "--noise-views", "fou,2", "--noise-std", "0.5",
    "--no-tla", *QUICK,
]  # fmt: skip


def test_the_same_command_with_resume_appended_continues_the_run(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    assert main([*RUN, "--epochs", "1", *out]) == 0
    first = _last_json(capsys.readouterr().out)
    proc = _module(*RUN, "--epochs", "1", *out, "--resume")  # the real command line
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = _last_json(proc.stdout)  # the run already has its epoch: tested as it stands
    assert again["epochs"] == 1 and again["test_auroc"] == first["test_auroc"]
    assert main([*RUN, "--epochs", "2", *out, "--resume"]) == 0  # a new end: one more epoch
    assert _last_json(capsys.readouterr().out)["epochs"] == 2


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A finished one-epoch run of ``RUN`` (the conflict tests leave it untouched)."""
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    try:
        assert main([*RUN, "--epochs", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize(
    "changed,needle",
    [
        (["--seed", "4"], "--seed 4 conflicts"),
        (["--lr", "0.003"], "--lr 0.003 conflicts"),
        (["--noise-views", "fou"], "--noise-views fou conflicts"),
        (["--method", "concat"], "--method concat conflicts"),
        (["--no-dwfuse"], "--no-dwfuse conflicts"),
        (["--backend", "auto"], "--backend auto conflicts"),
    ],
)
def test_resume_refuses_a_conflicting_setting_by_name(one_epoch_run, capsys, changed, needle):
    out = ["--out", str(one_epoch_run)]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in one_epoch_run.iterdir())
    argv = [*RUN, "--epochs", "2", *out, "--resume", *changed]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and needle in err[-1] and "checkpoint" in err[-1], err[-1]
    after = sorted((p.name, p.stat().st_mtime_ns) for p in one_epoch_run.iterdir())
    assert after == before  # refused before anything was trained or written


def test_every_train_config_flag_reaches_the_config():
    """The parser is the one list of settings: --compile and --check-every included."""
    from omnifuse_fast.cli import _config_values, build_parser

    args = build_parser().parse_args(["train", "--compile", "--check-every", "4", "--seed", "0"])
    assert _config_values(args) == {
        "compile": True, "check_every": 4, "seed": 0, "method": "omnifuse"
    }  # fmt: skip
