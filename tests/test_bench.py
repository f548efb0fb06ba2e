"""`quell bench` runs and reports every figure the README quotes."""

from __future__ import annotations

import json

from click.testing import CliRunner

from quell.cli import main


def test_bench_reports_per_hop_cost_realtime_factors_load_time_and_memory(tiny_dtln_card):
    result = CliRunner().invoke(main, ["bench", "-m", str(tiny_dtln_card), "--hops", "300", "--seconds", "2",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["hops_timed"] == 300
    assert 0 < report["step_p50_ms"] <= report["step_p99_ms"] <= report["step_max_ms"]
    for key in ("streaming_rtf", "sequence_rtf", "file_rtf", "load_ms", "peak_memory_mb"):
        assert report[key] > 0, key


def test_bench_against_times_models_in_interleaved_rounds(tiny_dtln_card, delay_card):
    result = CliRunner().invoke(main, ["bench", "-m", str(tiny_dtln_card), "--against", str(delay_card),
                                       "--hops", "1000", "--rounds", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    dtln, delay = report[str(tiny_dtln_card)], report[str(delay_card)]
    assert len(dtln["round_p50_ms"]) == len(delay["round_p50_ms"]) == 3
    assert dtln["min_p50_ms"] <= dtln["median_p50_ms"]
    assert dtln["median_p50_ms"] > delay["median_p50_ms"]  # two LSTM stages cost more than a delay line
    text = CliRunner().invoke(main, ["bench", "-m", str(tiny_dtln_card), "--against", str(delay_card),
                                     "--hops", "1000", "--rounds", "1"])
    assert "interleaved rounds of 100 hops" in text.output and "median" in text.output
    same = CliRunner().invoke(main, ["bench", "-m", str(delay_card), "--against", str(delay_card)])
    assert same.exit_code == 2 and "distinct" in same.output
