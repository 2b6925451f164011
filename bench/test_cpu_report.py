"""Tests of bench/report.py on a hand-made GPU-like run (bench/fixtures/gpu_like_run.json, synthetic numbers)."""

import json
from pathlib import Path

import pytest

from bench import report

FIXTURE = Path(__file__).parent / "fixtures" / "gpu_like_run.json"


def test_markdown_table_and_header():
    data = json.loads(FIXTURE.read_text())
    text = report.markdown(data, "T")
    assert "- GPU: NVIDIA H200 (synthetic fixture)" in text
    assert "mamba_ssm 2.3.2.post1" in text and "SYNTHETIC" in text
    # ours 1255 us, reference 1160 us: ratio reference / ours = 0.92, floor 270 us = 0.22 of ours
    assert "| test_selective_scan_fwd[B8-D4096-L2048-N16] | 1.25 ms | 1.16 ms | 0.92 | 270.0 us | 0.22 |" in text
    assert "peak 700 MiB vs 828 MiB" in text and "tok/s 512 vs 284" in text
    assert "no reference: mamba_ssm.ops.triton.ssd_combined" in text
    assert text.count("## ") == len({b["group"] for b in data["benchmarks"]})


def test_sweeps_grouped_by_kind_and_n():
    found = report.sweeps(json.loads(FIXTURE.read_text()))
    assert sorted(found) == ["scan", "ssd"]
    assert sorted(found["scan"]) == [16, 64] and len(found["scan"][16]) == 3
    assert all(peer is None for _, _, peer in found["ssd"][64])


def test_main_writes_results_and_plots(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert report.main([str(FIXTURE), str(FIXTURE), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("test_generate[mamba1-1]") == 2  # two runs merged
    pytest.importorskip("matplotlib")
    for kind in ("scan", "ssd"):
        png = tmp_path / "plots" / f"{kind}_time_vs_L.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{kind}_time_vs_L.png)" in text


def test_cpu_run_without_extra_info(tmp_path):
    # The CPU suite records no ours_us: the report falls back to pytest-benchmark's median.
    data = json.loads(FIXTURE.read_text())
    bench = dict(data["benchmarks"][0], extra_info={}, group="g", name="test_x")
    bench["stats"] = dict(bench["stats"], median=0.0123)
    text = report.markdown(dict(data, benchmarks=[bench]))
    assert "| test_x | 12.30 ms | - | - | - | - |  |" in text


def test_bad_input_names_the_argument(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    with pytest.raises(SystemExit):
        report.main([str(bad)])
    assert "run:" in capsys.readouterr().err
