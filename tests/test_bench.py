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
