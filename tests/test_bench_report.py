"""``python -m omnifuse_fast.bench report``: structure of the table, speedups, ratios and PNG
on a small synthetic pytest-benchmark JSON (no timing is measured here)."""

from __future__ import annotations

import json

import pytest
import torch

from omnifuse_fast.bench import floors, report, traffic
from omnifuse_fast.bench.__main__ import main

CASE = "B65536-M4-C25-fp32-fwd_bwd-checks_off"
PAIR = "M4-D128-H256-K5-C10-In256-fp32-fwd-checks_off"


def _bench(op, case, provider, median_s, **info):
    extra = {"op": op, "case": case, "provider": provider, **info}
    return {
        "name": f"test_{op}[{case}-{provider}]",
        "group": f"{op} {case}",
        "stats": {"median": median_s, "min": median_s, "max": median_s},
        "extra_info": extra,
    }


@pytest.fixture
def results(tmp_path):
    data = {
        "machine_info": {
            "node": "synthetic",
            "omnifuse_fast": {
                "device": "cpu",
                "device_name": "x86_64",
                "torch": "2.x",
                "triton": None,
                "size": "default",
                "date_utc": "2000-01-01T00:00:00+00:00",
            },
        },
        "benchmarks": [
            _bench("dwfuse_loss", CASE, "reference", 0.008, gbps=6.6, pct_of_floor=5.0),
            _bench("dwfuse_loss", CASE, "compile", 0.004, gbps=13.2, pct_of_floor=10.0),
            _bench("dwfuse_loss", CASE, "cpu", 0.002, gbps=26.5, pct_of_floor=20.0),
            _bench(
                "cra_forward", "B2048-fwd", "reference", 0.1, tflops=0.05, mem_saved_bytes=2**21
            ),
            _bench("mimo_combine", PAIR, "reference", 0.001, pair=PAIR),
            _bench("mgda_min_norm", PAIR, "reference", 0.02, pair=PAIR),
            # an entry without extra_info: op, case and provider come from the test name
            {"name": "test_tla_stats[B512-M4-C25-ce-cpu]", "stats": {"median": 0.5e-3}},
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_rows_fill_speedups_from_the_same_case(results):
    table = report.rows(report.load(results))
    assert [r.provider for r in table[:3]] == ["reference", "compile", "cpu"]
    cpu = table[2]
    assert cpu.speedup_vs_reference == pytest.approx(4.0)
    assert cpu.speedup_vs_compile == pytest.approx(2.0)
    assert table[0].speedup_vs_reference == pytest.approx(1.0)
    cra = table[3]
    assert cra.speedup_vs_compile is None  # no compile row for that case
    assert cra.mem_bytes == 2**21 and cra.mem_kind == "saved"
    parsed = table[-1]
    assert (parsed.op, parsed.case, parsed.provider) == ("tla_stats", "B512-M4-C25-ce", "cpu")


def test_mimo_ratio_pairs_mgda_with_combine(results):
    ratios = report.mimo_ratios(report.rows(report.load(results)))
    assert ratios == [(PAIR, "reference", pytest.approx(20.0))]


def test_cli_prints_table_and_writes_png(results, tmp_path, capsys):
    png = tmp_path / "out.png"
    assert main(["report", str(results), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "device cpu" in lines[0]
    header = lines[1]
    for column in ("op", "case", "provider", "median ms", "GB/s", "% floor", "x ref", "x compile"):
        assert column in header
    body = [line for line in lines if line.startswith(("dwfuse_loss", "cra_forward", "tla_"))]
    assert len(body) == 5
    assert "4.00x" in next(line for line in body if " cpu " in line)
    assert "mgda_min_norm (M+1 objectives) / mimo_combine" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_geomean_per_op_and_provider(results):
    stats = report.summary(report.rows(report.load(results)))
    assert list(stats["dwfuse_loss"]) == ["reference", "compile", "cpu"]
    assert stats["dwfuse_loss"]["cpu"]["speedup_vs_reference"] == pytest.approx(4.0)
    assert stats["dwfuse_loss"]["cpu"]["pct_of_floor"] == pytest.approx(20.0)


def test_cli_rejects_a_file_that_is_not_a_benchmark_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "benchmarks"}))
    assert main(["report", str(bad)]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err


def test_floor_formulas_count_each_tensor_once():
    # dwfuse_loss fwd+bwd: logits read once and d logits written once, plus int64 labels
    assert floors.dwfuse_loss(65536, 4, 25, 4, "fwd+bwd").bytes == 2 * 65536 * 100 * 4 + 65536 * 8
    assert floors.mimo_combine(1000, 4).bytes == 5 * 4000
    assert floors.mgda_min_norm(1000, 4, objectives=5).bytes == 11 * 4000
    cost = floors.cra_forward(2, 8, 4, 1, 4, "fwd")
    assert cost.flops == 4 * 2 * 8 * 4
    assert floors.floor_seconds(cost, floors.Peaks(1e9, 1e9, "test")) == pytest.approx(
        max(cost.bytes, cost.flops) / 1e9
    )
    with pytest.raises(ValueError, match="mode"):
        floors.tla_loss(4, 3, 4, "bwd")


def test_eager_traffic_counts_reads_and_writes_but_not_views():
    x, y = torch.ones(1000), torch.ones(1000)
    nbytes, kernels = traffic.eager_traffic(lambda: (x + y).view(10, 100).t())
    assert nbytes == 3 * 4000  # read x and y, write the sum; the views move nothing
    assert dict(kernels) == {"add": 1}


def test_gpu_datasheet_peaks_by_name():
    h100 = floors.gpu_datasheet_peaks("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert h100 is not None and h100.bandwidth == 3.35e12 and h100.flops == 989e12
    assert floors.gpu_datasheet_peaks("NVIDIA H200", torch.float32).bandwidth == 4.8e12
    assert floors.gpu_datasheet_peaks("NVIDIA H100 PCIe", torch.float32) is None  # measured
    assert floors.gpu_datasheet_peaks("NVIDIA A10", torch.float32) is None


def test_checks_off_runs_fold_into_the_default_row(tmp_path):
    """Providers are compared with the default settings (checks on); the same case with the
    checks off is a second column of its row, against the same compile baseline."""
    on, off = "B8-C5-fp32-fwd_bwd-checks_on", "B8-C5-fp32-fwd_bwd-checks_off"
    data = {
        "benchmarks": [
            _bench("soft_cross_entropy", on, "reference", 0.012),
            _bench("soft_cross_entropy", on, "compile", 0.006),
            _bench("soft_cross_entropy", on, "cpu", 0.003),
            _bench("soft_cross_entropy", off, "cpu", 0.002),
        ]
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    table = report.rows(report.load(path))
    assert table[3].speedup_vs_compile == pytest.approx(3.0)  # baseline of the default run
    folded = report.fold_checks_off(table)
    assert [r.provider for r in folded] == ["reference", "compile", "cpu"]
    cpu = folded[2]
    assert cpu.speedup_vs_compile == pytest.approx(2.0)
    assert cpu.checks_off_ms == pytest.approx(2.0)
    assert cpu.checks_off_vs_compile == pytest.approx(3.0)
    text = report.format_table(table)
    assert "ms checks off" in text and "3.00x" in text
    assert report.split_checks(on) == ("B8-C5-fp32-fwd_bwd", True)
