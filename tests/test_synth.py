"""Tests of the corpus readers and the noisy-speech synthesizer, on small signals written to tmp folders."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from quell.dns.corpora import Corpus, dns_layout, load_audio, load_corpus
from quell.dns.synth import (
    NOISE_KINDS,
    SynthConfig,
    Synthesizer,
    generate_noise,
    trim_rir,
    write_dataset,
)

RATE = 16000
QUIET = dict(reverb_prob=0.0, mic_eq_prob=0.0, bandlimit_prob=0.0, n_sim_rirs=0)


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Voiced "syllables": harmonics of a gliding pitch under 4-6 Hz bursts, plus a little breath noise."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    pitch = rng.uniform(100, 220) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 15))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(4, 6) * t + rng.uniform(0, 6)), 0, None) ** 2
    signal = voiced * syllables + 0.05 * rng.standard_normal(n)
    return (0.1 * signal / np.sqrt(np.mean(signal**2))).astype(np.float32)


def write_wav(path: Path, signal: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, signal, rate, subtype=subtype)
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Corpus]:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for index, seconds in enumerate([1.6, 0.7, 2.5]):  # 0.7 s is shorter than a 1 s segment
        write_wav(root / "speech" / f"talker{index}.wav", speech_like(rng, seconds))
    for index in range(2):
        write_wav(root / "noise" / f"noise{index}.flac", 0.05 * rng.standard_normal(RATE).astype(np.float32))
    return {
        "speech": load_corpus(root / "speech", RATE, "speech"),
        "noise": load_corpus(root / "noise", RATE, "noise"),
    }


def rms_db(signal: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(signal, dtype=np.float64))))


def peak_lag(reference: np.ndarray, delayed: np.ndarray) -> int:
    """Lag (samples) at which `delayed` best matches `reference`, from the FFT cross-correlation."""
    size = 2 * len(reference)
    correlation = np.fft.irfft(np.fft.rfft(delayed, size) * np.conj(np.fft.rfft(reference, size)), size)
    lag = int(np.argmax(correlation))
    return lag if lag < len(reference) else lag - size


# ---------------------------------------------------------------------------------------------- corpora


def test_load_audio_mixes_to_mono_and_resamples(tmp_path):
    stereo = np.stack([np.full(800, 0.2), np.full(800, 0.4)], axis=1).astype(np.float32)
    audio = load_audio(write_wav(tmp_path / "stereo.wav", stereo, rate=8000, subtype="FLOAT"), RATE)
    assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) == 1600
    assert np.allclose(audio[200:-200], 0.3, atol=1e-3)


def test_load_corpus_skips_and_reports_bad_files(tmp_path, caplog):
    rng = np.random.default_rng(1)
    write_wav(tmp_path / "good.wav", speech_like(rng, 1.0))
    write_wav(tmp_path / "sub" / "short.wav", speech_like(rng, 0.1))
    write_wav(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32))
    write_wav(tmp_path / "nan.wav", np.full(RATE, np.nan, dtype=np.float32), subtype="FLOAT")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF....this is not audio")
    (tmp_path / "notes.txt").write_text("not an audio file name: ignored")

    with caplog.at_level(logging.WARNING, logger="quell.dns.corpora"):
        corpus = load_corpus(tmp_path, RATE, "speech", min_seconds=0.5)

    assert [Path(p).name for p in corpus.paths] == ["good.wav"]
    assert corpus.total_seconds() == pytest.approx(1.0)
    reasons = {Path(path).name: reason for path, reason in corpus.skipped}
    assert set(reasons) == {"short.wav", "empty.wav", "nan.wav", "corrupt.wav"}
    assert reasons["empty.wav"] == "empty" and reasons["corrupt.wav"].startswith("unreadable")
    assert "shorter" in reasons["short.wav"] and "NaN" in reasons["nan.wav"]
    assert len(caplog.records) == 1 and "skipped 4 file(s)" in caplog.records[0].getMessage()


def test_load_corpus_raises_for_missing_or_unusable_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing", RATE, "noise")
    (tmp_path / "broken.wav").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no usable audio"):
        load_corpus(tmp_path, RATE, "noise")


def test_dns_layout_finds_the_challenge_folders(tmp_path):
    for name in ("datasets/clean", "datasets/noise", "datasets/impulse_responses"):
        (tmp_path / name).mkdir(parents=True)
    assert dns_layout(tmp_path) == {
        "speech": tmp_path / "datasets/clean",
        "noise": tmp_path / "datasets/noise",
        "rir": tmp_path / "datasets/impulse_responses",
    }
    (tmp_path / "noise").mkdir()
    assert dns_layout(tmp_path)["noise"] == tmp_path / "noise"
    assert dns_layout(tmp_path / "datasets" / "clean") == {}


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_generated_noise_is_finite_with_unit_rms(kind, corpora):
    noise = generate_noise(kind, RATE, np.random.default_rng(3), RATE, corpora["speech"].clips)
    assert noise.dtype == np.float32 and noise.shape == (RATE,)
    assert np.all(np.isfinite(noise))
    assert np.sqrt(np.mean(noise.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-3)


def test_generate_noise_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown noise kind"):
        generate_noise("rain", 100, np.random.default_rng(0), RATE)


# ---------------------------------------------------------------------------------------------- mixtures


@pytest.mark.parametrize("colouring", [0.0, 1.0])
def test_mixture_has_requested_snr_and_level(corpora, colouring):
    config = SynthConfig(
        segment_seconds=1.0,
        snr_db=(7.0, 7.0),
        level_dbfs=(-28.0, -28.0),
        **{**QUIET, "mic_eq_prob": colouring, "bandlimit_prob": colouring},
    )
    synth = Synthesizer(config, corpora["speech"], corpora["noise"])
    for seed in range(4):
        mixture = synth.mixture(seed)
        heard = mixture.noisy - mixture.noise
        assert not mixture.params["clipped_guard"]
        assert rms_db(heard) - rms_db(mixture.noise) == pytest.approx(7.0, abs=0.5)
        assert rms_db(mixture.noisy) == pytest.approx(-28.0, abs=0.5)
        assert mixture.params["realised_snr_db"] == pytest.approx(7.0, abs=0.5)
        assert bool(mixture.params["mic_eq"]) == bool(colouring)


def test_mic_colouration_reaches_the_target_too(corpora):
    """Without reverb the target is exactly the speech as the coloured mic hears it (noisy minus noise)."""
    config = SynthConfig(segment_seconds=1.0, **{**QUIET, "mic_eq_prob": 1.0, "bandlimit_prob": 1.0})
    mixture = Synthesizer(config, corpora["speech"], corpora["noise"]).mixture(3)
    np.testing.assert_allclose(mixture.noisy - mixture.noise, mixture.clean, atol=1e-5)
    uncoloured = Synthesizer(SynthConfig(segment_seconds=1.0, **QUIET), corpora["speech"]).mixture(3)
    def shape(x: np.ndarray) -> np.ndarray:
        return x / np.abs(x).max()

    assert np.abs(shape(uncoloured.clean) - shape(mixture.clean)).max() > 0.01  # the same speech, coloured


def test_loud_mixture_is_scaled_under_the_clip_guard(corpora):
    config = SynthConfig(segment_seconds=1.0, level_dbfs=(-3.0, -3.0), **QUIET)
    mixture = Synthesizer(config, corpora["speech"], corpora["noise"]).mixture(0)
    assert mixture.params["clipped_guard"]
    assert max(np.abs(s).max() for s in (mixture.noisy, mixture.clean, mixture.noise)) <= 0.99 + 1e-6


def test_same_seed_same_mixture_other_seed_other_mixture(corpora):
    config = SynthConfig(segment_seconds=1.0, generated_noise_prob=0.5, n_sim_rirs=0)
    first = Synthesizer(config, corpora["speech"], corpora["noise"]).mixture(11)
    again = Synthesizer(config, corpora["speech"], corpora["noise"]).mixture(11)
    other = Synthesizer(config, corpora["speech"], corpora["noise"]).mixture(12)
    for name in ("noisy", "clean", "noise"):
        assert getattr(first, name).dtype == np.float32 and len(getattr(first, name)) == RATE
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.params == again.params
    assert not np.array_equal(first.noisy, other.noisy)


def test_simulated_reverberant_target_is_aligned_with_mixture(corpora, tmp_path):
    config = SynthConfig(
        segment_seconds=1.0, snr_db=(30.0, 30.0), **{**QUIET, "reverb_prob": 1.0, "n_sim_rirs": 2}
    )
    synth = Synthesizer(config, corpora["speech"], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("rir_bank_*.npz"))) == 1
    assert len(Synthesizer(config, corpora["speech"], cache_dir=tmp_path).simulated_rooms) == 2  # from cache
    for seed in range(3):
        mixture = synth.mixture(seed)
        assert mixture.params["rir_source"] == "simulated"
        assert not np.allclose(
            mixture.clean, mixture.noisy - mixture.noise, atol=1e-3
        )  # target is not the mix
        assert peak_lag(mixture.clean, mixture.noisy) == 0


def test_measured_rir_is_trimmed_and_target_aligned(corpora, tmp_path):
    rng = np.random.default_rng(5)
    tail = np.arange(RATE // 2)
    rir = np.concatenate([1e-4 * rng.standard_normal(300), 0.1 * rng.standard_normal(len(tail))])
    rir[300 + tail] *= np.exp(-tail / (0.08 * RATE))
    rir[300] = -0.8  # direct path (negative polarity: it is flipped to +1)
    trimmed = trim_rir(rir.astype(np.float32), RATE)
    assert int(np.argmax(np.abs(trimmed))) == 2 and trimmed[2] == pytest.approx(1.0)

    rirs = load_corpus(write_wav(tmp_path / "rir" / "room.wav", rir, subtype="FLOAT").parent, RATE, "rir")
    config = SynthConfig(segment_seconds=1.0, snr_db=(30.0, 30.0), **{**QUIET, "reverb_prob": 1.0})
    mixture = Synthesizer(config, corpora["speech"], rirs=rirs).mixture(0)
    assert mixture.params["rir_source"] == "real" and mixture.params["rir_id"].endswith("room.wav")
    assert peak_lag(mixture.clean, mixture.noisy) == 0


def test_write_dataset_writes_dns_layout_and_metadata(corpora, tmp_path):
    config = SynthConfig(segment_seconds=0.5, n_sim_rirs=0)
    synth = Synthesizer(config, corpora["speech"], corpora["noise"])
    out = write_dataset(tmp_path / "set", synth, n_clips=3, seed=4)

    for folder in ("noisy", "clean", "noise"):
        names = sorted(p.name for p in (out / folder).iterdir())
        assert names == ["clip_00000.wav", "clip_00001.wav", "clip_00002.wav"]
        info = sf.info(out / folder / "clip_00001.wav")
        assert (info.samplerate, info.frames, info.subtype) == (RATE, RATE // 2, "PCM_16")
    with open(out / "metadata.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["file"] for row in rows] == ["clip_00000.wav", "clip_00001.wav", "clip_00002.wav"]
    for column in (
        "seed",
        "speech_files",
        "noise_layers",
        "snr_db",
        "level_dbfs",
        "rir_source",
        "clipped_guard",
    ):
        assert column in rows[0]

    # any clip can be regenerated from its seed in the metadata
    regenerated = synth.mixture(int(rows[1]["seed"]))
    written, _ = sf.read(out / "noisy" / "clip_00001.wav", dtype="float32")
    np.testing.assert_allclose(written, regenerated.noisy, atol=1 / 32768 + 1e-6)
    assert float(rows[1]["snr_db"]) == regenerated.params["snr_db"]

    with pytest.raises(ValueError, match="not empty"):
        write_dataset(out, synth, n_clips=1)
    write_dataset(out, synth, n_clips=1, overwrite=True)
    assert sorted(p.name for p in (out / "noisy").iterdir()) == ["clip_00000.wav"]
    assert not list(out.rglob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- echo scenarios


def _echo_synth(corpora, tmp_path, **overrides):
    from quell.dns.synth import EchoConfig, EchoSynthesizer

    near = SynthConfig(**{**QUIET, "n_sim_rirs": 3})
    config = EchoConfig(**{"segment_seconds": 2.0, "near": near, **overrides})
    return EchoSynthesizer(config, corpora["speech"], corpora["speech"], corpora["noise"], cache_dir=tmp_path)


@pytest.mark.parametrize("scenario", ["far_end", "near_end", "double_talk"])
def test_echo_scenarios_have_the_right_talkers(corpora, tmp_path, scenario):
    probs = tuple(float(s == scenario) for s in ("far_end", "near_end", "double_talk"))
    synth = _echo_synth(corpora, tmp_path, scenario_probs=probs, ser_db=(4.0, 4.0))
    mixture = synth.mixture(1)
    assert mixture.params["scenario"] == scenario
    signals = (mixture.mic, mixture.reference, mixture.near, mixture.echo, mixture.noise)
    assert all(s.dtype == np.float32 and s.shape == (2 * RATE,) for s in signals)
    near_heard = mixture.mic - mixture.echo - mixture.noise
    if scenario == "far_end":
        assert not mixture.near.any() and np.abs(near_heard).max() < 1e-6 and mixture.echo.any()
    elif scenario == "near_end":
        assert not mixture.reference.any() and not mixture.echo.any() and mixture.near.any()
    else:
        assert rms_db(near_heard) - rms_db(mixture.echo) == pytest.approx(4.0, abs=0.5)
        assert mixture.params["realised_ser_db"] == pytest.approx(4.0, abs=0.5)


def test_late_onset_leaves_the_far_end_alone_first(corpora, tmp_path):
    from quell.dns.synth import EchoConfig

    synth = _echo_synth(corpora, tmp_path, scenario_probs=(0.0, 0.0, 1.0), late_onset_prob=1.0,
                        late_onset=(0.8, 1.2))
    plain = _echo_synth(corpora, tmp_path, scenario_probs=(0.0, 0.0, 1.0)).mixture(3)
    mixture = synth.mixture(3)
    onset = mixture.params["near_onset"]
    assert 0.8 <= onset <= 1.2 and plain.params["near_onset"] is None
    start = int((onset - 0.001) * RATE)  # the onset is kept in ms
    near_heard = mixture.mic - mixture.echo - mixture.noise
    assert not mixture.near[:start].any() and np.abs(near_heard[:start]).max() < 1e-6
    after = slice(start + RATE // 100 + 2 * RATE // 1000, None)  # past the 10 ms fade: as without the onset
    np.testing.assert_allclose(mixture.near[after], plain.near[after], atol=1e-6)
    np.testing.assert_allclose(mixture.echo, plain.echo, atol=1e-6)
    with pytest.raises(ValueError, match="late_onset must end before"):
        EchoConfig(segment_seconds=2.0, late_onset_prob=0.5, late_onset=(1.0, 3.0))


def test_echo_mixture_is_deterministic(corpora, tmp_path):
    synth = _echo_synth(corpora, tmp_path)
    a, b, c = synth.mixture(5), synth.mixture(5), synth.mixture(6)
    np.testing.assert_array_equal(a.mic, b.mic)
    np.testing.assert_array_equal(a.reference, b.reference)
    assert a.params == b.params
    assert not np.array_equal(a.mic, c.mic)


def test_planted_echo_delay_is_where_the_reference_reappears(corpora, tmp_path):
    from quell.streaming.align import DelayEstimator

    synth = _echo_synth(corpora, tmp_path, scenario_probs=(1.0, 0.0, 0.0), delay=(0.05, 0.3),
                        nonlinearity_prob=0.0, path_change_prob=0.0, segment_seconds=4.0)
    mixture = synth.mixture(2)
    estimator = DelayEstimator(RATE, max_delay=0.4, window=1.0)
    for i in range(0, mixture.mic.size, 800):
        estimator.push(mixture.mic[i : i + 800], mixture.reference[i : i + 800])
    assert estimator.estimate is not None
    # simulated RIRs keep 2 samples before their direct path
    assert abs(estimator.estimate.delay - mixture.params["delay"] - 2 / RATE) < 0.001


def test_loudspeaker_nonlinearities():
    from quell.dns.synth import loudspeaker

    rng = np.random.default_rng(0)
    x = np.sin(np.linspace(0, 20, 1000))
    clipped, params = loudspeaker(x, "hard_clip", rng)
    assert np.abs(clipped).max() == pytest.approx(1.0) and np.mean(np.abs(clipped) > 0.999) > 0.1
    soft, _ = loudspeaker(x, "soft_clip", rng)
    assert np.abs(soft).max() <= 1.0 + 1e-9 and not np.allclose(soft, x)
    poly, params = loudspeaker(x, "polynomial", rng)
    assert set(params) == {"a2", "a3"}
    with pytest.raises(ValueError, match="unknown loudspeaker"):
        loudspeaker(x, "tube", rng)


def test_speed_perturbation_raises_pitch_and_keeps_length(tmp_path):
    t = np.arange(3 * RATE) / RATE
    write_wav(tmp_path / "speech" / "tone.wav", (0.1 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    speech = load_corpus(tmp_path / "speech", RATE, "speech")
    config = SynthConfig(segment_seconds=1.0, snr_db=(40.0, 40.0), speed_prob=1.0, speed_range=(1.2, 1.2), **QUIET)
    mixture = Synthesizer(config, speech).mixture(5)
    assert len(mixture.clean) == RATE and mixture.params["speed"] == 1.2
    spectrum = np.abs(np.fft.rfft(mixture.clean * np.hanning(RATE)))
    assert np.argmax(spectrum) == pytest.approx(240, abs=2)  # 1 Hz bins
    plain = Synthesizer(SynthConfig(segment_seconds=1.0, snr_db=(40.0, 40.0), **QUIET), speech).mixture(5)
    assert plain.params["speed"] == 1.0
    assert np.argmax(np.abs(np.fft.rfft(plain.clean * np.hanning(RATE)))) == pytest.approx(200, abs=2)
    with pytest.raises(ValueError, match="speed_range"):
        SynthConfig(speed_range=(0.0, 1.1))
