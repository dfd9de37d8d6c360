"""Steady-state epoch time of the main job: ``--backend reference`` eager vs ``--compile``.

Issue 17's measure: for each setting, run ``omnifuse-fast train`` for ``--long`` (13) and for
``--short`` (3) epochs; the steady-state epoch time is ``(T_long - T_short) / (long - short)``,
so that start-up, data loading, compilation and the final test cancel. ``T`` is the wall time
of the whole command (what a user waits for); the run's own ``seconds`` (the training loop with
validation) is reported next to it.

Compilation must cost the same in both runs for it to cancel: inductor keeps compiled graphs in
an on-disk cache shared by processes, so the first compiled run would pay a cold compile and
the later ones only a cache load. Every run therefore uses one fresh cache directory
(``TORCHINDUCTOR_CACHE_DIR``), filled by an untimed warm-up run of each setting first. Runs are
interleaved (reference short, compiled short,
reference long, compiled long, per repeat) so that a drifting machine load hits both alike,
and the median over repeats is taken.

    python benchmarks/epoch_time.py                 # the issue's setting: 13 - 3 epochs, x3
    python benchmarks/epoch_time.py --short 1 --long 2 --repeats 1 -- --dim 8   # smoke

Prints one line per run, then one JSON object (the last line) with both epoch times and the
ratio ``reference / compiled`` (issue 17 asks for >= 2). Meaningful only on a quiet machine.

The difference cancels start-up only as far as start-up is the same in every run, and a
compiled run's first step (dynamo's trace, loading the cached graphs) varies by about a
second, against 10 epochs of a few tenths. So the runs' own steady-state epoch time
(``epoch_s``: the median whole epoch after the first, in the long runs) is reported beside
it, with its ratio (``ratio_epoch``): the same quantity, without start-up in it at all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _harness import device_name  # this script's folder is on sys.path

SETTINGS = {  # name -> the extra train flags
    "reference": ["--backend", "reference"],
    "compiled": ["--compile"],  # the default backend (auto)
}


def run_train(epochs: int, flags: list[str], extra: list[str], out: Path, cache: Path) -> dict:
    """One ``omnifuse-fast train`` run in a fresh process; its JSON line plus ``wall``."""
    cmd = [sys.executable, "-m", "omnifuse_fast", "train", "--quiet", "--epochs", str(epochs)]
    cmd += ["--out", str(out), *flags, *extra]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall": wall}


def measure(short: int, long: int, repeats: int, extra: list[str]) -> dict:
    """``{setting: {"epoch_wall_s", "epoch_train_s", runs...}}`` and the ratio."""
    per: dict[str, dict[str, list[float]]] = {
        s: {"wall": [], "train": [], "epoch": []} for s in SETTINGS
    }
    with tempfile.TemporaryDirectory(prefix="epoch_time_") as tmp:
        cache = Path(tmp) / "inductor_cache"
        for name, flags in SETTINGS.items():  # untimed: fills the compile cache, warms imports
            res = run_train(short, flags, extra, Path(tmp) / f"{name}-warmup", cache)
            print(
                f"warm-up   {name:9s} {short:3d} epochs: wall {res['wall']:.2f} s", file=sys.stderr
            )
        for r in range(repeats):
            runs: dict[tuple[str, int], dict] = {}
            for epochs in (short, long):
                for name, flags in SETTINGS.items():
                    out = Path(tmp) / f"{name}-{epochs}-{r}"
                    runs[(name, epochs)] = res = run_train(epochs, flags, extra, out, cache)
                    print(
                        f"repeat {r + 1}/{repeats} {name:9s} {epochs:3d} epochs: "
                        f"wall {res['wall']:.2f} s, training {res['seconds']:.2f} s, "
                        f"ms/step {res.get('ms_per_step')}, epoch {res.get('epoch_s')} s, "
                        f"test acc {res['test_accuracy']:.4f}",
                        file=sys.stderr,
                        flush=True,
                    )
            for name in SETTINGS:
                a, b = runs[(name, short)], runs[(name, long)]
                per[name]["wall"].append((b["wall"] - a["wall"]) / (long - short))
                per[name]["train"].append((b["seconds"] - a["seconds"]) / (long - short))
                per[name]["epoch"].append(b["epoch_s"])
    summary = {
        name: {
            "epoch_wall_s": statistics.median(v["wall"]),
            "epoch_train_s": statistics.median(v["train"]),
            "repeats_wall_s": v["wall"],
            "epoch_s": statistics.median(v["epoch"]),
            "repeats_epoch_s": v["epoch"],
        }
        for name, v in per.items()
    }
    ref, comp = summary["reference"], summary["compiled"]
    return {
        **summary,
        "ratio_wall": ref["epoch_wall_s"] / comp["epoch_wall_s"],
        "ratio_train": ref["epoch_train_s"] / comp["epoch_train_s"],
        "ratio_epoch": ref["epoch_s"] / comp["epoch_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=3, help="epochs of the short run")
    parser.add_argument("--long", type=int, default=13, help="epochs of the long run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    parser.add_argument("extra", nargs="*", help="after --: more train flags for every run")
    args = parser.parse_args(argv)
    if not 1 <= args.short < args.long:
        parser.error("need 1 <= --short < --long")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    result = measure(args.short, args.long, args.repeats, args.extra)
    result.update(
        short=args.short,
        long=args.long,
        repeats=args.repeats,
        extra=args.extra,
        torch=torch.__version__,
        cpu=device_name(torch.device("cpu")),
        cpus=os.cpu_count(),
        date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    print(
        f"steady-state epoch: reference {result['reference']['epoch_wall_s']:.3f} s, "
        f"compiled {result['compiled']['epoch_wall_s']:.3f} s (wall); "
        f"ratio {result['ratio_wall']:.2f}x wall, {result['ratio_train']:.2f}x training loop; "
        f"within runs: reference {result['reference']['epoch_s']:.3f} s, compiled "
        f"{result['compiled']['epoch_s']:.3f} s per epoch, {result['ratio_epoch']:.2f}x",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
