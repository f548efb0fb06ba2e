"""EchoCanceller plumbing: resampling, alignment and the reference path, with an ideal canceller model.

The test model outputs mic - reference: it cancels an echo that is an exact copy of the reference only if
the runtime hands it the reference at exactly the right delay, which is what these tests check.
"""

from __future__ import annotations

import numpy as np
import pytest

from quell.dns.metrics import erle
from quell.streaming.echo import EchoCanceller
from tests.delay_model import write_delay_model, write_subtractor_model
from tests.test_align import _talker

RATE = 16000


@pytest.fixture(scope="module")
def subtractor(tmp_path_factory):
    return write_subtractor_model(tmp_path_factory.mktemp("aec"))


def _run(canceller: EchoCanceller, mic: np.ndarray, far: np.ndarray | None, chunk: int) -> np.ndarray:
    return np.concatenate([
        canceller.process(mic[i : i + chunk], None if far is None else far[i : i + chunk])
        for i in range(0, len(mic), chunk)])


@pytest.mark.parametrize("rate", [16000, 48000])
def test_the_reference_is_aligned_with_its_echo(subtractor, rate):
    import soxr

    far = soxr.resample(_talker(8.0, 1), RATE, rate).astype(np.float32)
    delay = int(0.2 * rate)
    mic = np.concatenate([np.zeros(delay, np.float32), far])[: far.size]
    canceller = EchoCanceller(subtractor, sample_rate=rate)
    out = _run(canceller, mic, far, rate // 100)
    assert canceller.alignment is not None and abs(canceller.alignment.delay - 0.2) < 0.001
    settled = slice(5 * rate, None)
    assert erle(mic[settled], out[settled]) > 20  # a sub-sample misalignment would leave far more echo


def test_without_a_reference_it_is_a_plain_enhancer(subtractor):
    canceller = EchoCanceller(subtractor, sample_rate=RATE)
    mic = _talker(1.0, 2)
    out = _run(canceller, mic, None, 160)
    lag = round(canceller.latency_samples)
    np.testing.assert_allclose(out[lag:], mic[: mic.size - lag], atol=1e-6)
    assert canceller.alignment is None


def test_a_reference_that_never_correlates_is_not_aligned(subtractor):
    canceller = EchoCanceller(subtractor, sample_rate=RATE)
    _run(canceller, _talker(5.0, 3), _talker(5.0, 4), 160)
    assert canceller.alignment is None
    assert canceller.estimator.candidate.confidence < canceller.estimator.min_confidence


def test_clock_drift_is_measured_and_followed(subtractor):
    import soxr

    far = _talker(30.0, 5)
    played = soxr.resample(far, RATE, RATE * (1 + 100e-6)).astype(np.float32)[: far.size]  # 100 ppm slow
    mic = np.concatenate([np.zeros(int(0.1 * RATE), np.float32), played])[: far.size]
    canceller = EchoCanceller(subtractor, sample_rate=RATE)
    out = _run(canceller, mic, far, 480)
    assert canceller.drift_ppm is not None and abs(canceller.drift_ppm - 100) < 10
    assert abs(canceller.alignment.delay - (0.1 + 30 * 100e-6)) < 0.0005  # 3 ms later by the end
    assert erle(mic[-2 * RATE :], out[-2 * RATE :]) > 10  # sub-sample misalignment limits an ideal subtractor


def test_stereo_mic_with_a_mono_reference(subtractor):
    far = _talker(4.0, 6)
    echo = np.concatenate([np.zeros(800, np.float32), far])[: far.size]
    mic = np.stack([echo, 0.5 * echo], axis=1)
    canceller = EchoCanceller(subtractor, sample_rate=RATE, channels=2)
    out = _run(canceller, mic, far, 160)
    assert out.shape == mic.shape


def test_bad_input_is_one_clear_error(subtractor, tmp_path):
    canceller = EchoCanceller(subtractor, sample_rate=RATE)
    with pytest.raises(ValueError, match="differ in length"):
        canceller.process(np.zeros(160, np.float32), np.zeros(161, np.float32))
    with pytest.raises(ValueError, match="not an echo canceller"):
        EchoCanceller(write_delay_model(tmp_path / "ns"), sample_rate=RATE)


def test_reset_starts_a_new_stream_exactly_like_a_new_canceller(subtractor):
    far = _talker(3.0, 7)
    mic = np.concatenate([np.zeros(int(0.05 * 48000), np.float32), far])[: far.size]
    used = EchoCanceller(subtractor, sample_rate=48000)
    _run(used, mic[:1000], far[:1000], 333)  # a partial stream: resamplers and FIFOs hold leftovers
    used.reset()
    np.testing.assert_array_equal(_run(used, mic, far, 480),
                                  _run(EchoCanceller(subtractor, sample_rate=48000), mic, far, 480))
