"""`quell eval` on a generated set: one row per clip and system, the noisy row against direct metrics, a perfect
output scores like a perfect output, confidence intervals, conditions, missing engines, pairing problems, errors.

DNSMOS is real in one test (it costs ~0.4 s per 9 s window); elsewhere a stand-in or none keeps the tests fast.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from scipy import stats

from quell.cli import main
from quell.dns import baselines, evaluate
from quell.dns.evaluate import Evaluation, enhance_array, mean_ci
from quell.dns.metrics import si_sdr
from quell.streaming.files import FileEnhancer
from tests.test_baselines import voiced
from tests.test_cli import assert_one_error

RATE = 16000
SNRS = [-3.0, 5.0, 15.0, 25.0, 8.0, 12.0]  # every SNR bucket
ROOMS = ["none", "simulated", "none", "real", "none", "none"]


def fake_dnsmos(audio: np.ndarray, rate: int) -> dict[str, float]:
    """A cheap stand-in with DNSMOS's keys and range."""
    level = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return {"sig": 3.0, "bak": 1.0 + min(level * 10, 4.0), "ovrl": 2.5, "p808": 3.1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The layout of `quell synth`: noisy/, clean/ and metadata.csv beside them; 6 clips of 3 s."""
    root = tmp_path_factory.mktemp("set")
    rng = np.random.default_rng(0)
    rows = []
    for i, (snr, room) in enumerate(zip(SNRS, ROOMS, strict=True)):
        clean = voiced(RATE, 3.0, seed=i)
        noise = rng.standard_normal(clean.size) * np.sqrt(np.mean(clean**2) / 10 ** (snr / 10))
        name = f"clip_{i:05d}.wav"
        for folder, audio in (("clean", clean), ("noisy", clean + noise)):
            (root / folder).mkdir(exist_ok=True)
            sf.write(root / folder / name, audio.astype(np.float32), RATE, "PCM_16")
        layers = "generated:white@+0.0dB" if i % 3 else "noise:some/recording.flac+123@+0.0dB;music:x+1@-3.0dB"
        rows.append({"file": name, "snr_db": snr, "rir_source": room, "n_noise_layers": 1,
                     "noise_layers": layers, "realised_snr_db": snr})
    with open(root / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def run_eval(*args: str | Path):
    return CliRunner().invoke(main, ["eval", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def report(dataset, tiny_dtln_card, tmp_path_factory) -> tuple[Path, object]:
    """`quell eval` of the tiny model with the noisy input and SpeexDSP beside it."""
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "dnsmos", fake_dnsmos)
        result = run_eval("--noisy", dataset / "noisy", "--clean", dataset / "clean", "--model", tiny_dtln_card,
                          "--baselines", "noisy,speex", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_one_row_per_file_and_system_with_finite_scores(report):
    out, result = report
    rows = read_rows(out / "per_file.csv")
    summary = json.loads((out / "summary.json").read_text())["systems"]
    ran = [name for name, system in summary.items() if system["status"] == "ok"]
    assert {"noisy", "tiny"} <= set(ran) and list(summary) == ["noisy", "speex", "tiny"]
    assert sorted((r["file"], r["system"]) for r in rows) == sorted(
        (f"clip_{i:05d}.wav", system) for i in range(6) for system in ran)
    for row in rows:
        for metric in (*evaluate.REFERENCE_METRICS, *evaluate.DNSMOS_METRICS):  # not the echo ones
            assert math.isfinite(float(row[metric])), (row["file"], row["system"], metric)
    assert summary["tiny"]["x_real_time"] > 1  # the model was timed
    assert summary["noisy"]["x_real_time"] is None  # the input is no engine
    table = result.stdout.strip().splitlines()
    assert table[-5].startswith("| system | PESQ-WB |") and table[-1].startswith("| tiny | ")  # printed at the end
    assert "±" in table[-1]


def test_noisy_row_is_the_input_scored_directly(report, dataset):
    rows = [r for r in read_rows(report[0] / "per_file.csv") if r["system"] == "noisy"]
    assert len(rows) == 6
    for row in rows:
        noisy = sf.read(dataset / "noisy" / row["file"], dtype="float32")[0]
        clean = sf.read(dataset / "clean" / row["file"], dtype="float32")[0]
        assert float(row["si_sdr"]) == pytest.approx(float(si_sdr(noisy, clean)), abs=1e-9)
        assert float(row["si_sdr_i"]) == 0.0


def test_conditions_snr_buckets_and_rooms(report):
    out = report[0]
    conditions = json.loads((out / "summary.json").read_text())["systems"]["noisy"]["conditions"]
    assert list(conditions) == ["all", "SNR < 0 dB", "SNR 0-10 dB", "SNR 10-20 dB", "SNR >= 20 dB",
                                "reverberant", "dry", "recorded noise", "white noise (generated)"]
    assert [conditions[c]["files"] for c in conditions] == [6, 1, 2, 2, 1, 2, 4, 2, 4]
    low, high = conditions["SNR < 0 dB"]["pesq_wb"]["mean"], conditions["SNR >= 20 dB"]["pesq_wb"]["mean"]
    assert low < high  # the noisier input scores worse
    markdown = (out / "summary.md").read_text()
    for heading in ("## SNR < 0 dB (1 file)", "## SNR 10-20 dB (2 files)", "## reverberant (2 files)", "## dry"):
        assert heading in markdown
    summary = read_rows(out / "summary.csv")
    assert {(r["system"], r["condition"]) for r in summary if r["metric"] == "stoi"} >= {
        ("noisy", "SNR >= 20 dB"), ("tiny", "dry")}
    if any(n.endswith(".png") for n in report[1].stdout.split()):  # with matplotlib
        assert (out / "boxplots.png").stat().st_size > 0 and (out / "vs_snr.png").stat().st_size > 0


def test_clean_as_enhanced_scores_perfectly(dataset):
    result = evaluate.evaluate(dataset / "noisy", dataset / "clean", enhanced=dataset / "clean", baselines=[],
                               use_dnsmos=False)
    assert list(result.systems) == ["clean"] and result.metrics == list(evaluate.REFERENCE_METRICS)
    scores = result.stats("clean")
    assert scores["pesq_wb"].mean == pytest.approx(4.64, abs=0.01)
    assert scores["stoi"].mean == pytest.approx(1.0, abs=1e-3) and scores["estoi"].mean == pytest.approx(1, abs=1e-3)
    assert scores["si_sdr"].mean > 60 and scores["si_sdr_i"].mean > 40


def test_confidence_interval_is_students_t():
    sample = [3.1, 2.4, 3.9, 2.8, 3.3, 2.2, 4.0]
    low, high = stats.t.interval(0.95, len(sample) - 1, loc=np.mean(sample), scale=stats.sem(sample))
    stat = mean_ci([*sample, math.nan])  # undefined scores are left out
    assert stat.n == 7 and stat.mean == pytest.approx(np.mean(sample))
    assert stat.ci95 == pytest.approx((high - low) / 2, rel=1e-12)
    assert math.isnan(mean_ci([1.0]).ci95) and mean_ci([]).n == 0
    assert stat.format(2) == f"{np.mean(sample):.2f} ± {(high - low) / 2:.2f}"


def test_without_clean_only_dnsmos_is_computed(dataset, tmp_path):
    result = run_eval("--noisy", dataset / "noisy", "--out", tmp_path, "--limit", "1")
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "per_file.csv")
    assert len(rows) == 1 and rows[0]["system"] == "noisy"
    assert {k for k in rows[0] if k.startswith(("pesq", "stoi", "estoi", "si_sdr"))} == set()
    for metric in evaluate.DNSMOS_METRICS:
        assert 1.0 <= float(rows[0][metric]) <= 5.0, metric
    assert "| noisy |" in result.stdout and "SIG" in result.stdout


def test_a_missing_engine_is_a_row_with_its_reason(dataset, monkeypatch):
    monkeypatch.setattr(baselines.RNNoise, "available", classmethod(lambda cls: "librnnoise is not here"))
    result = evaluate.evaluate(dataset / "noisy", dataset / "clean", baselines=["noisy", "rnnoise"], limit=2,
                               use_dnsmos=False)
    assert result.systems["rnnoise"].status == "missing: librnnoise is not here"
    assert "| rnnoise | missing: librnnoise is not here |" in result.markdown()
    assert {row["system"] for row in result.rows} == {"noisy"}
    assert not any("rnnoise" in line for line in result.warnings)  # said once, in the table


def test_mismatched_unreadable_and_short_files_are_reported_and_skipped(dataset, tmp_path):
    noisy, clean, enhanced = (shutil.copytree(dataset / source, tmp_path / name) for source, name in
                              (("noisy", "noisy"), ("clean", "clean"), ("clean", "enhanced")))
    (clean / "clip_00001.wav").unlink()
    sf.write(clean / "extra.wav", np.zeros(RATE, np.float32), RATE)
    (noisy / "clip_00002.wav").write_text("not audio")
    short = sf.read(enhanced / "clip_00003.wav", dtype="float32")[0][:-500]
    sf.write(enhanced / "clip_00003.wav", short, RATE, "FLOAT")
    result = evaluate.evaluate(noisy, clean, enhanced=enhanced, baselines=["noisy"], use_dnsmos=False)
    assert len(result.warnings) == 3, result.warnings
    names, unreadable, lengths = result.warnings
    assert names.startswith("2 file names not in every folder, skipped: ")
    assert "clip_00001.wav (no clean)" in names and "extra.wav (only in clean)" in names
    assert unreadable.startswith("1 file unreadable, skipped: ") and "clip_00002.wav" in unreadable
    assert lengths.startswith("1 file of different lengths, cut to the shorter: clip_00003.wav")
    assert "enhanced 47500" in lengths
    assert sorted({row["file"] for row in result.rows}) == [f"clip_{i:05d}.wav" for i in (0, 3, 4, 5)]
    assert len(result.rows) == 8  # noisy and the enhanced folder's system on each


def test_without_matplotlib_there_are_no_plots_and_a_note(dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    result = evaluate.evaluate(dataset / "noisy", dataset / "clean", limit=1, use_dnsmos=False)
    written = result.write(tmp_path)
    assert [p.name for p in written] == ["per_file.csv", "summary.csv", "summary.json", "summary.md"]
    note = "no plots: matplotlib is not installed"
    assert note in result.warnings and note in json.loads((tmp_path / "summary.json").read_text())["warnings"]


def test_array_path_equals_the_file_path(dataset, tiny_dtln_card, tmp_path):
    enhancer = FileEnhancer(tiny_dtln_card)
    src = dataset / "noisy" / "clip_00000.wav"
    enhancer.enhance(src, tmp_path / "out.wav", subtype="FLOAT")
    audio = sf.read(src, dtype="float32")[0]
    out, model_seconds = enhance_array(enhancer, audio, RATE)
    assert out.shape == audio.shape and model_seconds > 0
    np.testing.assert_allclose(out, sf.read(tmp_path / "out.wav", dtype="float32")[0], atol=1e-6)


def test_two_jobs_give_the_same_scores(dataset, tiny_dtln_card):
    one, two = (evaluate.evaluate(dataset / "noisy", dataset / "clean", model=tiny_dtln_card, baselines=["noisy"],
                                  limit=2, jobs=jobs, use_dnsmos=False) for jobs in (1, 2))
    assert isinstance(two, Evaluation) and len(two.rows) == 4
    for a, b in zip(one.rows, two.rows, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert value == pytest.approx(b[key], abs=1e-6) if isinstance(value, float) else value == b[key], key


@pytest.mark.parametrize("args, words", [
    (["--noisy", "{tmp}/nope", "--out", "{tmp}/out"], ["nope", "no such folder"]),
    (["--noisy", "{set}/noisy", "--clean", "{tmp}/gone", "--out", "{tmp}/out"], ["gone", "no such folder"]),
    (["--noisy", "{set}/noisy", "--baselines", "noisy,magic", "--out", "{tmp}/out"], ["unknown baseline", "magic"]),
    (["--noisy", "{set}/noisy", "--enhanced", "{set}/clean", "--model", "dtln", "--out", "{tmp}/out"], ["not both"]),
    (["--noisy", "{set}", "--clean", "{set}/clean", "--out", "{tmp}/out"], ["no file has its counterpart"]),
], ids=["noisy", "clean", "baseline", "both", "unpaired"])
def test_bad_arguments_are_one_error_line(dataset, tmp_path, args, words):
    result = run_eval(*(a.format(tmp=tmp_path, set=dataset) for a in args))
    assert_one_error(result, 2, *words)
    assert not (tmp_path / "out").exists()


def test_update_card_records_the_scores_and_the_command(dataset, tiny_dtln_card, tmp_path, monkeypatch):
    import shutil

    from quell.streaming.card import ModelCard

    for path in Path(tiny_dtln_card).parent.glob("tiny*"):  # a copy: the session's card stays as it is
        shutil.copy(path, tmp_path / path.name)
    card_path = tmp_path / "tiny.json"
    monkeypatch.setattr(evaluate, "dnsmos", fake_dnsmos)
    result = run_eval("--noisy", dataset / "noisy", "--clean", dataset / "clean", "--model", card_path,
                      "--baselines", "noisy", "--out", tmp_path / "out", "--update-card")
    assert result.exit_code == 0, result.output
    recorded = ModelCard.load(card_path).scores[dataset.name]
    assert recorded["command"] == (f"quell eval --noisy {dataset / 'noisy'} --clean {dataset / 'clean'} "
                                   f"--model {card_path} --baselines noisy --out {tmp_path / 'out'}")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["systems"]
    assert recorded["model"]["scores"]["pesq_wb"]["mean"] == summary["tiny"]["conditions"]["all"]["pesq_wb"]["mean"]
    assert recorded["peers"]["noisy"]["scores"]["si_sdr_i"]["mean"] == 0.0
