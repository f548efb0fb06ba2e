"""LiveEngine without devices (a test thread plays the audio callback, in real time) and `quell live` errors.

The pure-delay model makes timing exact: at 16 kHz its output is the input delayed by exactly 511 samples,
and so is the engine's dry path, so every pulled sample is either the input `engine.latency` earlier or
silence that was counted.

The echo tests use the ideal subtractor (output = mic - reference as the canceller aligns it): its output
shows exactly which reference sample went with which mic sample.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from quell.cli import main
from quell.dns.metrics import erle
from quell.streaming import catalog, live
from quell.streaming.denoiser import Denoiser
from quell.streaming.echo import EchoCanceller
from quell.streaming.live import LiveEngine, LiveError, LiveSession, LiveStats, _step_strength
from tests.allocation import peak_allocation
from tests.audio_server import skip_without_portaudio
from tests.delay_model import write_subtractor_model
from tests.test_align import _talker
from tests.test_cli import assert_one_error


@pytest.fixture(scope="module")
def subtractor(tmp_path_factory):
    return write_subtractor_model(tmp_path_factory.mktemp("aec"))


def _noise(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * rate))).astype(np.float32)


def _play(engine: LiveEngine, signal: np.ndarray, block: int, reference: np.ndarray | None = None) -> np.ndarray:
    """Be a duplex audio callback in real time: every block period, push a block (and its reference) and pull one."""
    out = np.zeros_like(signal)
    period, due = block / engine.sample_rate, time.perf_counter()
    for start in range(0, len(signal), block):
        engine.push(signal[start : start + block], None if reference is None else reference[start : start + block])
        engine.pull(out[start : start + block])
        due += period
        time.sleep(max(0.0, due - time.perf_counter()))
    return out


def _delayed(signal: np.ndarray, lag: int) -> np.ndarray:
    return np.concatenate([np.zeros(lag, np.float32), signal[: len(signal) - lag]])


def test_pulled_stream_is_the_offline_stream_one_buffer_later(tiny_dtln_card):
    signal = _noise(1.0, 48000)
    # a generous buffer: this test is about the stream's content, not about keeping up on a busy machine
    with LiveEngine(tiny_dtln_card, sample_rate=48000, block=480, buffer_ms=200) as engine:
        out = _play(engine, signal, 480)
    offline = Denoiser(tiny_dtln_card, sample_rate=48000)
    assert engine.stats().late == 0
    np.testing.assert_allclose(out, _delayed(offline.process(signal), engine.buffering), atol=1e-6)
    assert engine.latency == pytest.approx(offline.latency + engine.buffering / 48000)
    stats = engine.stats()
    assert (stats.algorithmic_ms + stats.buffering_ms) / 1e3 == pytest.approx(engine.latency)


def test_measured_latency_is_the_reported_latency(delay_card):
    signal = np.zeros(16000, np.float32)
    signal[[1000, 6000, 11000]] = 1.0
    with LiveEngine(delay_card, sample_rate=16000, block=160, buffer_ms=100) as engine:
        out = _play(engine, signal, 160)
    lag = round(engine.latency * 16000)
    assert lag == 511 + engine.buffering
    assert list(np.flatnonzero(out)) == [1000 + lag, 6000 + lag, 11000 + lag]


def test_a_stalled_worker_is_concealed_and_counted_and_the_latency_stays(delay_card):
    signal = _noise(1.5, 16000)
    engine = LiveEngine(delay_card, sample_rate=16000, block=160, buffer_ms=60)
    process, calls = engine.denoiser.process, []

    def stalls_once(chunk):
        calls.append(len(chunk))
        if len(calls) == 30:
            time.sleep(0.3)  # 300 ms: far more than the 70 ms of buffering
        return process(chunk)

    engine.denoiser.process = stalls_once
    with engine:
        out = _play(engine, signal, 160)
    stats = engine.stats()
    assert stats.late >= 1 and stats.catchups >= 1
    expected = _delayed(signal, round(engine.latency * 16000))
    wrong = out != expected
    assert np.all(out[wrong] == 0.0)  # what is not on time is silence, never the wrong sample
    assert 0.2 * 16000 < wrong.sum() < 0.6 * 16000
    np.testing.assert_array_equal(out[-8000:], expected[-8000:])  # and afterwards, no drift


def test_an_overloaded_model_is_bypassed_at_the_same_latency(delay_card):
    signal = _noise(2.0, 16000)
    engine = LiveEngine(delay_card, sample_rate=16000, block=160, buffer_ms=60)
    process = engine.denoiser.process

    def too_slow(chunk):
        time.sleep(2 * len(chunk) / 16000)  # half real time
        return process(chunk)

    engine.denoiser.process = too_slow
    with engine:
        out = _play(engine, signal, 160)
    stats = engine.stats()
    assert stats.overloaded and stats.catchups >= 3 and "OVERLOADED" in stats.line()
    expected = _delayed(signal, round(engine.latency * 16000))
    np.testing.assert_array_equal(out[-8000:], expected[-8000:])


def test_without_playback_the_recording_is_the_offline_stream(tiny_dtln_card, tmp_path):
    signal = _noise(0.5, 44100)
    with LiveEngine(tiny_dtln_card, sample_rate=44100, block=441, playback=False,
                    record=tmp_path / "out.wav", record_input=tmp_path / "in.wav") as engine:
        for start in range(0, len(signal), 441):
            engine.push(signal[start : start + 441])
    recorded, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 44100 and engine.stats().buffering_ms == 0
    np.testing.assert_allclose(recorded, Denoiser(tiny_dtln_card, 44100).process(signal), atol=1e-6)
    np.testing.assert_array_equal(sf.read(tmp_path / "in.wav", dtype="float32")[0], signal)
    assert not list(tmp_path.glob(".*.part"))


def test_input_the_ring_cannot_take_is_counted_and_replaced_by_silence(delay_card, tmp_path):
    engine = LiveEngine(delay_card, sample_rate=16000, block=160, playback=False,
                        record=tmp_path / "out.wav", record_input=tmp_path / "in.wav")
    signal = _noise(3.0, 16000)  # the ring holds 2 s, and nothing reads it before start()
    for start in range(0, len(signal), 160):
        engine.push(signal[start : start + 160])
    with engine:
        pass
    assert engine.stats().dropped > 0
    assert sf.info(tmp_path / "in.wav").frames == sf.info(tmp_path / "out.wav").frames == len(signal)


def test_a_failing_worker_is_kept_and_the_callback_goes_on(delay_card):
    engine = LiveEngine(delay_card, sample_rate=16000, block=160, buffer_ms=0)

    def broken(chunk):
        raise RuntimeError("the model broke")

    engine.denoiser.process = broken
    with engine:
        out = _play(engine, _noise(0.2, 16000), 160)
    assert isinstance(engine.error, RuntimeError)
    assert not out.any() and engine.stats().late > 0


def test_recordings_refuse_to_overwrite(delay_card, tmp_path):
    (tmp_path / "out.wav").write_bytes(b"keep me")
    engine = LiveEngine(delay_card, sample_rate=16000, playback=False, record=tmp_path / "out.wav")
    with pytest.raises(FileExistsError, match="--overwrite"):
        engine.start()
    assert (tmp_path / "out.wav").read_bytes() == b"keep me"


@pytest.mark.parametrize("echo", [False, True], ids=["denoiser", "echo"])
def test_push_and_pull_allocate_no_arrays(delay_card, subtractor, echo):
    engine = LiveEngine(subtractor if echo else delay_card, sample_rate=48000, block=480)
    mic, speaker = np.ones(480, np.float32), np.empty((480, 1), np.float32)

    def step() -> None:
        engine.push(mic, mic if echo else None)
        if echo:
            engine.push_reference(mic)  # as a monitor stream's callback does
        engine.pull(speaker)

    peak = peak_allocation(step, 100)
    assert peak < mic.nbytes / 2, f"{peak} bytes allocated at peak: a block is {mic.nbytes}"


def test_controls_reach_the_denoiser(delay_card):
    engine = LiveEngine(delay_card, sample_rate=16000, attenuation_limit_db=12)
    engine.bypass = True
    engine.attenuation_limit_db = 6.0
    assert engine.denoiser.bypass and engine.denoiser.attenuation_limit_db == 6.0
    assert engine.stats().bypass and "bypass" in engine.stats().line()
    assert not engine.aec and engine.stats().aec is None and "aec" not in engine.stats().line()
    with pytest.raises(ValueError, match="takes no far-end reference"):
        engine.aec = True
    with pytest.raises(ValueError, match="takes no far-end reference"):
        engine.push_reference(np.zeros(160, np.float32))
    # + and - step through the strengths; the top step is no limit at all
    assert _step_strength(None, 1) is None and _step_strength(None, -1) == 48.0
    assert _step_strength(13.0, 1) == 18.0 and _step_strength(0.0, -1) == 0.0


def test_bad_engine_settings_are_one_line_errors(delay_card):
    with pytest.raises(ValueError, match="block"):
        LiveEngine(delay_card, block=0)
    with pytest.raises(ValueError, match="record"):
        LiveEngine(delay_card, playback=False)


def test_the_status_line_adds_up_the_latency():
    stats = LiveStats(seconds=12.0, hop_p50_ms=0.1, hop_p99_ms=0.4, algorithmic_ms=34.1, buffering_ms=30.0,
                      late=1, dropped=0, device_in_ms=20.0, device_out_ms=30.0, device_xruns=2)
    assert stats.latency_ms == pytest.approx(114.1) and stats.xruns == 3
    assert "latency 114 ms = in 20 + model 34 + buffer 30 + out 30" in stats.line()
    assert "xruns 3 (late 1, dropped 0, device 2)" in stats.line()


# ----- `quell live` and `quell devices`: bad input that needs no audio server -----


def _live(*args: str):
    return CliRunner().invoke(main, ["live", *args])


def test_aec_without_an_echo_model_is_one_line(delay_card, tmp_path, monkeypatch):
    assert_one_error(_live("-m", str(delay_card), "--aec"), 2, "model 'delay' is not an echo canceller")
    monkeypatch.setattr(catalog, "ASSETS", tmp_path)  # a package that ships no echo model
    assert_one_error(_live("--aec"), 2, "no echo-cancellation model is installed")


def test_aec_with_an_output_device_that_has_no_monitor_is_refused(subtractor):
    session = LiveSession(subtractor, output_device="hw:0,0", aec=True)
    with pytest.raises(LiveError, match="'hw:0,0' has no monitor source .* -o pulse does"):
        session._find_monitor(None, {"name": "hw:0,0"}, 48000)  # before anything looks for a sound server


def test_ctrl_c_asks_the_loop_to_stop_and_a_second_one_forces_it(delay_card):
    """Inside a session Ctrl-C only sets the stop flag the loop checks (no KeyboardInterrupt in the middle of a
    stream's setup or a lock); a second Ctrl-C, for a stop that hangs, raises KeyboardInterrupt."""
    session = LiveSession(delay_card)
    session._interrupt()
    assert session._stop == "interrupted"
    with pytest.raises(KeyboardInterrupt):
        session._interrupt()


def test_a_bypass_toggle_while_the_devices_are_probed_is_kept(delay_card, monkeypatch):
    """Probing the devices already shows up as a recording stream on a sound server: SIGUSR1 sent then must not
    kill the process (its default action) and the toggle must reach the engine made later."""
    class Probing:
        def query_devices(self):
            os.kill(os.getpid(), signal.SIGUSR1)
            return []  # then: no devices, the run ends with a one-line error

    monkeypatch.setattr(live, "_sounddevice", Probing)
    before = signal.getsignal(signal.SIGUSR1)
    session = LiveSession(delay_card)
    with pytest.raises(LiveError, match="no audio devices"):
        session.run()
    assert session.bypass
    assert signal.getsignal(signal.SIGUSR1) is before  # restored


def test_cuda_without_onnxruntime_gpu_is_one_line(delay_card):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    assert_one_error(_live("-m", str(delay_card), "--device", "cuda"), 2, "onnxruntime-gpu")


def test_unknown_model_and_conflicting_outputs_are_one_line(delay_card):
    assert_one_error(_live("-m", "no-such-model"), 2, "unknown model 'no-such-model'")
    assert_one_error(_live("-m", str(delay_card), "--virtual-mic", "-o", "default"), 2, "--virtual-mic")


def test_without_sounddevice_live_says_what_to_install(delay_card, monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import sounddevice now raises ImportError
    assert_one_error(_live("-m", str(delay_card)), 2, "pip install 'quell[live]'")


def _without_audio_server(tmp_path) -> dict[str, str]:
    """The environment of a machine with no sound server: an empty runtime folder, no autospawn."""
    (tmp_path / "client.conf").write_text("autospawn = no\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "PIPEWIRE_", "JACK_"))}
    return env | {"XDG_RUNTIME_DIR": str(tmp_path), "PULSE_CLIENTCONFIG": str(tmp_path / "client.conf")}


def test_no_audio_devices_is_one_line(delay_card, tmp_path):
    skip_without_portaudio()
    env = _without_audio_server(tmp_path)
    listing = subprocess.run([sys.executable, "-m", "quell.cli", "devices"], env=env, capture_output=True, text=True)
    if listing.stdout.strip() != "no audio devices found":
        pytest.skip(f"this machine has audio devices without a server: {listing.stdout.strip()[:80]}")
    done = subprocess.run([sys.executable, "-m", "quell.cli", "live", "-m", str(delay_card)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["error: no audio devices found (no sound card, and no sound "
                                                "server that PortAudio can reach)"]


# ----- echo cancellation: the far end as a second stream -----


def _echo_scene(seconds: float, delay: float, rate: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    """(mic, far end): the mic hears the far end `delay` seconds late, and nothing else."""
    far = _talker(seconds, 11)
    lag = round(delay * rate)
    return np.concatenate([np.zeros(lag, np.float32), far[: far.size - lag]]), far


def test_echo_is_cancelled_as_offline_one_buffer_later(subtractor):
    mic, far = _echo_scene(4.0, 0.1)
    with LiveEngine(subtractor, sample_rate=16000, block=160, buffer_ms=200) as engine:
        out = _play(engine, mic, 160, reference=far)
    offline = EchoCanceller(subtractor, sample_rate=16000).process(mic, far)
    stats = engine.stats()
    assert stats.late == 0 and stats.reference_gaps == 0 and stats.aec
    # the same hops of the same (mic, reference) pairs through the same graph: equal up to float rounding
    np.testing.assert_allclose(out, _delayed(offline, engine.buffering), atol=1e-6)
    settled = slice(3 * 16000, None)  # the canceller has found the delay (2 s at most) and cancels the echo
    assert erle(mic[settled], out[settled]) > 20
    assert stats.echo_delay_ms == pytest.approx(100, abs=1) and "aec on (echo 100 ms" in stats.line()


def test_aec_off_is_the_noise_suppressor_path(subtractor):
    mic, far = _echo_scene(1.0, 0.1)
    with LiveEngine(subtractor, sample_rate=16000, block=160, buffer_ms=200) as engine:
        engine.aec = False
        out = _play(engine, mic, 160, reference=far)
    # what the model does with no reference at all; for the subtractor, the mic itself: the echo stays
    offline = EchoCanceller(subtractor, sample_rate=16000).process(mic, None)
    np.testing.assert_allclose(out, _delayed(offline, engine.buffering), atol=1e-6)
    np.testing.assert_allclose(out, _delayed(mic, round(engine.latency * 16000)), atol=1e-6)
    assert engine.stats().aec is False and "aec off" in engine.stats().line()


def test_mic_and_reference_stay_in_step_through_a_catch_up(subtractor, tmp_path):
    """The worker starts 50 ms more behind than it may be: those samples of both streams go past the model.

    If the catch-up took only the mic, the model would get every later mic sample with a reference 50 ms
    early (less than the lead that the engine cuts back) and its output would not be the offline one.
    """
    mic, far = _echo_scene(1.5, 0.1)
    engine = LiveEngine(subtractor, sample_rate=16000, block=160, playback=False, record=tmp_path / "out.wav")
    late = 800
    backlog = engine._late_after + late
    for start in range(0, backlog, 160):  # before start(): the worker finds all of it at once
        engine.push(mic[start : start + 160], far[start : start + 160])
    with engine:
        pass
    assert engine.catchups == 1
    out, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    lag = round(engine.latency * 16000)
    np.testing.assert_array_equal(out[:late], _delayed(mic[:late], lag))  # the dry path, at the same latency
    model = EchoCanceller(subtractor, sample_rate=16000).process(mic[late:backlog], far[late:backlog])
    np.testing.assert_allclose(out[late + lag :], model[lag:], atol=1e-6)  # `lag` samples are stale: dry


@pytest.mark.parametrize("offset", [30, -4], ids=["reference-first", "mic-first"])
def test_a_reference_from_a_stream_of_its_own_is_paired_by_arrival(subtractor, offset):
    """The far end from a stream of its own that delivers two blocks at a time, as a monitor source's may,
    and starts `offset` blocks (10 ms) before the mic's (or after). The echo reaches the mic 100 ms after the
    far end is pushed: the engine must pair each reference sample with the mic sample that came at about the
    same time, so that the canceller finds about that delay (300 ms of reference in hand would put the echo
    before it). One thread plays both callbacks, in real time, so that the order of the pushes is fixed."""
    rate, block = 16000, 160
    far = _talker(4.5, 12)
    lag = 10 * block - offset * block  # mic sample i hears far sample i - lag (the far end's own count)
    mic = np.concatenate([np.zeros(max(lag, 0), np.float32), far[max(-lag, 0) :]])[: 4 * rate]
    out = np.zeros_like(mic)
    mic_first, far_first = max(offset, 0), max(-offset, 0)  # the block periods at which each stream starts
    engine = LiveEngine(subtractor, sample_rate=rate, block=block, buffer_ms=40)
    with engine:
        due = time.perf_counter()
        for period in range(mic_first + len(mic) // block):
            since = period - far_first
            if since >= 1 and since % 2 == 1:  # the two blocks up to now, one of them a period late
                engine.push_reference(far[(since - 1) * block : (since + 1) * block])
            if period >= mic_first:
                at = (period - mic_first) * block
                engine.push(mic[at : at + block])
                engine.pull(out[at : at + block])
            due += block / rate
            time.sleep(max(0.0, due - time.perf_counter()))
    stats = engine.stats()
    settled = slice(3 * rate, None)
    assert erle(mic[settled], out[settled]) > 20, stats
    assert 80 <= stats.echo_delay_ms <= 100, stats  # less the period by which the pairing may be off
    assert stats.reference_gaps <= 1, stats  # the late half of a burst is waited for; one gap as the far end starts
