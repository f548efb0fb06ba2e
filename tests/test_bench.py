"""`quell bench` runs and reports every figure the README quotes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from quell.cli import main
from quell.streaming.bench import ReleaseRuntime
from quell.streaming.engine import StreamingModel


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


def _release_folder(tiny_dtln, folder):
    """The tiny DTLN of the suite written in the release's two-graph layout through `quell export`."""
    torch = pytest.importorskip("torch")
    model, _ = tiny_dtln
    checkpoint = {"recipe": {"model": "dtln", "model_args": {"hidden": 32, "encoder": 64}},
                  "model": model.state_dict(), "state": {"step": 1, "epoch": 1, "best": 0.0}}
    torch.save(checkpoint, folder / "tiny.pt")
    result = CliRunner().invoke(main, ["export", str(folder / "tiny.pt"), "--release-layout", "-o",
                                       str(folder / "release")])
    assert result.exit_code == 0, result.output
    return folder / "release"


def test_the_release_runtime_computes_what_the_step_graph_does(tiny_dtln, tmp_path):
    """The comparison is fair only if both ways of running compute the same enhanced signal."""
    release = ReleaseRuntime(_release_folder(tiny_dtln, tmp_path))
    engine = StreamingModel(tiny_dtln[1])
    rng = np.random.default_rng(1)
    t = np.arange(200 * 128) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
             + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    ours = np.concatenate([engine.step(audio[i : i + 128]).copy() for i in range(0, audio.size, 128)])
    theirs = np.concatenate([release.step(audio[i : i + 128]).copy() for i in range(0, audio.size, 128)])
    assert np.abs(ours).max() > 0.01  # the model passes signal: the comparison below is not of silence
    assert np.abs(ours - theirs).max() <= 1e-4


def test_bench_against_a_release_layout_folder(tiny_dtln, tiny_dtln_card, tmp_path):
    folder = _release_folder(tiny_dtln, tmp_path)
    result = CliRunner().invoke(main, ["bench", "-m", str(tiny_dtln_card), "--against", str(folder),
                                       "--hops", "1000", "--rounds", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report[str(folder)]["round_p50_ms"]) == 2
    # two sessions and numpy FFTs per hop cost more than one graph doing it all
    assert report[str(folder)]["median_p50_ms"] > report[str(tiny_dtln_card)]["median_p50_ms"]


def test_release_layout_refuses_int8_and_a_file(tiny_dtln, tmp_path):
    _release_folder(tiny_dtln, tmp_path)
    (tmp_path / "file").write_text("x")
    for extra, message in [(["--int8"], "drop --int8"), ([], "is a file")]:
        out = tmp_path / ("file" if not extra else "r2")
        result = CliRunner().invoke(main, ["export", str(tmp_path / "tiny.pt"), "--release-layout", "-o", str(out),
                                           *extra])
        assert result.exit_code != 0 and message in result.output
    assert (tmp_path / "file").read_text() == "x"
