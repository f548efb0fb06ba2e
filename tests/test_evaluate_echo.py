"""Echo sets and `quell eval --far-end`: the set `quell synth --echo` writes, ERLE on far-end single talk (0 dB for
the mic, > 20 dB for an ideal subtractor), AECMOS per scenario, scenario conditions, missing peers, errors.

The eval set is made here with exact echoes (the far end, delayed): the subtractor model (mic - aligned reference)
then cancels them fully once the runtime has found the delay. DNSMOS is off (it is the slow metric; tested apart).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from quell.cli import main
from quell.dns import baselines, evaluate, synth
from quell.dns.corpora import load_corpus
from quell.dns.synth import ECHO_SCENARIOS, EchoConfig, EchoSynthesizer, SynthConfig, write_echo_dataset
from tests.delay_model import write_delay_model, write_subtractor_model
from tests.test_align import _talker
from tests.test_cli import assert_one_error
from tests.test_synth import QUIET, speech_like, write_wav

RATE = 16000
SECONDS = 5.0
# (file, scenario, echo delay in seconds or None for a silent far end)
CLIPS = [("clip_00000.wav", "far_end", 0.12), ("clip_00001.wav", "far_end", 0.3),
         ("clip_00002.wav", "double_talk", 0.2), ("clip_00003.wav", "near_end", None)]
FOLDERS = ("mic", "far_end", "clean", "echo")


def _read(path: Path) -> np.ndarray:
    return sf.read(path, dtype="float32")[0]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _eval(*args: str | Path):
    return CliRunner().invoke(main, ["eval", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, Path]:
    """Two folders of speech-like clips (near and far talkers) and one of noise."""
    root = tmp_path_factory.mktemp("speech")
    rng = np.random.default_rng(0)
    for folder in ("near", "far"):
        for index, seconds in enumerate([1.6, 2.5]):
            write_wav(root / folder / f"talker{index}.wav", speech_like(rng, seconds))
    write_wav(root / "noise" / "noise.wav", 0.05 * rng.standard_normal(RATE).astype(np.float32))
    return {name: root / name for name in ("near", "far", "noise")}


@pytest.fixture(scope="module")
def echo_set(tmp_path_factory) -> Path:
    """mic/, far_end/, clean/ and metadata.csv (scenario per clip), in the layout of `quell synth --echo`."""
    root = tmp_path_factory.mktemp("echo_set")
    for folder in ("mic", "far_end", "clean"):
        (root / folder).mkdir()
    for index, (name, scenario, delay) in enumerate(CLIPS):
        far, near = _talker(SECONDS, 10 + index), 0.5 * speech_like(np.random.default_rng(index), SECONDS)
        if scenario == "far_end":
            near[:] = 0.0
        if delay is None:
            far[:], echo = 0.0, np.zeros_like(far)
        else:
            echo = np.concatenate([np.zeros(round(delay * RATE), np.float32), far])[: far.size]
        for folder, audio in (("mic", echo + near), ("far_end", far), ("clean", near)):
            sf.write(root / folder / name, audio, RATE, subtype="FLOAT")
    with open(root / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["file", "scenario", "delay"])
        writer.writeheader()
        writer.writerows({"file": name, "scenario": scenario, "delay": delay} for name, scenario, delay in CLIPS)
    return root


@pytest.fixture(scope="module")
def subtractor(tmp_path_factory) -> str:
    return str(write_subtractor_model(tmp_path_factory.mktemp("aec")))


@pytest.fixture(scope="module")
def echo_report(echo_set, subtractor, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("echo_report")
    result = _eval("--noisy", echo_set / "mic", "--far-end", echo_set / "far_end", "--clean", echo_set / "clean",
                   "--model", subtractor, "--baselines", "mic", "--no-dnsmos", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result


# ---------------------------------------------------------------------------------------------- the data


def test_write_echo_dataset_layout_and_metadata(speech, tmp_path):
    corpus = load_corpus(speech["near"], RATE, "speech")
    config = EchoConfig(segment_seconds=1.0, near=SynthConfig(**{**QUIET, "n_sim_rirs": 3}))
    echo_synth = EchoSynthesizer(config, corpus, corpus, load_corpus(speech["noise"], RATE, "noise"),
                                 cache_dir=tmp_path / "cache")
    out = write_echo_dataset(tmp_path / "set", echo_synth, n_clips=6, seed=2)

    names = [f"clip_{i:05d}.wav" for i in range(6)]
    for folder in FOLDERS:
        assert sorted(p.name for p in (out / folder).iterdir()) == names
        info = sf.info(out / folder / names[1])
        assert (info.samplerate, info.frames, info.subtype) == (RATE, RATE, "PCM_16")
    rows = _rows(out / "metadata.csv")
    assert [row["file"] for row in rows] == names
    for column in ("seed", "scenario", "delay", "ser_db", "nonlinearity", "echo_rir", "far_kind", "near_snr_db"):
        assert column in rows[0], column
    scenarios = {row["scenario"] for row in rows}
    assert scenarios <= set(ECHO_SCENARIOS) and len(scenarios) >= 2
    for row in rows:
        mic, far, clean, echo = (_read(out / folder / row["file"]) for folder in FOLDERS)
        if row["scenario"] == "far_end":
            assert not clean.any() and echo.any()
        if row["scenario"] == "near_end":
            assert not far.any() and not echo.any() and row["ser_db"] == ""  # a column only some clips have
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["segment_seconds"] == 1.0 and config_json["near"]["segment_seconds"] == 1.0

    # any clip can be regenerated from its seed
    again = echo_synth.mixture(int(rows[3]["seed"]))
    np.testing.assert_allclose(_read(out / "mic" / names[3]), again.mic, atol=1 / 32768 + 1e-6)
    np.testing.assert_allclose(_read(out / "far_end" / names[3]), again.reference, atol=1 / 32768 + 1e-6)
    with pytest.raises(ValueError, match="not empty"):
        write_echo_dataset(out, echo_synth, n_clips=1)
    assert not list(out.rglob(".*.tmp"))


def test_synth_echo_command_writes_a_set_that_eval_reads(speech, tmp_path, monkeypatch):
    rooms = [np.exp(-np.arange(200) / 30.0).astype(np.float32) * np.random.default_rng(i).standard_normal(200)
             for i in range(3)]
    monkeypatch.setattr(synth, "load_rir_bank", lambda *args, **kwargs: rooms)  # not 200 simulated rooms
    runner = CliRunner()
    result = runner.invoke(main, ["synth", "--echo", "-o", str(tmp_path / "set"), "-n", "4", "--seconds", "1",
                                  "--speech", str(speech["near"]), "--far-speech", str(speech["far"]),
                                  "--noise", str(speech["noise"]), "--seed", "1"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "wrote 4 echo clips" in result.output
    for folder in FOLDERS:
        assert len(list((tmp_path / "set" / folder).glob("clip_*.wav"))) == 4
    rows = _rows(tmp_path / "set" / "metadata.csv")
    far_talkers = [row["far_kind"] for row in rows if row["far_kind"].startswith("speech:")]
    assert far_talkers and all("far" in kind and "near" not in kind for kind in far_talkers)
    assert sf.info(tmp_path / "set" / "mic" / "clip_00000.wav").frames == RATE

    report = _eval("--noisy", tmp_path / "set" / "mic", "--far-end", tmp_path / "set" / "far_end",
                   "--clean", tmp_path / "set" / "clean", "--no-dnsmos", "--out", tmp_path / "report")
    assert report.exit_code == 0, (report.output, report.exception)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["systems"]
    assert list(summary) == ["mic"]  # the default peer of an echo set
    assert set(summary["mic"]["conditions"]) == {"all", *(row["scenario"] for row in rows)}

    # the noise set is written as before
    result = runner.invoke(main, ["synth", "-o", str(tmp_path / "noise_set"), "-n", "1", "--seconds", "0.5",
                                  "--speech", str(speech["near"])])
    assert result.exit_code == 0, (result.output, result.exception)
    assert sf.info(tmp_path / "noise_set" / "noisy" / "clip_00000.wav").frames == RATE // 2


# ---------------------------------------------------------------------------------------------- eval --far-end


def test_erle_on_far_end_single_talk(echo_report):
    out, result = echo_report
    rows = _rows(out / "per_file.csv")
    assert sorted((r["file"], r["system"]) for r in rows) == sorted(
        (name, system) for name, *_ in CLIPS for system in ("mic", "subtract"))
    for row in rows:
        if row["scenario"] != "far_end":
            assert row["erle"] == "", row  # ERLE only where the mic holds echo alone
        elif row["system"] == "mic":
            assert float(row["erle"]) == pytest.approx(0.0, abs=1e-9)
        else:
            assert float(row["erle"]) > 20, row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["far_end"].endswith("far_end")
    assert summary["systems"]["subtract"]["conditions"]["far_end"]["erle"]["mean"] > 20
    assert summary["systems"]["subtract"]["x_real_time"] > 1  # the canceller was timed
    assert summary["systems"]["mic"]["x_real_time"] is None  # the input is no engine
    assert "| system | ERLE | AECMOS echo | AECMOS deg | PESQ-WB |" in result.stdout
    assert "ERLE (dB) on far-end single talk" in (out / "summary.md").read_text()


def test_aecmos_and_reference_metrics_follow_the_scenario(echo_report):
    rows = _rows(echo_report[0] / "per_file.csv")
    for row in rows:
        scenario = row["scenario"]
        for column, scored in (("aecmos_echo", scenario != "near_end"),
                               ("aecmos_degradation", scenario != "far_end"),
                               ("pesq_wb", scenario != "far_end"), ("si_sdr", scenario != "far_end")):
            assert (row[column] != "") == scored, (row["file"], row["system"], column)
        for column in ("aecmos_echo", "aecmos_degradation"):
            if row[column]:
                assert 1.0 <= float(row[column]) <= 5.0, (row["file"], row["system"], column)
    near_end = {row["system"]: row for row in rows if row["scenario"] == "near_end"}
    assert float(near_end["mic"]["si_sdr_i"]) == 0.0  # the mic is the near end there
    assert float(near_end["subtract"]["pesq_wb"]) > 4  # a silent far end: the subtractor passes the mic on


def test_scenarios_are_report_conditions(echo_report):
    out = echo_report[0]
    systems = json.loads((out / "summary.json").read_text())["systems"]
    for name in ("mic", "subtract"):
        conditions = systems[name]["conditions"]
        assert list(conditions) == ["all", "far_end", "near_end", "double_talk"]
        assert [conditions[c]["files"] for c in conditions] == [4, 2, 1, 1]
    markdown = (out / "summary.md").read_text()
    for heading in ("## far_end (2 files)", "## near_end (1 file)", "## double_talk (1 file)"):
        assert heading in markdown
    assert {r["condition"] for r in _rows(out / "summary.csv") if r["metric"] == "erle"} >= {"all", "far_end"}


def test_a_missing_echo_peer_is_listed_with_its_reason(echo_set, monkeypatch):
    monkeypatch.setattr(baselines.WebRtcAEC3, "available", classmethod(lambda cls: "pywebrtc-audio is not here"))
    result = evaluate.evaluate(echo_set / "mic", echo_set / "clean", baselines=["mic", "webrtc"], limit=1,
                               use_dnsmos=False, far_end=echo_set / "far_end")
    assert list(result.systems) == ["mic", "webrtc"]
    assert result.systems["webrtc"].status == "missing: pywebrtc-audio is not here"
    assert "| webrtc | missing: pywebrtc-audio is not here |" in result.markdown()
    assert {row["system"] for row in result.rows} == {"mic"}


def test_without_metadata_erle_comes_from_silent_clean_and_aecmos_is_skipped(echo_set, tmp_path):
    for folder in ("mic", "far_end", "clean"):
        shutil.copytree(echo_set / folder, tmp_path / folder)
    result = evaluate.evaluate(tmp_path / "mic", tmp_path / "clean", baselines=["mic"], use_dnsmos=False,
                               far_end=tmp_path / "far_end")
    erle = {row["file"]: row.get("erle") for row in result.rows}
    assert erle == {"clip_00000.wav": 0.0, "clip_00001.wav": 0.0, "clip_00002.wav": None, "clip_00003.wav": None}
    assert not any(key.startswith("aecmos") for row in result.rows for key in row)
    assert result.conditions() == ["all"]
    skipped = [line for line in result.warnings if "AECMOS" in line]
    assert len(skipped) == 1 and skipped[0].startswith("4 files without a scenario"), result.warnings
    assert math.isfinite(result.stats("mic")["pesq_wb"].mean)  # double talk and near end: against clean


@pytest.mark.parametrize("what, words", [
    ("denoiser", ["takes no far-end reference", "--far-end needs an echo canceller"]),
    ("noise peer", ["unknown echo baseline", "noisy", "known: mic, webrtc, speex"]),
    ("missing far end", ["gone", "no such folder"]),
])
def test_bad_far_end_arguments_are_one_error_line(echo_set, tmp_path, what, words):
    args = ["--noisy", echo_set / "mic", "--far-end", echo_set / "far_end", "--out", tmp_path / "out", "--no-dnsmos"]
    if what == "denoiser":
        args += ["--model", write_delay_model(tmp_path / "model")]
    elif what == "noise peer":
        args += ["--baselines", "noisy"]
    else:
        args[3] = tmp_path / "gone"
    assert_one_error(_eval(*args), 2, *words)
    assert not (tmp_path / "out").exists()
