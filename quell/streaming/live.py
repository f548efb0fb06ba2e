"""`quell live`: enhance a microphone in real time, into an output device, a WAV file or a virtual microphone.

Two threads meet at ring buffers:

    audio callback:  device in -> push -> [input ring] ................ [output ring] -> pull -> device out
    worker thread:                        [input ring] -> Denoiser ---> [output ring]
    (echo models:    playback -> push_reference -> [reference ring] -> EchoCanceller, hop by hop with the mic)

The callback only copies samples (no lock, no array allocation, never waits); the worker runs the model hop by
hop on whatever has arrived, so the device block size has nothing to do with the model's hop. The output ring
starts with `buffering` samples of silence (one device block plus a margin for the worker's scheduling jitter
and bursty callbacks), so output sample i is always the enhanced input sample i - latency. A block that is
not ready in time is played as silence and counted; its samples are skipped when they arrive, so lateness
never accumulates into drift: after hours the latency is what it was after a second. (This counts samples, so
it takes input and output on one clock: one duplex stream, as here, where PortAudio absorbs any difference
between two devices.) When the worker falls so far behind that the model's output could only be skipped, it
passes the late input through a dry path with the model's delay instead (cheap), and after three such
catch-ups within ten seconds it leaves the model out for ten seconds. Output ring underflows, input ring
overflows and the device's own xruns are all counted.

With an echo model (a card with a `reference_input`) the engine also takes the far end, what is being played,
into a reference ring of its own, and the worker takes one reference sample for every mic sample it takes,
whichever path those go (model, dry catch-up, dropped input), so the two never slip apart there. The reference
may come from another stream (a monitor source) on its own schedule, a little before or after the mic's
callback: the worker waits for it while the mic's backlog is within half the output's head start (two such
streams were seen here to drift a block apart and back). Where it is later than that, silence stands in for
it (`reference_gaps`) and it is used when it comes, so it slips behind by that much; a reference that runs
further ahead of the mic than `_REFERENCE_LEAD` seconds (a stream that started earlier, or a faster clock) is
cut back. So a reference sample goes with the mic sample that arrived at about the same time, and what is left,
the echo path and the difference between the two captures' latencies, is the delay that `EchoCanceller` finds
(0 to 0.5 s); each slip or cut changes that delay, and the canceller takes a second or so to follow.

`LiveEngine` is the part without devices, for an application's own audio callback; `LiveSession` adds the
devices (sounddevice), the WAV sinks, the virtual microphone, the controls and the status line.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf

from quell.streaming.card import ModelCard
from quell.streaming.catalog import find_model
from quell.streaming.denoiser import Denoiser
from quell.streaming.echo import EchoCanceller
from quell.streaming.ringbuffer import RingBuffer, SampleFifo
from quell.streaming.virtualmic import VirtualMicError, VirtualMicrophone, default_source, monitor_source

_RING_SECONDS = 2.0  # input and output rings hold this much audio beyond the buffering
_CATCHUPS_TO_BYPASS, _OVERLOAD_WINDOW, _BYPASS_SECONDS = 3, 10.0, 10.0
_COST_HISTORY = 4096  # hop costs kept for the p50/p99 (about 30 s of DTLN hops)
_REFERENCE_LEAD = 0.1  # seconds the reference may run ahead of the mic before the excess is cut (clock drift)
_SOUND_SERVER_DEVICES = ("pulse", "default", "pipewire")  # ALSA devices that play through PulseAudio/PipeWire


class LiveError(OSError):
    """A device that is missing, cannot do what was asked, or stopped; a worker that failed. One line."""


@dataclass
class LiveStats:
    """Where a live stream stands: cost, latency and its parts, and every kind of xrun."""

    seconds: float  # audio through the engine so far
    hop_p50_ms: float  # cost of one model hop (all channels, resampling included), median and 99th percentile
    hop_p99_ms: float
    algorithmic_ms: float  # the model's delay and hop buffering, plus the resamplers (Denoiser.latency)
    buffering_ms: float  # the output ring's head start over the worker (0 without an output device)
    late: int = 0  # output blocks that the worker had not filled in time (played partly as silence)
    dropped: int = 0  # input blocks that found the input ring full (the worker stalled for seconds)
    catchups: int = 0  # times the worker passed late input through the dry path to get back on time
    overloaded: bool = False  # the model is left out for a while: it could not keep up
    bypass: bool = False
    attenuation_limit_db: float | None = None
    aec: bool | None = None  # echo cancellation on or off; None: the model takes no far-end reference
    echo_delay_ms: float | None = None  # the echo's delay behind the reference, once the estimator is sure of it
    reference_gaps: int = 0  # times the reference came too late and silence stood in for it
    device_in_ms: float = 0.0  # capture latency of the device, as the device reports it
    device_out_ms: float = 0.0  # playback latency of the device, as the device reports it
    device_xruns: int = 0  # over- and underflows that the device reported

    @property
    def latency_ms(self) -> float:
        """End to end: device in + algorithmic + buffering + device out."""
        return self.device_in_ms + self.algorithmic_ms + self.buffering_ms + self.device_out_ms

    @property
    def xruns(self) -> int:
        return self.late + self.dropped + self.device_xruns

    def line(self) -> str:
        """One status line."""
        state = "OVERLOADED, model bypassed" if self.overloaded else ("bypass" if self.bypass else "on")
        limit = "none" if self.attenuation_limit_db is None else f"{self.attenuation_limit_db:g} dB"
        line = (f"{self.seconds:7.1f} s | hop {self.hop_p50_ms:.2f}/{self.hop_p99_ms:.2f} ms p50/p99 | latency "
                f"{self.latency_ms:.0f} ms = in {self.device_in_ms:.0f} + model {self.algorithmic_ms:.0f} + buffer "
                f"{self.buffering_ms:.0f} + out {self.device_out_ms:.0f} | xruns {self.xruns} (late {self.late}, "
                f"dropped {self.dropped}, device {self.device_xruns}) | {state} | limit {limit}")
        if self.aec is not None:
            echo = "echo delay unknown" if self.echo_delay_ms is None else f"echo {self.echo_delay_ms:.0f} ms"
            line += f" | aec {'on' if self.aec else 'off'} ({echo}, reference gaps {self.reference_gaps})"
        return line


class _Recording:
    """A float WAV written under a temporary name and renamed into place when closed (DESIGN: atomic writes)."""

    def __init__(self, path: str | Path, rate: int, channels: int, overwrite: bool):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path}: exists (use --overwrite to replace it)")
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = sf.SoundFile(self._tmp, "w", rate, channels, "FLOAT", format="WAV")

    def write(self, samples: np.ndarray) -> None:
        self._file.write(samples)

    def close(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class LiveEngine:
    """Real-time enhancement between an audio callback and a worker thread: push the mic, pull the result.

        engine = LiveEngine("dtln", sample_rate=48000, block=480)   # 10 ms blocks
        engine.start()
        def audio_callback(mic, speaker):      # the application's own callback, [480] or [480, channels]
            engine.push(mic)                   # lock-free, allocates no array, never waits
            engine.pull(speaker)               # the enhanced mic, engine.latency seconds later
        engine.stop()

    With an echo model, the far end too: what the application plays, in the same callback or another one.

        engine = LiveEngine("aec", sample_rate=48000, block=480)
        engine.start()
        def audio_callback(mic, speaker):          # a call: the far end is played, the mic is sent
            speaker[:] = far_end_block()           # what the application plays now
            engine.push(mic, reference=speaker)    # the mic, and what was playing while it was captured
            engine.pull(to_send)                   # the mic without the far end's echo, engine.latency later
        engine.stop()

    One thread pushes and one thread pulls (the same or two), on one clock: as many samples pushed as pulled
    over time, as a duplex callback does (see the module for why). `playback=False` is for a sink without a
    device: nothing pulls, and the worker writes the enhanced stream to `record` instead. `record` keeps what
    `pull` handed out (or, without playback, the enhanced stream) and `record_input` what was pushed, both as
    float WAV files on the same timeline. If the worker fails, the exception is kept in `error` and `pull` goes
    on handing out silence (counted as late), since an audio callback cannot take an exception.

    The reference can also come from a capture of its own (a monitor source): `push_reference` from that
    stream's callback, as lock-free as `push`. `aec` switches echo cancellation at run time; off, the model
    gets a silent reference, i.e. works as a noise suppressor, while the reference is still taken in step with
    the mic, so that switching back on needs no new alignment. `max_echo_delay` is the longest delay of the
    echo behind the reference that the canceller looks for.
    """

    def __init__(
        self, model: str | Path | ModelCard = "dtln", sample_rate: int = 48000, channels: int = 1, block: int = 480,
        buffer_ms: float = 20.0, playback: bool = True, record: str | Path | None = None,
        record_input: str | Path | None = None, overwrite: bool = False, providers: list[str] | None = None,
        attenuation_limit_db: float | None = None, max_echo_delay: float = 0.5,
    ):
        if block < 1:
            raise ValueError(f"the block must be at least one sample, got {block}")
        if buffer_ms < 0:
            raise ValueError(f"the buffer cannot be negative, got {buffer_ms} ms")
        if not playback and record is None:
            raise ValueError("without playback, give a file to record to")
        card = find_model(model)
        if card.reference_input:
            self.denoiser: Denoiser = EchoCanceller(card, sample_rate, channels, max_echo_delay, providers=providers,
                                                    attenuation_limit_db=attenuation_limit_db)
        else:
            self.denoiser = Denoiser(card, sample_rate, channels, providers=providers,
                                     attenuation_limit_db=attenuation_limit_db)
        self.sample_rate, self.channels, self.block, self.playback = sample_rate, channels, block, playback
        self.buffering = block + round(buffer_ms * sample_rate / 1000) if playback else 0  # samples
        ring = max(int(_RING_SECONDS * sample_rate), 8 * block)
        self._input = RingBuffer(ring, channels)
        # the far end (echo models only): its ring, the worker's copy of it, and how it keeps pace with the mic
        self._reference = RingBuffer(ring, channels) if card.reference_input else None
        self._far = np.zeros((ring, channels), np.float32) if card.reference_input else None
        self._aec = self._reference is not None
        self.reference_gaps = 0
        self._reference_lead = max(round(_REFERENCE_LEAD * sample_rate), 2 * block)
        self._output = RingBuffer(self.buffering + ring, channels)
        self._output.write(np.zeros((self.buffering, channels), np.float32))  # the head start
        self._owed = 0  # pull side: samples that came after their slot had been played, to be skipped
        self._tap = RingBuffer(ring, channels) if playback and record is not None else None
        # samples that a late or overloaded worker passes on unprocessed, delayed like the model's output
        self._delay = round(self.denoiser.latency_samples)
        self._dry = SampleFifo(channels, self._delay + ring)
        self._dry.push(np.zeros((self._delay, channels), np.float32))
        self._chunk = np.zeros((ring, channels), np.float32)
        self._silence = np.zeros((ring, channels), np.float32)
        self._late_after = self.buffering if playback else ring // 2  # backlog past which output is too late
        self._patience = self._late_after // 2  # backlog up to which the worker waits for the reference
        self._dry_for = 0  # samples to take from the dry path while the model's output is stale
        self._records: list[_Recording] = []
        self._record = self._record_input = None
        self._record_args = (record, record_input, overwrite)
        # worker side: statistics
        self._dropped_seen = 0
        self._model_samples, self._cost, self._hops = 0, 0.0, 0
        self._costs = np.zeros(_COST_HISTORY)
        self._catchup_times: collections.deque[float] = collections.deque(maxlen=_CATCHUPS_TO_BYPASS)
        self.catchups = 0
        self._overloaded_until = 0.0
        self._poll = min(0.002, max(0.0005, block / sample_rate / 4))
        self._stopping = False
        self._worker: threading.Thread | None = None
        self.error: BaseException | None = None

    # ----- controls (any thread) -----

    @property
    def latency(self) -> float:
        """Seconds from a sample pushed to its enhanced version pulled: algorithmic + buffering."""
        return self.denoiser.latency + self.buffering / self.sample_rate

    @property
    def bypass(self) -> bool:
        """Pass the input through at the same latency (the model keeps running, so switching is seamless)."""
        return self.denoiser.bypass

    @bypass.setter
    def bypass(self, value: bool) -> None:
        self.denoiser.bypass = bool(value)

    @property
    def attenuation_limit_db(self) -> float | None:
        """At most this much noise reduction, in dB (None: as much as the model does)."""
        return self.denoiser.attenuation_limit_db

    @attenuation_limit_db.setter
    def attenuation_limit_db(self, value: float | None) -> None:
        self.denoiser.attenuation_limit_db = value

    @property
    def aec(self) -> bool:
        """Echo cancellation on (the model hears the reference) or off (it hears silence: noise suppression)."""
        return self._aec

    @aec.setter
    def aec(self, value: bool) -> None:
        if value and self._reference is None:
            raise ValueError(f"model {self.denoiser.card.name!r} takes no far-end reference: it cannot cancel echo")
        self._aec = bool(value)

    @property
    def overloaded(self) -> bool:
        """The worker could not keep up and leaves the model out for a while (see the module)."""
        return time.monotonic() < self._overloaded_until

    @property
    def seconds(self) -> float:
        """Audio pushed so far, in seconds."""
        return self._input.written / self.sample_rate

    # ----- the audio side: one thread pushes, one thread pulls; no lock, no array allocated, no waiting -----

    def push(self, samples: np.ndarray, reference: np.ndarray | None = None) -> None:
        """Hand over captured samples, [n] or [n, channels]; what does not fit is dropped and counted.

        `reference`: what was played while they were captured, as many samples, mono [n] or [n, channels]
        (echo models; the same as `push_reference` just before).
        """
        if reference is not None:  # first: the worker must never see mic samples whose reference is yet to come
            self.push_reference(reference)
        self._input.write(samples if samples.ndim == 2 else samples[:, None])

    def push_reference(self, samples: np.ndarray) -> None:
        """Hand over far-end samples, what is being played, [n] or [n, channels]: mono goes to every channel."""
        if self._reference is None:
            raise ValueError(f"model {self.denoiser.card.name!r} takes no far-end reference")
        self._reference.write(samples if samples.ndim == 2 else samples[:, None])  # [n, 1] broadcasts, no copy

    def pull(self, out: np.ndarray) -> None:
        """Fill `out`, [n] or [n, channels], with the enhanced stream; what is not ready is silence, counted."""
        frames = out if out.ndim == 2 else out[:, None]
        if self._owed:
            self._owed -= self._output.skip(self._owed)
        ready = self._output.read(frames)
        self._owed += len(frames) - ready
        if self._tap is not None:
            self._tap.write(frames)

    # ----- the worker -----

    def start(self) -> None:
        """Open the recordings (all or none) and start the worker thread."""
        record, record_input, overwrite = self._record_args
        try:
            if record is not None:
                self._record = self._open(record, overwrite)
            if record_input is not None:
                self._record_input = self._open(record_input, overwrite)
        except BaseException:
            for recording in self._records:
                recording.discard()
            self._records.clear()
            raise
        self._worker = threading.Thread(target=self._work, name="quell-live-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Process what has been pushed, stop the worker and finish the recordings."""
        self._stopping = True
        if self._worker is not None:
            self._worker.join()
        for recording in self._records:
            recording.close()
        self._records.clear()

    def __enter__(self) -> LiveEngine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _open(self, path: str | Path, overwrite: bool) -> _Recording:
        recording = _Recording(path, self.sample_rate, self.channels, overwrite)
        self._records.append(recording)
        return recording

    def _work(self) -> None:
        try:
            while True:
                stopping = self._stopping  # read first: whatever was pushed before stop() still gets processed
                self._drain_tap()
                backlog = self._input.available
                if backlog and self._catch_up(backlog, wait=not stopping):
                    continue
                if stopping and not backlog:
                    return
                time.sleep(self._poll)
        except BaseException as error:  # reported by the session; the callback keeps going (silence, counted)
            self.error = error

    def _catch_up(self, backlog: int, wait: bool) -> bool:
        """Pass the backlog on; False when all of it waits for its reference (`wait`: it may, see the module)."""
        dropped = self._input.dropped - self._dropped_seen  # input the ring could not take: silence in its place
        if dropped:
            self._dropped_seen += dropped
            self._pass(dropped, model=False, source=self._silence)
        late = backlog - self._late_after
        if late > 0:  # the model's output for these could only be skipped: pass them on dry, at once
            self._note_catchup()
            self._pass(late, model=False)
            self._dry_for = math.ceil(self.denoiser.latency_samples)  # the model's next output is stale
            backlog -= late
        if wait and self._aec and backlog <= self._patience:
            backlog = min(backlog, self._reference.available)
        self._pass(backlog, model=not self.overloaded)
        return backlog > 0

    def _pass(self, n: int, model: bool, source: np.ndarray | None = None) -> None:
        """Move n samples from the input ring (or `source`) through the model or the dry path to the sinks."""
        for start in range(0, n, len(self._chunk)):
            size = min(len(self._chunk), n - start)
            chunk = self._chunk[:size]
            if source is None:
                self._input.read(chunk)
            else:
                chunk[:] = source[:size]
            far = self._take_reference(size)
            if self._record_input is not None:
                self._record_input.write(chunk)
            self._dry.push(chunk)
            dry = self._dry.pop(size)
            out = self._enhance(chunk, dry, far) if model else dry
            if self.playback:
                self._output.write(out)
            else:
                self._record.write(out)

    def _take_reference(self, n: int) -> np.ndarray | None:
        """The reference for the next n mic samples, whatever becomes of them (None without a reference ring).

        What has not come yet is silence, and the reference slips behind by that much (it is used when it
        comes); a reference that is further ahead of the mic than `_reference_lead` is cut back first.
        """
        if self._reference is None:
            return None
        far = self._far[:n]
        ahead = self._reference.available - self._input.available - n  # beyond this mic sample and the backlog
        if ahead > self._reference_lead:
            self._reference.skip(ahead)
        got = self._reference.read(far[: min(n, self._reference.available)])
        if got < n:
            far[got:] = 0.0
            if self._aec and self._reference.written:  # a gap, not a reference that has yet to start
                self.reference_gaps += 1
        return far if self._aec else None

    def _enhance(self, chunk: np.ndarray, dry: np.ndarray, far: np.ndarray | None = None) -> np.ndarray:
        started = time.perf_counter()
        out = self.denoiser.process(chunk) if self._reference is None else self.denoiser.process(chunk, far)
        self._note_cost(time.perf_counter() - started, len(chunk))
        if self._dry_for:
            k = min(self._dry_for, len(out))
            out[:k] = dry[:k]
            self._dry_for -= k
        return out

    def _note_cost(self, seconds: float, samples: int) -> None:
        """Charge the time to the hops that these samples completed (a call can complete none, one or more)."""
        card = self.denoiser.card
        self._cost += seconds
        self._model_samples += samples
        hops = self._model_samples * card.sample_rate // (self.sample_rate * card.hop)
        if hops > self._hops:
            per_hop = self._cost / (hops - self._hops)
            for hop in range(self._hops, hops):
                self._costs[hop % _COST_HISTORY] = per_hop
            self._hops, self._cost = hops, 0.0

    def _note_catchup(self) -> None:
        now = time.monotonic()
        self.catchups += 1
        self._catchup_times.append(now)
        if len(self._catchup_times) == _CATCHUPS_TO_BYPASS and now - self._catchup_times[0] < _OVERLOAD_WINDOW:
            self._overloaded_until = now + _BYPASS_SECONDS
            self._catchup_times.clear()
            self._dry_for = math.ceil(self.denoiser.latency_samples)  # when the model comes back, its output is stale

    def _drain_tap(self) -> None:
        if self._tap is None:
            return
        n = self._tap.available
        for start in range(0, n, len(self._chunk)):
            chunk = self._chunk[: min(len(self._chunk), n - start)]
            self._tap.read(chunk)
            self._record.write(chunk)

    def stats(self) -> LiveStats:
        """A snapshot (device fields zero: the session fills them in)."""
        costs = self._costs[: min(self._hops, _COST_HISTORY)]
        p50, p99 = np.percentile(costs, [50, 99]) * 1e3 if costs.size else (0.0, 0.0)
        return LiveStats(
            seconds=self.seconds, hop_p50_ms=float(p50), hop_p99_ms=float(p99),
            algorithmic_ms=self.denoiser.latency * 1e3, buffering_ms=self.buffering / self.sample_rate * 1e3,
            late=self._output.underflows, dropped=self._input.overflows, catchups=self.catchups,
            overloaded=self.overloaded, bypass=self.bypass, attenuation_limit_db=self.attenuation_limit_db,
            aec=None if self._reference is None else self.aec, echo_delay_ms=self._echo_delay_ms(),
            reference_gaps=self.reference_gaps,
        )

    def _echo_delay_ms(self) -> float | None:
        alignment = getattr(self.denoiser, "alignment", None)  # EchoCanceller's, once it is sure of one
        return None if alignment is None else alignment.delay * 1e3


def _sounddevice():
    """The sounddevice module, or a one-line reason why it cannot be had."""
    try:
        import sounddevice
    except ImportError as error:
        raise LiveError("quell live needs sounddevice: pip install 'quell[live]'") from error
    except OSError as error:  # sounddevice is there, the PortAudio library is not
        raise LiveError(f"{error} (on Debian or Ubuntu: apt install libportaudio2)") from error
    return sounddevice


def list_devices() -> list[str]:
    """One line per audio device PortAudio sees: index, name, host API, channels, default rate; < and > mark
    the default input and output."""
    sd = _sounddevice()
    apis = sd.query_hostapis()
    defaults = []
    for kind in ("input", "output"):
        try:
            defaults.append(sd.query_devices(kind=kind)["index"])
        except sd.PortAudioError:  # no default device of this kind
            defaults.append(None)
    return [
        f"{'<' if device['index'] == defaults[0] else ' '}{'>' if device['index'] == defaults[1] else ' '} "
        f"{device['index']:3d} {device['name']} ({apis[device['hostapi']]['name']}): "
        f"{device['max_input_channels']} in, {device['max_output_channels']} out, "
        f"{device['default_samplerate']:g} Hz"
        for device in sd.query_devices()
    ]


def _device(sd, name: str | None, kind: str) -> dict:
    """The PortAudio device of `kind` that `name` means: an index, part of a name, or None for the default."""
    try:
        return sd.query_devices(int(name) if name is not None and name.isdigit() else name, kind)
    except ValueError as error:  # no match, several matches, not an input: sounddevice's first line says which
        reason = str(error).splitlines()[0]
        raise LiveError(f"{reason[:1].lower()}{reason[1:]} (`quell devices` lists them)") from error
    except sd.PortAudioError as error:  # an index that does not exist, or no default device
        which = f"{kind} device {name}" if name is not None else f"default {kind} device"
        raise LiveError(f"no {which} ({error}; `quell devices` lists them)") from error


def _check(sd, kind: str, device: dict, channels: int, rate: int) -> None:
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=device["index"], channels=channels, dtype="float32", samplerate=rate)
    except (sd.PortAudioError, ValueError) as error:
        verb = "record" if kind == "input" else "play"
        raise LiveError(f"{kind} device {device['name']!r} cannot {verb} {channels} channel(s) at {rate} Hz "
                        f"({error})") from error


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, leave alone) environment variables for the duration: libpulse reads PULSE_SINK and
    PULSE_SOURCE when a stream is opened."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _keyboard() -> Iterator[Callable[[], str]]:
    """Key presses from the terminal as they happen (cbreak mode); the terminal is restored at the end."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def pressed() -> str:
        keys = ""
        while select.select([fd], [], [], 0)[0]:
            read = os.read(fd, 64)
            if not read:  # the terminal hung up
                break
            keys += read.decode(errors="ignore")
        return keys

    try:
        yield pressed
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _signals(handlers: dict[str, Callable[[], None]]) -> Iterator[None]:
    """Install handlers for the named signals that exist here (only the main thread may), then restore."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for name, handler in handlers.items():
        number = getattr(signal, name, None)
        if number is not None:
            saved[number] = signal.signal(number, lambda *_, handler=handler: handler())
    try:
        yield
    finally:
        for number, previous in saved.items():
            signal.signal(number, previous)


# suppression strengths that + and - step through (attenuation limits in dB; None: no limit)
_STRENGTHS: list[float | None] = [0.0, 6.0, 12.0, 18.0, 24.0, 30.0, 36.0, 42.0, 48.0, None]


def _step_strength(limit: float | None, step: int) -> float | None:
    """The strength `step` steps up (+1) or down (-1) from the one nearest to `limit`."""
    here = len(_STRENGTHS) - 1 if limit is None else min(
        range(len(_STRENGTHS) - 1), key=lambda i: abs(_STRENGTHS[i] - limit))
    return _STRENGTHS[min(max(here + step, 0), len(_STRENGTHS) - 1)]


class LiveSession:
    """`quell live`: an input device into a LiveEngine, out to an output device, a WAV file, or both.

    The sink is the output device (`output_device`, or the default one), unless only `record` is given; with
    `virtual_mic` it is a virtual microphone named "quell" (PulseAudio/PipeWire), removed again at the end.
    Devices are PortAudio's: an index or part of a name (`quell devices`), None for the default. The rate is
    `sample_rate`, or 48 kHz where the devices can, else the input's default; the engine resamples to the model.
    `device_latency` is the latency PortAudio is asked for ("low", "high" or seconds).

    With `aec` (an echo model) the engine also hears what the speakers play, from the sound server's monitor
    source of the sink they play (PulseAudio/PipeWire), recorded as a stream of its own through ALSA's "pulse"
    device: the sink is PULSE_SINK or the server's default sink, which is where quell plays with the default
    output device or -o pulse, and where the other apps (the far end of a call) play. With `virtual_mic` quell
    plays into its own null sink, whose monitor carries quell's output, the near end: that is not the echo, so
    the speakers' sink is the reference there too. An output device that does not play through the server has
    no monitor: an error, as is a server without one.
    """

    def __init__(
        self, model: str | Path | ModelCard = "dtln", input_device: str | None = None,
        output_device: str | None = None, record: str | Path | None = None, record_input: str | Path | None = None,
        overwrite: bool = False, sample_rate: int | None = None, channels: int = 1, block_ms: float = 10.0,
        buffer_ms: float = 20.0, attenuation_limit_db: float | None = None, providers: list[str] | None = None,
        virtual_mic: bool = False, bypass: bool = False, device_latency: float | str = "low", aec: bool = False,
    ):
        if virtual_mic and output_device is not None:
            raise ValueError("--virtual-mic is the output: leave out --output")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        card = find_model(model)
        if aec and not card.reference_input:
            raise ValueError(f"model {card.name!r} is not an echo canceller (it takes no far-end reference): "
                             "--aec needs an echo model")
        self.aec = aec
        self.model, self.input_device, self.output_device = model, input_device, output_device
        self.record, self.record_input, self.overwrite = record, record_input, overwrite
        self.sample_rate, self.channels, self.block_ms, self.buffer_ms = sample_rate, channels, block_ms, buffer_ms
        self.attenuation_limit_db, self.providers = attenuation_limit_db, providers
        self.virtual_mic, self.bypass, self.device_latency = virtual_mic, bypass, device_latency
        self.playback = output_device is not None or virtual_mic or record is None
        self.engine: LiveEngine | None = None
        self._stream = self._monitor = None
        self._device_xruns = 0
        self._callbacks = 0
        self._stop = ""

    def run(
        self, duration: float | None = None, report: Callable[[LiveStats], None] | None = None,
        report_every: float = 0.5, keys: bool = False, stall_seconds: float = 5.0,
    ) -> LiveStats:
        """Run until `duration` seconds of audio have passed, Ctrl-C, SIGTERM or `q`; returns the final stats.

        `report` gets the stats every `report_every` seconds. With `keys` (a terminal), b toggles bypass, a echo
        cancellation (with `aec`), + and - step the suppression strength, q quits; SIGUSR1 toggles bypass too.
        A device that delivers nothing for `stall_seconds`, or stops, raises LiveError; so does a worker that
        failed, and, with `aec`, a server without the monitor source. Whatever happens, the streams are closed,
        the recordings finished and the virtual microphone removed.
        """
        # from here on SIGTERM and Ctrl-C ask the loop to stop instead of killing the process or raising
        # KeyboardInterrupt wherever the main thread happens to be (inside a lock or a stream's setup, it
        # could leave the exit waiting forever), so that whatever is made is also unmade; a second Ctrl-C, for
        # a stop that takes too long, raises KeyboardInterrupt after all. SIGUSR1 is caught from the start
        # too: probing the devices already shows up as a recording stream on a sound server, and a toggle sent
        # then must not kill the process (its default action)
        with _signals({"SIGTERM": self._terminate, "SIGHUP": self._terminate, "SIGINT": self._interrupt,
                       "SIGUSR1": self._toggle_bypass}):
            return self._probe_and_run(duration, report, report_every, keys, stall_seconds)

    def _probe_and_run(self, duration, report, report_every, keys, stall_seconds) -> LiveStats:
        sd = _sounddevice()
        if not sd.query_devices():
            raise LiveError("no audio devices found (no sound card, and no sound server that PortAudio can reach)")
        source = _device(sd, self.input_device, "input")
        sink = _device(sd, "pulse" if self.virtual_mic else self.output_device, "output") if self.playback else None
        rate = self.sample_rate or self._choose_rate(sd, source, sink)
        _check(sd, "input", source, self.channels, rate)
        if sink is not None:
            _check(sd, "output", sink, self.channels, rate)
        monitor = self._find_monitor(sd, sink, rate) if self.aec else None
        block = max(1, round(self.block_ms * rate / 1000))
        try:
            self._run(sd, source, sink, monitor, rate, block, duration, report, report_every, keys, stall_seconds)
        except KeyboardInterrupt:  # Ctrl-C is how a live session ends; everything is unmade already
            if self._stream is None:  # nothing ran yet
                raise
        return self.stats()

    def _run(self, sd, source, sink, monitor, rate, block, duration, report, report_every, keys,
             stall_seconds) -> None:
        with contextlib.ExitStack() as stack:  # unwinds in reverse: keys, streams, engine, microphone
            environment = {}
            if self.virtual_mic:
                # pin the input to the real microphone before "quell" exists, so that quell never hears itself
                environment["PULSE_SOURCE"] = os.environ.get("PULSE_SOURCE") or default_source()
                mic = stack.enter_context(VirtualMicrophone("quell", rate, self.channels))
                environment["PULSE_SINK"] = mic.sink
            self.engine = LiveEngine(self.model, rate, self.channels, block, self.buffer_ms, self.playback,
                                     self.record, self.record_input, self.overwrite, self.providers,
                                     self.attenuation_limit_db)
            self.engine.bypass = self.bypass
            self.engine.aec = self.aec  # an echo model without --aec hears no far end: a noise suppressor
            stack.callback(self.engine.stop)
            with _environment(**environment):
                if sink is None:
                    self._stream = self._open(sd, "InputStream", source["index"], rate, block, self._capture)
                else:
                    self._stream = self._open(sd, "Stream", (source["index"], sink["index"]), rate, block,
                                              self._duplex)
            stack.callback(self._close, sd, self._stream)
            if monitor is not None:
                device, name = monitor
                with _environment(PULSE_SOURCE=name):
                    self._monitor = self._open(sd, "InputStream", device["index"], rate, block, self._far_end)
                stack.callback(self._close, sd, self._monitor)
            pressed = stack.enter_context(_keyboard()) if keys and os.name == "posix" else None
            if not self._stop:
                self.engine.start()  # opens the recordings: only once the devices are open
                self._stream.start()
                if self._monitor is not None:
                    self._monitor.start()
                self._loop(duration, report, report_every, pressed, stall_seconds)

    def _choose_rate(self, sd, source: dict, sink: dict | None) -> int:
        try:
            sd.check_input_settings(device=source["index"], channels=self.channels, samplerate=48000)
            if sink is not None:
                sd.check_output_settings(device=sink["index"], channels=self.channels, samplerate=48000)
            return 48000
        except (sd.PortAudioError, ValueError):
            return int(source["default_samplerate"])

    def _find_monitor(self, sd, sink: dict | None, rate: int) -> tuple[dict, str]:
        """The input device to record the speakers' monitor source through, and the source's name (see the class)."""
        if sink is not None and not self.virtual_mic and sink["name"] not in _SOUND_SERVER_DEVICES:
            raise LiveError(f"--aec: output device {sink['name']!r} has no monitor source to hear it through (it does "
                            f"not play through PulseAudio or PipeWire; -o pulse does)")
        speakers = os.environ.get("PULSE_SINK")
        try:
            name = monitor_source(speakers)
        except VirtualMicError as error:
            raise LiveError(f"--aec: no monitor source to hear the speakers through ({error})") from error
        if name is None:
            which = f"the sink {speakers!r}" if speakers else "the default sink"
            raise LiveError(f"--aec: the sound server has no monitor source of {which} to hear the speakers through")
        try:
            device = _device(sd, "pulse", "input")
        except LiveError as error:
            raise LiveError("--aec records the monitor source through ALSA's \"pulse\" device, which PortAudio "
                            "does not see (Debian: apt install libasound2-plugins)") from error
        _check(sd, "input", device, self.channels, rate)
        return device, name

    def _open(self, sd, kind: str, device, rate: int, block: int, callback):
        """A sounddevice stream of `kind` ("Stream" or "InputStream") with the session's settings."""
        settings = dict(samplerate=rate, blocksize=block, channels=self.channels, dtype="float32",
                        latency=self.device_latency)
        try:
            return getattr(sd, kind)(device=device, callback=callback, **settings)
        except (sd.PortAudioError, ValueError) as error:
            raise LiveError(f"cannot open the audio device ({error})") from error

    def _close(self, sd, stream, timeout: float = 2.0) -> None:
        """Abort and close the stream, or give up after `timeout` seconds.

        PortAudio's ALSA backend can deadlock there when the PulseAudio server goes away under a stream (seen
        here with --virtual-mic, every time). A stream given up on must not be waited for at exit either, so
        sounddevice's exit handler, which would close it again, is dropped.
        """
        def close() -> None:
            stream.abort()  # before close: closing a running stream can hang too (sounddevice's notes)
            stream.close()

        closer = threading.Thread(target=close, name="quell-close", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            atexit.unregister(getattr(sd, "_exit_handler", close))

    def _loop(self, duration, report, report_every, pressed, stall_seconds) -> None:
        next_report = time.monotonic() + report_every
        seen, heard_at = -1, time.monotonic()
        while not self._stop:
            time.sleep(0.05)  # this thread competes with the worker for the GIL: it wakes rarely
            now = time.monotonic()
            if self.engine.error is not None:
                raise LiveError(f"processing failed: {self.engine.error}")
            if not self._stream.active:
                raise LiveError("the audio device stopped (unplugged, or its sound server went away)")
            if self._monitor is not None and not self._monitor.active:
                raise LiveError("the monitor source stopped (its sound server went away?)")
            if self._callbacks != seen:
                seen, heard_at = self._callbacks, now
            elif now - heard_at > stall_seconds:
                raise LiveError(f"the audio device delivered nothing for {stall_seconds:g} s (unplugged?)")
            if duration is not None and self.engine.seconds >= duration:
                break
            if pressed is not None:
                self._keys(pressed())
            if report is not None and now >= next_report:
                report(self.stats())
                next_report = now + report_every

    def _keys(self, keys: str) -> None:
        for key in keys:
            if key in "bB":
                self._toggle_bypass()
            elif key in "aA" and self.aec:
                self.engine.aec = not self.engine.aec
            elif key in "+=":
                self.engine.attenuation_limit_db = _step_strength(self.engine.attenuation_limit_db, 1)
            elif key == "-":
                self.engine.attenuation_limit_db = _step_strength(self.engine.attenuation_limit_db, -1)
            elif key in "qQ":
                self._stop = "quit"

    def _terminate(self) -> None:
        self._stop = "terminated"

    def _interrupt(self) -> None:
        if self._stop == "interrupted":
            raise KeyboardInterrupt
        self._stop = "interrupted"

    def _toggle_bypass(self) -> None:
        if self.engine is None:  # not made yet: it starts with self.bypass
            self.bypass = not self.bypass
        else:
            self.engine.bypass = not self.engine.bypass

    # ----- the audio callbacks: copies and counters only -----

    def _duplex(self, indata, outdata, frames, time_info, status) -> None:
        if status:
            self._note(status)
        self.engine.push(indata)
        self.engine.pull(outdata)
        self._callbacks += 1

    def _capture(self, indata, frames, time_info, status) -> None:
        if status:
            self._note(status)
        self.engine.push(indata)
        self._callbacks += 1

    def _far_end(self, indata, frames, time_info, status) -> None:
        if status:
            self._note(status)
        self.engine.push_reference(indata)

    def _note(self, status) -> None:
        # The first callback's flags are not counted: PortAudio starts the device before that callback has
        # handed it anything, so ALSA may report an underflow of audio that never existed (seen through
        # PulseAudio in about half of the starts, with or without quell's engine).
        if self._callbacks and (status.input_overflow or status.input_underflow or status.output_underflow
                                or status.output_overflow):
            self._device_xruns += 1

    def stats(self) -> LiveStats:
        """The engine's stats with the devices' latencies and xruns.

        The device latencies are those PortAudio reports for the open stream. Its per-callback time stamps
        would be finer, but through PulseAudio's ALSA plugin the capture stamps were measured here to be off
        by anything from 0 to 900 ms.
        """
        stats = self.engine.stats()
        device_in, device_out = self._stream.latency if self.playback else (self._stream.latency, 0.0)
        return replace(stats, device_in_ms=device_in * 1e3, device_out_ms=device_out * 1e3,
                       device_xruns=self._device_xruns)
