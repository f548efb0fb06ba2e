"""`quell live` through a real PulseAudio server that the tests start in a temporary runtime folder.

The server (tests/audio_server.py) has two null sinks, 48 kHz float mono so that nothing is converted on the
way: the tests play into "mic", whose monitor is the default source (quell's input), and quell plays into
"spk", the default sink. `quell live` runs as a subprocess, as a user runs it, and records what it was given
(--record-input) and what it handed to the output device (--record) on one timeline, so the latency it adds
can be measured to the sample. The server's own buffering (tens of ms, different at every start) is the
device latency that PortAudio reports; it is not measurable to a block through PulseAudio and is not
asserted here.

For --aec, a loopback module carries what "spk" plays into "mic" 60 ms later, as a room carries the speakers'
sound to the microphone; the echo model is the ideal subtractor of tests/delay_model.py.

Lines that PortAudio and ALSA print themselves ("ALSA lib ...", "Expression ... failed") are not quell's
and are left out when checking that an error is one line.
"""
from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from quell.dns.metrics import erle
from quell.streaming.denoiser import Denoiser
from tests.audio_server import PulseServer, skip_without_portaudio
from tests.delay_model import write_subtractor_model
from tests.test_align import _talker

RATE = 48000

pytestmark = [
    pytest.mark.skipif(shutil.which("pulseaudio") is None, reason="needs the pulseaudio server (apt pulseaudio)"),
    pytest.mark.skipif(shutil.which("pactl") is None or shutil.which("paplay") is None,
                       reason="needs pactl and paplay (apt pulseaudio-utils)"),
]


@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    skip_without_portaudio()
    server = PulseServer(tmp_path_factory.mktemp("pulse"))
    yield server
    server.stop()


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftovers(request):
    """A test that fails halfway leaves no quell running and no virtual microphone for the next one."""
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()
    if "pulse" in request.fixturenames:
        server = request.getfixturevalue("pulse")
        for line in server.pactl("list", "short", "modules").splitlines():
            if "quell" in line:
                module = line.split("\t")[0]
                try:
                    server.pactl("unload-module", module)
                except subprocess.CalledProcessError:  # the server may have unloaded it since the listing
                    assert module not in [m.split("\t")[0] for m in server.pactl("list", "short", "modules")
                                          .splitlines()], f"module {module} could not be unloaded"


def _quell(server: PulseServer, *args: str, stdin=None) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "quell.cli", "live", *map(str, args)], env=server.env,
                               stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _started.append(process)
    return process


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, list[str]]:
    """Wait for a quell subprocess; returns its exit status, stdout, and its own stderr lines."""
    out, err = process.communicate(timeout=timeout)
    ours = [line for line in err.splitlines() if not line.startswith(("ALSA lib", "Expression '"))]
    assert not any("Traceback" in line for line in ours), err
    return process.returncode, out, ours


def _noise_file(folder: Path, seconds: float, seed: int = 0) -> tuple[Path, np.ndarray]:
    noise = (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * RATE))).astype(np.float32)
    path = folder / f"noise{seed}.wav"
    sf.write(path, noise, RATE, "FLOAT")
    return path, noise


def _play(server: PulseServer, path: Path, sink: str = "mic") -> subprocess.Popen:
    return subprocess.Popen(["paplay", "-d", sink, str(path)], env=server.env, stderr=subprocess.DEVNULL)


def _when_capturing(server: PulseServer, process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Wait until quell has a recording stream on the server."""
    deadline = time.monotonic() + timeout
    while not server.pactl("list", "short", "source-outputs").strip():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "quell never started recording"
        time.sleep(0.05)


def _lag(late: np.ndarray, early: np.ndarray) -> int:
    """How many samples `late` lags `early`, by cross-correlation (negative: `late` starts inside `early`)."""
    n = len(late) + len(early)
    correlation = np.fft.irfft(np.fft.rfft(late, n) * np.conj(np.fft.rfft(early, n)), n)
    lag = int(np.argmax(correlation))
    return lag if lag < len(late) else lag - n


def _normalised_peak(recorded: np.ndarray, played: np.ndarray) -> float:
    """The normalised correlation of `played` with `recorded` where they match best."""
    lag = _lag(recorded, played)
    segment = recorded[max(lag, 0) : max(lag, 0) + len(played) - max(-lag, 0)]
    reference = played[max(-lag, 0) : max(-lag, 0) + len(segment)]
    return float(np.dot(segment, reference) / (np.linalg.norm(segment) * np.linalg.norm(reference) + 1e-12))


def test_devices_lists_the_server(pulse):
    done = subprocess.run([sys.executable, "-m", "quell.cli", "devices"], env=pulse.env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert any(" pulse (ALSA)" in line for line in done.stdout.splitlines()), done.stdout


def test_live_output_is_offline_processing_at_the_reported_latency(pulse, delay_card, tmp_path):
    noise_path, noise = _noise_file(tmp_path, 2.0)
    # a generous buffer: this test is about what comes out and when, not about keeping up on a busy machine
    quell = _quell(pulse, "-m", delay_card, "-o", "pulse", "--duration", 3, "--buffer-ms", 100, "--json",
                   "--record", tmp_path / "out.wav", "--record-input", tmp_path / "in.wav")
    _when_capturing(pulse, quell)
    quell.send_signal(signal.SIGUSR1)  # bypass: the same latency, and for a pure delay the same output
    _play(pulse, noise_path).wait(30)
    status, out, err = _finish(quell, 60)
    assert status == 0, err
    stats = json.loads(out)
    assert stats["bypass"]
    captured, _ = sf.read(tmp_path / "in.wav", dtype="float32")
    played, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert len(captured) == len(played) >= 3 * RATE
    assert _normalised_peak(captured, noise) > 0.9  # the server really carried the signal to quell
    # what quell played is offline processing of what it heard, one buffer later
    buffering = round(stats["buffering_ms"] * RATE / 1000)
    offline = Denoiser(delay_card, RATE).process(captured)
    np.testing.assert_allclose(played[buffering:], offline[: len(offline) - buffering], atol=1e-6)
    # and the latency measured between the two is the latency quell reports (the issue allows one block)
    measured = _lag(played, captured)
    reported = (stats["algorithmic_ms"] + stats["buffering_ms"]) * RATE / 1000
    assert abs(measured - reported) <= 2, (measured, reported)
    assert stats["device_in_ms"] > 0 and stats["device_out_ms"] > 0
    assert stats["latency_ms"] == pytest.approx(stats["device_in_ms"] + stats["algorithmic_ms"]
                                                + stats["buffering_ms"] + stats["device_out_ms"])


def test_keys_on_a_terminal(pulse, delay_card, tmp_path):
    controller, terminal = pty.openpty()
    quell = _quell(pulse, "-m", delay_card, "--json", "--duration", 20, "--record", tmp_path / "out.wav",
                   stdin=terminal)
    os.close(terminal)
    try:
        _when_capturing(pulse, quell)
        time.sleep(0.5)  # the terminal is switched to single keys once the stream is open
        os.write(controller, b"b-q")  # bypass, one step less suppression, quit
        status, out, err = _finish(quell, 30)
    finally:
        os.close(controller)
    assert status == 0, err
    stats = json.loads(out)
    assert stats["bypass"] and stats["attenuation_limit_db"] == 48.0 and stats["seconds"] < 15


def test_recording_without_an_output_device(pulse, delay_card, tmp_path):
    quell = _quell(pulse, "-m", delay_card, "--duration", 0.5, "--json", "--record", tmp_path / "out.wav")
    status, out, err = _finish(quell, 60)
    assert status == 0, err
    stats = json.loads(out)
    assert stats["buffering_ms"] == 0 and stats["device_out_ms"] == 0 and stats["xruns"] == 0
    assert stats["latency_ms"] == pytest.approx(stats["device_in_ms"] + stats["algorithmic_ms"])
    assert sf.info(tmp_path / "out.wav").frames >= 0.5 * RATE
    assert not pulse.pactl("list", "short", "sink-inputs").strip()  # nothing was played


def _thirty_seconds(pulse: PulseServer, card: Path, folder: Path) -> dict:
    """One 30 s run at default settings with noise playing all along; its stats (in.wav, out.wav in `folder`)."""
    noise_path, _ = _noise_file(folder, 33.0, seed=1)
    quell = _quell(pulse, "-m", card, "-o", "pulse", "--duration", 30, "--json",
                   "--record", folder / "out.wav", "--record-input", folder / "in.wav", "--overwrite")
    _when_capturing(pulse, quell)
    player = _play(pulse, noise_path)
    status, out, err = _finish(quell, 120)
    player.kill()
    player.wait()
    assert status == 0, err
    stats = json.loads(out)
    print(f"\n30 s live: {json.dumps(stats)}")
    return stats


@pytest.mark.slow
def test_30_seconds_at_default_settings_have_no_xruns_and_no_drift(pulse, tiny_dtln_card, tmp_path):
    """The issue's 30 s run: default block, buffer and device latency; a real (tiny) DTLN; noise all along.

    No xruns is a promise about a machine that has the CPU to spare. With more runnable threads than cores
    (a training job on both cores of a 2-core VM: load 3.5 to 4), one 30 s run in eight had one block late.
    On the idle 2-core VM, 2 runs in 16 still had one xrun that the device (the test's own PulseAudio
    server, on the same two cores) reported, with quell's hops at p99 4 ms of an 8 ms budget: so a run with
    xruns gets one more try, and both runs' stats are printed. An engine that cannot keep up fails both.
    """
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 1.5 * cores:
        pytest.skip(f"the machine is overloaded (load {load:.1f} on {cores} cores): real time needs spare CPU")
    stats = _thirty_seconds(pulse, tiny_dtln_card, tmp_path)
    if stats["xruns"]:
        stats = _thirty_seconds(pulse, tiny_dtln_card, tmp_path)
    assert stats["xruns"] == 0, stats
    assert stats["hop_p99_ms"] < 8.0  # a DTLN hop is 8 ms of audio: the model keeps up even at its worst
    captured, _ = sf.read(tmp_path / "in.wav", dtype="float32")
    played, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert np.abs(captured).max() > 0.05  # it heard the noise
    buffering = round(stats["buffering_ms"] * RATE / 1000)
    offline = Denoiser(tiny_dtln_card, RATE).process(captured)
    # after 30 s the output is still exactly the offline output one buffer later: no drift, nothing lost
    np.testing.assert_allclose(played[buffering:], offline[: len(offline) - buffering], atol=1e-5)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_virtual_mic_carries_quell_and_is_removed_on_exit(pulse, delay_card, tmp_path, stop):
    quell = _quell(pulse, "-m", delay_card, "--virtual-mic")
    deadline = time.monotonic() + 20
    while "quell" not in pulse.names("sources"):
        assert quell.poll() is None, quell.communicate()
        assert time.monotonic() < deadline, "no source named quell"
        time.sleep(0.05)
    assert "quell_output" in pulse.names("sinks")
    _when_capturing(pulse, quell)
    if stop == signal.SIGTERM:  # once is enough to show that apps hear quell through it
        player = _play(pulse, _noise_file(tmp_path, 10.0)[0])
        assert _hears_sound(pulse, "quell", within=8.0), "the virtual microphone stayed silent"
        player.kill()
        player.wait()
    quell.send_signal(stop)
    status, _, err = _finish(quell, 30)
    assert status == 0, err
    assert "quell" not in pulse.names("sources") and "quell_output" not in pulse.names("sinks")


def _hears_sound(server: PulseServer, source: str, within: float) -> bool:
    """Record a source as an app would (parec), until it carries sound or `within` seconds have passed."""
    recorder = subprocess.Popen(["parec", "-d", source, "--raw", "--format=float32le", "--rate=48000",
                                 "--channels=1", "--latency-msec=20"], env=server.env, stdout=subprocess.PIPE)
    deadline, heard = time.monotonic() + within, False
    try:
        while not heard and time.monotonic() < deadline:
            block = np.frombuffer(recorder.stdout.read(4 * 4800), np.float32)  # 100 ms
            heard = block.size > 0 and float(np.sqrt(np.mean(block**2))) > 0.01
    finally:
        recorder.kill()
        recorder.wait()
    return heard


def _one_error(status: int, err: list[str], *words: str) -> None:
    """Exit status 2 and one `error:` line naming `words` (status lines, every 10 s off a terminal, aside)."""
    lines = [line for line in err if " | hop " not in line]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(word in lines[0] for word in words), lines[0]


def test_aec_cancels_the_echo_of_what_the_speakers_play(pulse, tmp_path):
    """The far end plays on the default sink; its monitor is the reference, and the echo comes back through
    the loopback. `a` on the terminal switches echo cancellation off at 4 s of audio: the echo that the
    canceller took out is back (the subtractor without a reference passes the mic through)."""
    import soxr

    card = write_subtractor_model(tmp_path / "aec")
    far = soxr.resample(_talker(8.0, 1), 16000, RATE).astype(np.float32)
    sf.write(tmp_path / "far.wav", far, RATE, "FLOAT")
    room = pulse.pactl("load-module", "module-loopback", "source=spk.monitor", "sink=mic", "latency_msec=60",
                       "adjust_time=0").strip()
    controller, terminal = pty.openpty()
    player = None
    try:
        quell = subprocess.Popen([sys.executable, "-m", "quell.cli", "live", "-m", str(card), "--aec", "--json",
                                  "--duration", "5.5", "--record", str(tmp_path / "out.wav"),
                                  "--record-input", str(tmp_path / "in.wav")],
                                 env=pulse.env, stdin=terminal, stdout=subprocess.PIPE, stderr=terminal, text=True)
        _started.append(quell)
        os.close(terminal)
        _when_capturing(pulse, quell)
        player = _play(pulse, tmp_path / "far.wav", sink="spk")
        terminal_text = _read_terminal_until(controller, quell, lambda text: _audio_seconds(text) >= 4.0)
        assert _audio_seconds(terminal_text) >= 4.0, terminal_text
        os.write(controller, b"a")
        terminal_text += _read_terminal_until(controller, quell, lambda text: False)
        out = quell.stdout.read()
        assert quell.wait(30) == 0, terminal_text
    finally:
        os.close(controller)
        if player is not None:
            player.kill()
            player.wait()
        pulse.pactl("unload-module", room)
    stats = json.loads(out)
    assert "aec on (echo " in terminal_text and stats["aec"] is False  # the status line, and the key
    mic, _ = sf.read(tmp_path / "in.wav", dtype="float32")
    cancelled, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert np.abs(mic[2 * RATE :]).max() > 0.05  # the echo reached the mic
    on, off = slice(round(2.5 * RATE), round(3.8 * RATE)), slice(round(4.7 * RATE), None)
    print(f"\necho return loss enhancement: {erle(mic[on], cancelled[on]):.1f} dB with aec, "
          f"{erle(mic[off], cancelled[off]):.1f} dB without; {json.dumps(stats)}")
    assert erle(mic[on], cancelled[on]) > 15, stats
    assert abs(erle(mic[off], cancelled[off])) < 1, stats
    assert stats["echo_delay_ms"] is not None, stats  # found (the loopback adds 40 to 300 ms, run by run)


def _audio_seconds(terminal_text: str) -> float:
    """The audio time of the last status line on the terminal (0 before the first)."""
    times = re.findall(r"\r\s*([0-9.]+) s \|", terminal_text)
    return float(times[-1]) if times else 0.0


def _read_terminal_until(controller: int, process: subprocess.Popen, done, timeout: float = 30.0) -> str:
    """What `process` writes to its terminal, until `done(text)` or it exits (or `timeout` seconds pass)."""
    text, deadline = "", time.monotonic() + timeout
    while not done(text) and time.monotonic() < deadline:
        if select.select([controller], [], [], 0.05)[0]:
            try:
                text += os.read(controller, 4096).decode(errors="replace")
            except OSError:  # the process closed the terminal: it is exiting
                break
        elif process.poll() is not None:
            break
    return text


def test_aec_without_a_monitor_source_is_one_line(pulse, tmp_path):
    card = write_subtractor_model(tmp_path / "aec")
    quell = subprocess.Popen([sys.executable, "-m", "quell.cli", "live", "-m", str(card), "--aec",
                              "--record", str(tmp_path / "out.wav")],
                             env=pulse.env | {"PULSE_SINK": "no-such-sink"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _started.append(quell)
    _one_error(*_finish(quell, 60)[::2], "no monitor source of the sink 'no-such-sink'")
    assert not list(tmp_path.glob("*.wav")) and not list(tmp_path.glob(".*.part"))  # nothing left behind


def test_bad_devices_are_one_line(pulse, delay_card):
    _one_error(*_finish(_quell(pulse, "-m", delay_card, "-i", "no-such-mic"), 60)[::2],
               "no input device matching 'no-such-mic'")
    _one_error(*_finish(_quell(pulse, "-m", delay_card, "-o", "99"), 60)[::2], "no output device 99")
    _one_error(*_finish(_quell(pulse, "-m", delay_card, "--rate", 1000000), 60)[::2],
               "cannot record 1 channel(s) at 1000000 Hz")


def test_virtual_mic_that_exists_already_is_one_line(pulse, delay_card):
    module = pulse.pactl("load-module", "module-remap-source", "master=mic.monitor", "source_name=quell").strip()
    try:
        _one_error(*_finish(_quell(pulse, "-m", delay_card, "--virtual-mic"), 60)[::2],
                   "a source named 'quell' exists already", f"pactl unload-module {module}")
        assert "quell_output" not in pulse.names("sinks")
    finally:
        pulse.pactl("unload-module", module)


def test_a_failure_after_the_virtual_mic_was_made_removes_it(pulse, delay_card, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    _one_error(*_finish(_quell(pulse, "-m", delay_card, "--virtual-mic", "--record", tmp_path / "file" / "out.wav"),
                        60)[::2])
    assert "quell" not in pulse.names("sources") and "quell_output" not in pulse.names("sinks")


@pytest.mark.parametrize("virtual_mic", [False, True], ids=["devices", "virtual-mic"])
def test_a_server_that_goes_away_mid_stream_is_one_line(tmp_path, delay_card, virtual_mic):
    """The server ends under a running stream, with sound playing and, for the virtual microphone, an app
    recording it. PortAudio then either says the stream stopped, or hangs (with the virtual microphone and the
    server's default sample spec, here every time): quell notices that nothing comes for 5 s, and gives up
    closing a stream that PortAudio cannot close."""
    skip_without_portaudio()
    server = PulseServer(tmp_path / "doomed", sink="")
    clients = []
    try:
        quell = _quell(server, "-m", delay_card, *(["--virtual-mic"] if virtual_mic else []))
        _when_capturing(server, quell)
        clients.append(_play(server, _noise_file(tmp_path, 20.0)[0]))
        if virtual_mic:
            clients.append(subprocess.Popen(["parec", "-d", "quell", "--latency-msec=20"], env=server.env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(3.0)  # audio is flowing
        server.process.terminate()  # as when the user's session ends: clients are told, then it is gone
        server.process.wait()
        status, _, err = _finish(quell, 30)
    finally:
        for client in clients:
            client.kill()
            client.wait()
        server.stop()
    _one_error(status, err, "the audio device")
