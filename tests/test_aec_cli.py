"""`quell aec`: mic + reference files (or folders paired by name) through an echo canceller."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr
from click.testing import CliRunner

from quell.cli import main
from quell.dns.metrics import erle
from tests.delay_model import write_delay_model, write_subtractor_model
from tests.test_align import _talker

RATE = 16000


@pytest.fixture(scope="module")
def subtractor(tmp_path_factory):
    return str(write_subtractor_model(tmp_path_factory.mktemp("aec")))


def _scene(seconds: float = 6.0):
    """(mic, far, near): the far end 150 ms late in the mic, and a near-end talker in the last two seconds."""
    far, near = _talker(seconds, 1), _talker(seconds, 2)
    near[: -2 * RATE] = 0.0
    mic = np.concatenate([np.zeros(int(0.15 * RATE), np.float32), far])[: far.size] + near
    return mic, far, near


def _aec(*args: str):
    return CliRunner().invoke(main, ["aec", *args, "--quiet"])


def test_a_file_pair_loses_its_echo_and_keeps_the_near_end_aligned(subtractor, tmp_path):
    mic, far, near = _scene()
    sf.write(tmp_path / "mic.wav", mic, RATE, subtype="FLOAT")
    sf.write(tmp_path / "far.wav", far, RATE, subtype="FLOAT")
    result = _aec("--mic", str(tmp_path / "mic.wav"), "--ref", str(tmp_path / "far.wav"),
                  "-o", str(tmp_path / "out.wav"), "-m", subtractor)
    assert result.exit_code == 0, result.output
    out, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == RATE and out.shape == mic.shape
    echo_only = slice(2 * RATE, 4 * RATE)
    assert erle(mic[echo_only], out[echo_only]) > 20
    talk = slice(4 * RATE + 1600, None)
    np.testing.assert_allclose(out[talk], near[talk], atol=0.02)  # the near end, at the mic's timing


def test_reference_at_another_rate_stereo_and_short_is_adapted_and_said(subtractor, tmp_path):
    mic, far, _ = _scene()
    far44 = soxr.resample(far, RATE, 44100)[: int(5 * 44100)]  # also a second short
    sf.write(tmp_path / "mic.wav", mic, RATE)
    sf.write(tmp_path / "far.wav", np.stack([far44, far44], axis=1), 44100)
    result = _aec("--mic", str(tmp_path / "mic.wav"), "--ref", str(tmp_path / "far.wav"),
                  "-o", str(tmp_path / "out.wav"), "-m", subtractor)
    assert result.exit_code == 0, result.output
    for words in ("mixed to one", "resampled from 44100 to 16000", "padded with silence"):
        assert words in result.output
    out, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert erle(mic[2 * RATE : 4 * RATE], out[2 * RATE : 4 * RATE]) > 15


def test_folders_are_paired_by_name(subtractor, tmp_path):
    mic, far, _ = _scene()
    (tmp_path / "mics").mkdir()
    (tmp_path / "refs").mkdir()
    for name in ("a", "b"):
        sf.write(tmp_path / "mics" / f"{name}.wav", mic, RATE)
    sf.write(tmp_path / "refs" / "a.flac", far, RATE)
    result = _aec("--mic", str(tmp_path / "mics"), "--ref", str(tmp_path / "refs"), "-o", str(tmp_path / "out"),
                  "-m", subtractor)
    assert result.exit_code == 0, result.output
    assert "b.wav: no reference of the same name, only denoised" in result.output
    assert (tmp_path / "out" / "a.wav").is_file() and (tmp_path / "out" / "b.wav").is_file()
    cancelled, _ = sf.read(tmp_path / "out" / "a.wav", dtype="float32")
    passed, _ = sf.read(tmp_path / "out" / "b.wav", dtype="float32")
    echo_only = slice(2 * RATE, 4 * RATE)
    assert erle(mic[echo_only], cancelled[echo_only]) > 20 > erle(mic[echo_only], passed[echo_only])


def test_bad_input_is_one_line(subtractor, tmp_path):
    mic, far, _ = _scene(2.0)
    sf.write(tmp_path / "mic.wav", mic, RATE)
    missing = _aec("--mic", str(tmp_path / "mic.wav"), "--ref", str(tmp_path / "nope.wav"),
                   "-o", str(tmp_path / "o.wav"), "-m", subtractor)
    assert missing.exit_code == 2 and "nope.wav: no such file or folder" in missing.output
    denoiser = write_delay_model(tmp_path / "ns")
    wrong = _aec("--mic", str(tmp_path / "mic.wav"), "--ref", str(tmp_path / "mic.wav"),
                 "-o", str(tmp_path / "o.wav"), "-m", str(denoiser))
    assert wrong.exit_code == 2 and "not an echo canceller" in wrong.output
    assert not (tmp_path / "o.wav").exists()


def test_long_files_reach_the_canceller_in_short_pieces(subtractor, tmp_path, monkeypatch):
    """Memory stays flat with file length: the canceller's resamplers never see more than 100 ms at a time
    (handed a whole 10 s read block, a 48 kHz file took 650 MB)."""
    from quell.streaming.echo import EchoCanceller
    from quell.streaming.files import FileEnhancer

    rate = 48000
    mic, far, _ = _scene(3.0)
    mic, far = (soxr.resample(x, RATE, rate).astype(np.float32) for x in (mic, far))
    sf.write(tmp_path / "mic.wav", mic, rate, subtype="FLOAT")
    sf.write(tmp_path / "far.wav", far, rate, subtype="FLOAT")
    lengths: list[int] = []
    process = EchoCanceller.process

    def spy(self, chunk, reference=None):
        lengths.append(len(chunk))
        return process(self, chunk, reference)

    monkeypatch.setattr(EchoCanceller, "process", spy)
    FileEnhancer(subtractor).enhance(tmp_path / "mic.wav", tmp_path / "out.wav", reference=tmp_path / "far.wav")
    assert sum(lengths) >= mic.size and max(lengths) <= rate // 10
    out, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert out.shape == mic.shape
