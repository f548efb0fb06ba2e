"""Noisy-speech synthesizer in the style of the DNS Challenge.

One call, `Synthesizer.mixture(seed)`, makes one training example from in-memory corpora:

1. a speech segment (random clip and offset; short clips are extended with further random clips);
2. with probability `reverb_prob`, a room: a measured RIR or one from a bank of simulated shoebox RIRs.
   The microphone hears the speech convolved with the whole RIR; the training target is the speech
   convolved with only the direct path and the first `early_ms` of reflections (it sounds natural, and
   a model can reach it: removing early reflections would mean inventing a dry voice);
3. 1..`max_noise_layers` noise layers: recordings, music, or noise generated in code (`generate_noise`);
4. optionally a microphone colouration (random EQ, band limit) applied to everything the mic hears, and
   to the target;
5. the noise scaled to the drawn SNR against the speech as heard, the sum scaled to the drawn level,
   and a clipping guard.

Every mixture is a pure function of (config, corpora, seed): the same seed gives identical arrays, so a
training set needs no storage and a bad example can be regenerated from its seed in `Mixture.params`.
Nothing here imports torch; pyroomacoustics is imported only to build the simulated RIR bank.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.signal
import soundfile as sf
import soxr
from scipy.ndimage import uniform_filter1d

from quell.dns.corpora import Corpus

logger = logging.getLogger(__name__)

NOISE_KINDS = ("white", "pink", "brown", "babble", "hum", "clicks", "modulated", "switching")

_SILENCE_RMS = 1e-4  # -80 dBFS: below this a speech or noise segment is treated as silence and re-drawn
_MAX_REDRAWS = 8
_RIR_PRE_PEAK_SAMPLES = 2  # kept before the direct-path peak: the main lobe of a fractional-delay pulse
_RIR_FLOOR = 1e-4  # -80 dB re the direct path: RIR samples after the last one above this are dropped
_RIR_BANK_SEED = 20_240_611  # bank 0 (training); bank k uses this seed + k
_RIR_BANK_VERSION = 1  # bump when simulate_rir changes, so that cached banks are rebuilt
_MAX_IMAGE_ORDER = 60  # ~0.1 s per RIR; higher orders only add late tail far below the direct path
_MIN_ROOM_M = np.array([3.0, 3.0, 2.5])
_EQ_RANGES_HZ = {"peak": (100.0, 6000.0), "lowshelf": (80.0, 500.0), "highshelf": (2000.0, 6000.0)}


@dataclass
class SynthConfig:
    """Ranges are (low, high) and drawn uniformly per mixture; probabilities are per mixture unless noted."""

    sample_rate: int = 16000
    segment_seconds: float = 4.0
    snr_db: tuple[float, float] = (-5.0, 25.0)
    level_dbfs: tuple[float, float] = (-35.0, -15.0)  # RMS of the noisy mixture
    reverb_prob: float = 0.3  # half of the reverberant clips use measured RIRs when there are any
    t60: tuple[float, float] = (0.1, 1.0)  # of simulated rooms, seconds
    early_ms: float = 50.0  # reflections after the direct path that stay in the training target
    generated_noise_prob: float = 0.4  # per noise layer: generated in code rather than a recording
    music_prob: float = 0.1  # per noise layer: music instead of noise (when a music corpus is given)
    max_noise_layers: int = 3
    mic_eq_prob: float = 0.3  # 1-3 random peaking/shelving filters, +-6 dB
    bandlimit_prob: float = 0.15  # low-pass at 4-7 kHz and/or high-pass at 50-300 Hz
    # speed perturbation of the speech (tempo and pitch together, as ASR corpora are stretched): with this
    # probability a factor in `speed_range` (1.1: 10% faster and higher); more voices from few speakers
    speed_prob: float = 0.0
    speed_range: tuple[float, float] = (0.9, 1.1)
    clip_guard: float = 0.99  # largest peak allowed in any written signal
    n_sim_rirs: int = 200  # size of the simulated RIR bank
    rir_bank: int = 0  # which simulated bank: training uses 0, validation sets another, so no room is shared

    def __post_init__(self) -> None:
        for name in ("snr_db", "level_dbfs", "t60", "speed_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"SynthConfig.{name}: low {low} is above high {high}")
        if self.speed_range[0] <= 0:
            raise ValueError("SynthConfig.speed_range must be positive")
        for name in ("reverb_prob", "generated_noise_prob", "music_prob", "mic_eq_prob", "bandlimit_prob",
                     "speed_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SynthConfig.{name} must be a probability, got {getattr(self, name)}")
        if self.max_noise_layers < 1:
            raise ValueError("SynthConfig.max_noise_layers must be at least 1")


@dataclass
class Mixture:
    """One training example. `noisy` = speech as the mic hears it + `noise`; `clean` is the target."""

    noisy: np.ndarray
    clean: np.ndarray
    noise: np.ndarray
    params: dict = field(default_factory=dict)


def _rms(signal: np.ndarray) -> float:
    return float(np.sqrt(np.dot(signal, signal) / max(len(signal), 1)))


def _unit_rms(signal: np.ndarray) -> np.ndarray:
    return (signal / max(_rms(signal), 1e-12)).astype(np.float32, copy=False)


def _rms_db(signal: np.ndarray) -> float:
    return 20.0 * math.log10(max(_rms(signal), 1e-12))


def _db_to_gain(db: float) -> float:
    return 10.0 ** (db / 20.0)


def _random_segment(clip: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """`n` samples of `clip` from a random offset; a clip shorter than `n` is looped."""
    if len(clip) >= n:
        offset = int(rng.integers(0, len(clip) - n + 1))
        return clip[offset : offset + n], offset
    offset = int(rng.integers(0, len(clip)))
    return np.tile(clip, (offset + n) // len(clip) + 1)[offset : offset + n], offset


# --------------------------------------------------------------------------------------------------
# Noise generated in code: covers what recordings rarely contain in a controlled way.


def _coloured(n: int, rng: np.random.Generator, sample_rate: int, exponent: float) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown), flat below 20 Hz."""
    white = rng.standard_normal(n, dtype=np.float32)
    if exponent == 0.0:
        return white
    spectrum = scipy.fft.rfft(white)
    frequencies = np.fft.rfftfreq(n, 1.0 / sample_rate).astype(np.float32)
    # flat below 20 Hz, else brown noise is dominated by inaudible drift
    spectrum *= np.maximum(frequencies, 20.0) ** (-exponent / 2.0)
    spectrum[0] = 0.0
    return scipy.fft.irfft(spectrum, n)


def _white(n, rng, sample_rate, speech_clips):
    return _coloured(n, rng, sample_rate, 0.0)


def _pink(n, rng, sample_rate, speech_clips):
    return _coloured(n, rng, sample_rate, 1.0)


def _brown(n, rng, sample_rate, speech_clips):
    return _coloured(n, rng, sample_rate, 2.0)


def _babble(n, rng, sample_rate, speech_clips):
    if not speech_clips:
        raise ValueError("babble noise needs speech clips")
    babble = np.zeros(n, dtype=np.float32)
    for _ in range(int(rng.integers(3, 9))):
        talker, _offset = _random_segment(speech_clips[int(rng.integers(len(speech_clips)))], n, rng)
        babble += _unit_rms(talker) * np.float32(_db_to_gain(rng.uniform(-6.0, 0.0)))
    return babble


def _hum(n, rng, sample_rate, speech_clips):
    """Mains hum and buzz: 50 or 60 Hz with random harmonics (up to 40) and a slowly wandering frequency."""
    mains = float(rng.choice([50.0, 60.0]))
    # one period with all harmonics as a wavetable, read at the instantaneous phase: one pass over n samples
    table_size = 4096
    n_harmonics = min(int(rng.integers(2, 41)), int(sample_rate / 2 / mains) - 1)
    harmonics = np.arange(1, n_harmonics + 1)
    amplitudes = rng.uniform(0.2, 1.0, n_harmonics) * harmonics ** -rng.uniform(0.5, 2.5)
    spectrum = np.zeros(table_size // 2 + 1, dtype=complex)
    spectrum[harmonics] = amplitudes * np.exp(2j * np.pi * rng.uniform(0.0, 1.0, n_harmonics))
    table = np.fft.irfft(spectrum, table_size)
    # the grid frequency wanders by ~0.1 %: a smooth random curve through points 100 ms apart
    points = np.arange(0, n + sample_rate // 10, sample_rate // 10)
    wander = np.interp(np.arange(n), points, rng.normal(0.0, 1e-3, len(points)))
    cycles = np.cumsum(mains * (1.0 + wander)) / sample_rate + rng.uniform(0.0, 1.0)
    position = (cycles % 1.0) * table_size
    return np.interp(position, np.arange(table_size + 1), np.append(table, table[0])).astype(np.float32)


def _clicks(n, rng, sample_rate, speech_clips):
    """Keyboard-like: decaying noise bursts (key press, often a softer release), band-pass filtered."""
    clicks = np.zeros(n, dtype=np.float32)
    n_presses = max(1, int(rng.poisson(rng.uniform(5.0, 15.0) * n / sample_rate)))
    for press in rng.integers(0, n, n_presses):
        onsets = [(int(press), 1.0)]
        if rng.random() < 0.7:
            onsets.append((int(press + rng.uniform(0.05, 0.15) * sample_rate), rng.uniform(0.2, 0.6)))
        for onset, amplitude in onsets:
            length = min(int(rng.uniform(0.003, 0.012) * sample_rate), n - onset)
            if length <= 0:
                continue
            decay = np.exp(-np.arange(length) / (rng.uniform(0.0005, 0.003) * sample_rate))
            burst = rng.standard_normal(length) * decay * amplitude * rng.uniform(0.3, 1.0)
            clicks[onset : onset + length] += burst.astype(np.float32)
    nyquist = sample_rate / 2
    band = (rng.uniform(300.0, 2000.0), min(rng.uniform(3000.0, 7000.0), 0.9 * nyquist))
    sos = scipy.signal.butter(2, band, btype="bandpass", fs=sample_rate, output="sos")
    return scipy.signal.sosfilt(sos, clicks).astype(np.float32)


def _modulated(n, rng, sample_rate, speech_clips):
    noise = _coloured(n, rng, sample_rate, rng.uniform(0.0, 2.0))
    time = np.arange(n, dtype=np.float32) / np.float32(sample_rate)
    rate, depth = rng.uniform(0.5, 8.0), rng.uniform(0.5, 1.0)
    envelope = 1.0 + depth * np.sin(
        np.float32(2 * np.pi * rate) * time + np.float32(rng.uniform(0, 2 * np.pi))
    )
    return noise * envelope.astype(np.float32)


def _switching(n, rng, sample_rate, speech_clips):
    """Non-stationary: 0.2-1.5 s stretches that are silent or one of 2-3 other noises, 5 ms cross-fades."""
    kinds = rng.choice(
        ["white", "pink", "brown", "hum", "clicks", "modulated"], int(rng.integers(2, 4)), False
    )
    sources = [_unit_rms(_GENERATORS[kind](n, rng, sample_rate, None)) for kind in kinds]
    lengths, total = [], 0
    while total < n:
        lengths.append(int(rng.uniform(0.2, 1.5) * sample_rate))
        total += lengths[-1]
    # choice 0 is silence, choice i is sources[i - 1]
    choices = rng.integers(0, len(sources) + 1, len(lengths))
    if not choices.any():
        choices[0] = 1
    per_sample = np.repeat(choices, lengths)[:n]
    switching = np.zeros(n, dtype=np.float32)
    fade = max(1, int(0.005 * sample_rate))
    for index, source in enumerate(sources, start=1):
        gate = uniform_filter1d((per_sample == index).astype(np.float32), fade)
        switching += source * gate * np.float32(_db_to_gain(rng.uniform(-6.0, 0.0)))
    return switching


_GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "white": _white,
    "pink": _pink,
    "brown": _brown,
    "babble": _babble,
    "hum": _hum,
    "clicks": _clicks,
    "modulated": _modulated,
    "switching": _switching,
}


def generate_noise(
    kind: str,
    n: int,
    rng: np.random.Generator,
    sample_rate: int,
    speech_clips: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """`n` samples of noise of one of `NOISE_KINDS`, float32 with unit RMS.

    "babble" sums 3-8 random segments of `speech_clips`; the other kinds need no data.
    """
    if kind not in _GENERATORS:
        raise ValueError(f"unknown noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")
    if n <= 0:
        raise ValueError(f"noise length must be positive, got {n}")
    return _unit_rms(_GENERATORS[kind](n, rng, sample_rate, speech_clips))


# --------------------------------------------------------------------------------------------------
# Rooms


def trim_rir(rir: np.ndarray, sample_rate: int) -> np.ndarray:
    """Align an RIR on its direct path and scale the direct path to +1.

    The direct path is the first peak within 12 dB of the strongest one: a cluster of reflections can be
    louder than the direct sound of a distant talker, but it always arrives later. Leading silence is cut
    up to `_RIR_PRE_PEAK_SAMPLES` before the direct path, so it sits at that index; the tail after the
    last sample above -80 dB is dropped.
    """
    magnitude = np.abs(rir)
    strongest = float(magnitude.max(initial=0.0))
    if not np.isfinite(strongest) or strongest == 0.0:
        raise ValueError("impulse response is silent or not finite")
    direct = int(np.argmax(magnitude >= 0.25 * strongest))
    while direct + 1 < len(rir) and magnitude[direct + 1] > magnitude[direct]:
        direct += 1
    start = max(0, direct - _RIR_PRE_PEAK_SAMPLES)
    end = len(rir) - int(np.argmax(magnitude[::-1] > _RIR_FLOOR * magnitude[direct]))
    return (rir[start:end] / rir[direct]).astype(np.float32)


def early_rir(rir: np.ndarray, sample_rate: int, early_ms: float) -> np.ndarray:
    """The direct path and first `early_ms` of a `trim_rir`-aligned RIR, ending in a 5 ms half-cosine fade."""
    direct = int(np.argmax(np.abs(rir[: _RIR_PRE_PEAK_SAMPLES + 1])))
    length = min(len(rir), direct + int(round(early_ms * sample_rate / 1000)) + 1)
    early = rir[:length].copy()
    fade = min(length - direct - 1, int(0.005 * sample_rate))
    if fade > 0:
        early[length - fade :] *= (0.5 + 0.5 * np.cos(np.linspace(0, np.pi, fade))).astype(np.float32)
    return early


def estimate_t60(rir: np.ndarray, sample_rate: int) -> float:
    """Reverberation time from the Schroeder decay curve: the -5 to -25 dB slope (T20) extrapolated to 60 dB.

    Returns NaN when the RIR does not decay by 25 dB.
    """
    energy = np.cumsum(np.square(rir[::-1], dtype=np.float64))[::-1]
    decay_db = 10 * np.log10(np.maximum(energy / energy[0], 1e-30))
    fit = np.flatnonzero((decay_db <= -5) & (decay_db >= -25))
    if len(fit) < 2 or decay_db[-1] > -25:
        return float("nan")
    slope_db_per_sample = np.polyfit(fit, decay_db[fit], 1)[0]
    return float(-60.0 / slope_db_per_sample / sample_rate)


def simulate_rir(rng: np.random.Generator, sample_rate: int, t60: float) -> np.ndarray:
    """A shoebox-room RIR (image sources, pyroomacoustics) with reverberation time `t60`, trimmed.

    Floor 3-15 m by 3-15 m, height 2.5-5 m; a room too big for a short `t60` (absorption above 1) is
    shrunk until it fits. Talker and mic are at least 0.5 m from the walls and from each other.
    """
    import pyroomacoustics as pra  # lazily: only building the RIR bank needs it

    dims = np.array([rng.uniform(3.0, 15.0), rng.uniform(3.0, 15.0), rng.uniform(2.5, 5.0)])
    while True:
        try:
            absorption, max_order = pra.inverse_sabine(t60, dims)
            break
        except ValueError:
            if np.all(dims <= _MIN_ROOM_M):
                raise ValueError(f"T60 {t60} s is too short for a {_MIN_ROOM_M} m room") from None
            dims = np.maximum(dims * 0.8, _MIN_ROOM_M)
    low = np.array([0.5, 0.5, 0.7])
    high = np.array([dims[0] - 0.5, dims[1] - 0.5, min(2.0, dims[2] - 0.3)])
    talker = np.array([*rng.uniform(low[:2], high[:2]), rng.uniform(1.2, min(1.9, dims[2] - 0.3))])
    mic = rng.uniform(low, high)
    while np.linalg.norm(mic - talker) < 0.5:
        mic = rng.uniform(low, high)
    room = pra.ShoeBox(
        dims, fs=sample_rate, materials=pra.Material(absorption), max_order=min(max_order, _MAX_IMAGE_ORDER)
    )
    room.add_source(talker)
    room.add_microphone(mic)
    room.compute_rir()
    return trim_rir(np.asarray(room.rir[0][0], dtype=np.float32), sample_rate)


def load_rir_bank(
    sample_rate: int, t60: tuple[float, float], n_rirs: int, cache_dir: str | Path | None = None, bank: int = 0
) -> list[np.ndarray]:
    """`n_rirs` simulated RIRs (T60 uniform in `t60`), simulated once from a fixed seed and cached as .npz.

    The cache file name is a hash of everything that determines the bank, so a change of parameters
    (or of pyroomacoustics) builds a new bank instead of reusing a wrong one.
    """
    recipe = {
        "version": _RIR_BANK_VERSION,
        "seed": _RIR_BANK_SEED + bank,
        "sample_rate": sample_rate,
        "t60": list(t60),
        "n_rirs": n_rirs,
        "max_image_order": _MAX_IMAGE_ORDER,
        "pyroomacoustics": metadata.version("pyroomacoustics"),
    }
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "quell"
    path = cache / f"rir_bank_{key}.npz"
    if path.exists():
        with np.load(path) as bank:
            return np.split(bank["samples"], np.cumsum(bank["lengths"])[:-1])

    logger.info("simulating %d room impulse responses into %s (once)", n_rirs, path)
    rng = np.random.default_rng(_RIR_BANK_SEED + bank)
    t60s = rng.uniform(t60[0], t60[1], n_rirs)
    rirs = [simulate_rir(rng, sample_rate, float(room_t60)) for room_t60 in t60s]
    cache.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        np.savez(file, samples=np.concatenate(rirs), lengths=[len(r) for r in rirs])
    os.replace(temporary, path)
    return rirs


# --------------------------------------------------------------------------------------------------
# Microphone colouration


def _biquad(kind: str, frequency: float, gain_db: float, q: float, sample_rate: int) -> np.ndarray:
    """One second-order section (RBJ audio-EQ cookbook) as a row of scipy's sos format."""
    a = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * np.pi * frequency / sample_rate
    cos_w0, alpha = np.cos(w0), np.sin(w0) / (2.0 * q)
    if kind == "peak":
        b = [1 + alpha * a, -2 * cos_w0, 1 - alpha * a]
        den = [1 + alpha / a, -2 * cos_w0, 1 - alpha / a]
    else:
        root = 2.0 * np.sqrt(a) * alpha
        sign = 1.0 if kind == "lowshelf" else -1.0
        b = [
            a * ((a + 1) - sign * (a - 1) * cos_w0 + root),
            sign * 2 * a * ((a - 1) - sign * (a + 1) * cos_w0),
            a * ((a + 1) - sign * (a - 1) * cos_w0 - root),
        ]
        den = [
            (a + 1) + sign * (a - 1) * cos_w0 + root,
            -sign * 2 * ((a - 1) + sign * (a + 1) * cos_w0),
            (a + 1) + sign * (a - 1) * cos_w0 - root,
        ]
    return np.array(b + den) / den[0]


def _mic_filter(config: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray | None, dict]:
    """A random mic colouration as sos sections for zero-phase filtering, and its description.

    The filters are applied forwards and backwards (zero phase) so that the coloured mic signal stays
    sample-aligned with the rest; each EQ section is designed with half the drawn gain,
    because zero-phase filtering applies its magnitude twice.
    """
    sample_rate, sections, eq_bands = config.sample_rate, [], []
    nyquist = sample_rate / 2
    if rng.random() < config.mic_eq_prob:
        for _ in range(int(rng.integers(1, 4))):
            kind = str(rng.choice(["peak", "lowshelf", "highshelf"]))
            low_hz, high_hz = _EQ_RANGES_HZ[kind]
            frequency = float(np.exp(rng.uniform(np.log(low_hz), np.log(min(high_hz, 0.8 * nyquist)))))
            gain_db, q = rng.uniform(-6.0, 6.0), (rng.uniform(0.5, 2.0) if kind == "peak" else np.sqrt(0.5))
            sections.append(_biquad(kind, frequency, gain_db / 2, q, sample_rate))
            eq_bands.append(f"{kind}:{frequency:.0f}Hz:{gain_db:+.1f}dB:q{q:.2f}")
    lowpass_hz = highpass_hz = 0.0
    if rng.random() < config.bandlimit_prob:
        which = rng.choice(["lowpass", "highpass", "both"])
        if which != "highpass":
            top = min(7000.0, 0.9 * nyquist)
            lowpass_hz = rng.uniform(min(4000.0, top), top)
            sections.extend(scipy.signal.butter(4, lowpass_hz, "lowpass", fs=sample_rate, output="sos"))
        if which != "lowpass":
            highpass_hz = rng.uniform(50.0, 300.0)
            sections.extend(scipy.signal.butter(2, highpass_hz, "highpass", fs=sample_rate, output="sos"))
    description = {
        "mic_eq": ";".join(eq_bands),
        "lowpass_hz": round(lowpass_hz, 1),
        "highpass_hz": round(highpass_hz, 1),
    }
    return (np.array(sections) if sections else None), description


# --------------------------------------------------------------------------------------------------
# The synthesizer


class Synthesizer:
    """Makes `Mixture`s from in-memory corpora; `mixture(seed)` is deterministic.

    `speech` is required; without `noise` every noise layer is generated, without `music` no layer is
    music, and `rirs` (measured impulse responses) is mixed half and half with the simulated bank.
    """

    def __init__(
        self,
        config: SynthConfig,
        speech: Corpus,
        noise: Corpus | None = None,
        music: Corpus | None = None,
        rirs: Corpus | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        for corpus in (speech, noise, music, rirs):
            if corpus is not None and corpus.sample_rate != config.sample_rate:
                rates = f"{corpus.sample_rate} Hz, the config {config.sample_rate} Hz"
                raise ValueError(f"{corpus.name} corpus is at {rates}")
        if not speech.clips:
            raise ValueError("the speech corpus is empty")
        self.config = config
        self.speech, self.noise, self.music = speech, noise, music
        self.segment_samples = int(round(config.segment_seconds * config.sample_rate))

        # rooms as (trimmed RIR, id for the metadata, estimated T60)
        rate = config.sample_rate
        self.real_rooms: list[tuple[np.ndarray, str, float]] = []
        for clip, path in zip(rirs.clips, rirs.paths, strict=True) if rirs is not None else ():
            rir = trim_rir(clip, rate)
            self.real_rooms.append((rir, path, estimate_t60(rir, rate)))
        self.simulated_rooms: list[tuple[np.ndarray, str, float]] = []
        if config.reverb_prob > 0 and config.n_sim_rirs > 0:
            bank = load_rir_bank(rate, config.t60, config.n_sim_rirs, cache_dir, config.rir_bank)
            self.simulated_rooms = [(rir, f"bank:{i}", estimate_t60(rir, rate)) for i, rir in enumerate(bank)]

    def mixture(self, seed: int) -> Mixture:
        """The training example for `seed`: noisy, clean target and added noise, and every parameter."""
        config = self.config
        rng = np.random.default_rng(seed)
        params: dict = {"seed": seed}

        speech = self._speech_segment(rng, params)
        target, heard = self._reverberate(speech, rng, params)
        noise = self._noise(rng, params)

        # The colouration of a cheap or odd microphone (EQ, band limits) is applied to everything the mic
        # picks up and to the target alike: the model learns to be indifferent to it and to keep the
        # speaker's voice as their mic captures it. (Asking it to undo a low-pass would be bandwidth
        # extension, which a noise suppressor cannot do and should not try.)
        mic_sos, mic_params = _mic_filter(config, rng)
        params.update(mic_params)
        if mic_sos is not None:
            coloured = scipy.signal.sosfiltfilt(mic_sos, np.stack([heard, noise, target]), axis=-1)
            heard, noise, target = coloured.astype(np.float32)

        snr_db, level_dbfs = rng.uniform(*config.snr_db), rng.uniform(*config.level_dbfs)
        noise = noise * np.float32(_rms(heard) / max(_rms(noise), 1e-12) / _db_to_gain(snr_db))
        noisy = heard + noise
        gain = _db_to_gain(level_dbfs) / max(_rms(noisy), 1e-12)
        # the guard covers every signal that is written to 16-bit files, not only the noisy one
        peak = gain * max(float(np.max(np.abs(s))) for s in (noisy, target, noise))
        clipped_guard = peak > config.clip_guard
        if clipped_guard:
            gain *= config.clip_guard / peak
        noisy, target, noise, heard = (s * np.float32(gain) for s in (noisy, target, noise, heard))

        params.update(
            snr_db=round(float(snr_db), 3),
            level_dbfs=round(float(level_dbfs), 3),
            clipped_guard=bool(clipped_guard),
            realised_snr_db=round(_rms_db(heard) - _rms_db(noise), 3),
            realised_level_dbfs=round(_rms_db(noisy), 3),
        )
        return Mixture(noisy=noisy, clean=target, noise=noise, params=params)

    def _speech_segment(self, rng: np.random.Generator, params: dict) -> np.ndarray:
        """A random speech segment, speed-perturbed with `speed_prob`; re-drawn a few times if it is silence
        (e.g. a pause between sentences)."""
        speed = 1.0
        if self.config.speed_prob > 0 and rng.random() < self.config.speed_prob:  # no draw when off: old seeds
            speed = float(rng.uniform(*self.config.speed_range))  # keep their mixtures
        length = self.segment_samples
        if speed != 1.0:  # a longer (faster) or shorter piece that resampling brings to the segment's length
            length = int(round(self.segment_samples * speed))
        segment = self._speech_piece(rng, params, length)
        if speed != 1.0:
            rate = self.config.sample_rate
            segment = soxr.resample(segment, rate * speed, rate).astype(np.float32)
            segment = np.pad(segment, (0, max(self.segment_samples - len(segment), 0)))[: self.segment_samples]
        params.update(speed=round(speed, 4))
        return segment

    def _speech_piece(self, rng: np.random.Generator, params: dict, length: int) -> np.ndarray:
        """`length` samples of speech from the corpus (several clips end to end when one is short)."""
        for _ in range(_MAX_REDRAWS):
            index = int(rng.integers(len(self.speech)))
            segment, offset = self.speech.clips[index], 0
            files = [self.speech.paths[index]]
            if len(segment) >= length:
                offset = int(rng.integers(0, len(segment) - length + 1))
                segment = segment[offset : offset + length]
            else:
                pieces = [segment]
                while sum(len(p) for p in pieces) < length:
                    index = int(rng.integers(len(self.speech)))
                    pieces.append(self.speech.clips[index])
                    files.append(self.speech.paths[index])
                segment = np.concatenate(pieces)[:length]
            if _rms(segment) > _SILENCE_RMS:
                break
        params.update(speech_files=";".join(files), speech_offset=offset)
        return segment

    def _reverberate(
        self, speech: np.ndarray, rng: np.random.Generator, params: dict
    ) -> tuple[np.ndarray, np.ndarray]:
        """(target, speech as heard): both the dry speech, or early- and fully-reverberant speech."""
        config, n = self.config, self.segment_samples
        params.update(rir_source="none", rir_id="", rir_t60=None)
        if rng.random() >= config.reverb_prob or not (self.real_rooms or self.simulated_rooms):
            return speech, speech
        use_real = bool(self.real_rooms) and (not self.simulated_rooms or rng.random() < 0.5)
        rooms = self.real_rooms if use_real else self.simulated_rooms
        rir, rir_id, t60 = rooms[int(rng.integers(len(rooms)))]
        params.update(
            rir_source="real" if use_real else "simulated", rir_id=rir_id, rir_t60=round(float(t60), 3)
        )
        # Both convolutions start at the same (direct-path) sample, so target and mixture stay aligned;
        # only the first n samples of the RIR can reach inside the segment.
        heard = scipy.signal.fftconvolve(speech, rir[:n])[:n]
        target = scipy.signal.oaconvolve(speech, early_rir(rir, config.sample_rate, config.early_ms))[:n]
        return target.astype(np.float32), heard.astype(np.float32)

    def _noise(self, rng: np.random.Generator, params: dict) -> np.ndarray:
        """1..max_noise_layers unit-RMS layers, the first at 0 dB and the others at -10..0 dB."""
        total = np.zeros(self.segment_samples, dtype=np.float32)
        layers = []
        for layer_index in range(int(rng.integers(1, self.config.max_noise_layers + 1))):
            layer, description = self._noise_layer(rng)
            gain_db = 0.0 if layer_index == 0 else rng.uniform(-10.0, 0.0)
            total += layer * np.float32(_db_to_gain(gain_db))
            layers.append(f"{description}@{gain_db:+.1f}dB")
        params.update(n_noise_layers=len(layers), noise_layers=";".join(layers))
        return total

    def _noise_layer(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        config, n = self.config, self.segment_samples
        if self.music is not None and rng.random() < config.music_prob:
            recorded = self.music
        elif self.noise is None or rng.random() < config.generated_noise_prob:
            recorded = None
        else:
            recorded = self.noise
        if recorded is not None:
            for _ in range(_MAX_REDRAWS):
                index = int(rng.integers(len(recorded)))
                segment, offset = _random_segment(recorded.clips[index], n, rng)
                if _rms(segment) > _SILENCE_RMS:
                    return _unit_rms(segment), f"{recorded.name}:{recorded.paths[index]}+{offset}"
        kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
        noise = generate_noise(kind, n, rng, config.sample_rate, self.speech.clips)
        return noise, f"generated:{kind}"


# --------------------------------------------------------------------------------------------------
# Writing a fixed set (validation, listening tests, other toolkits)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_dataset(
    out_dir: str | Path, synth: Synthesizer, n_clips: int, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write `n_clips` mixtures in the DNS layout: noisy/, clean/, noise/ (16-bit WAV) and metadata.csv.

    Clip i uses a seed derived from (`seed`, i), recorded in the CSV with every other parameter, so any
    clip can be regenerated with `synth.mixture(seed)`. Refuses a non-empty `out_dir` unless `overwrite`.
    """
    return _write_clips(out_dir, synth.mixture, {"noisy": "noisy", "clean": "clean", "noise": "noise"},
                        synth.config.sample_rate, asdict(synth.config), n_clips, seed, overwrite)


def _write_clips(
    out_dir: str | Path, mixture: Callable[[int], Mixture | EchoMixture], folders: dict[str, str],
    sample_rate: int, config: dict, n_clips: int, seed: int, overwrite: bool,
) -> Path:
    """The writer of `write_dataset` and `write_echo_dataset`: for each clip, every signal named in `folders`
    ({folder: attribute of the mixture}) as 16-bit WAV, then metadata.csv (one row per clip, every parameter)
    and config.json; all atomically."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty; pass overwrite=True to write into it")
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
        for stale in (out / folder).glob("clip_*.wav"):
            stale.unlink()

    rows = []
    for index in range(n_clips):
        clip_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        made = mixture(clip_seed)
        name = f"clip_{index:05d}.wav"
        for folder, signal_name in folders.items():
            signal = getattr(made, signal_name)
            _write_atomically(
                out / folder / name,
                lambda path, s=signal: sf.write(path, s, sample_rate, subtype="PCM_16", format="WAV"),
            )
        rows.append({"file": name, **made.params})

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as file:  # parameters that only some clips have are empty in the others
            writer = csv.DictWriter(file, fieldnames=list(dict.fromkeys(key for row in rows for key in row))
                                    or ["file"])
            writer.writeheader()
            writer.writerows(rows)

    _write_atomically(out / "metadata.csv", write_csv)
    _write_atomically(out / "config.json", lambda path: path.write_text(json.dumps(config, indent=2)))
    return out


# --------------------------------------------------------------------------------------------------
# Echo scenarios: a far end played through a loudspeaker into the room, heard again by the mic


ECHO_SCENARIOS = ("far_end", "near_end", "double_talk")  # who talks: far end only, near end only, both
NONLINEARITIES = ("hard_clip", "soft_clip", "polynomial")


@dataclass
class EchoConfig:
    """Echo-scenario ranges; the near end (speech, noise, room, level) follows `near`."""

    segment_seconds: float = 8.0
    scenario_probs: tuple[float, float, float] = (0.3, 0.2, 0.5)  # in the order of ECHO_SCENARIOS
    ser_db: tuple[float, float] = (-10.0, 10.0)  # near-end speech to echo at the mic
    delay: tuple[float, float] = (0.0, 0.5)  # bulk delay between the reference and its echo, seconds
    nonlinearity_prob: float = 0.5  # a small loudspeaker driven into distortion
    path_change_prob: float = 0.2  # the echo path changes once inside the clip (someone moves the phone)
    far_music_prob: float = 0.1  # the far end plays music rather than speech
    far_noise_prob: float = 0.05  # ... or noise
    reference_level_dbfs: tuple[float, float] = (-30.0, -15.0)  # the far end as the app plays it
    # in this share of double-talk clips the near end starts talking late, at a time drawn from `late_onset`
    # (seconds): the far end talks alone first, so the linear filter has converged when double talk begins
    late_onset_prob: float = 0.0
    late_onset: tuple[float, float] = (2.0, 5.0)
    near: SynthConfig = field(default_factory=lambda: SynthConfig(snr_db=(0.0, 40.0)))

    def __post_init__(self) -> None:
        if abs(sum(self.scenario_probs) - 1.0) > 1e-6 or min(self.scenario_probs) < 0:
            raise ValueError(f"EchoConfig.scenario_probs must be probabilities summing to 1: {self.scenario_probs}")
        for name in ("delay", "late_onset"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high:
                raise ValueError(f"EchoConfig.{name} must be 0 <= low <= high, got {getattr(self, name)}")
        if self.late_onset_prob > 0 and self.late_onset[1] >= self.segment_seconds:
            raise ValueError(f"EchoConfig.late_onset must end before the segment ({self.segment_seconds} s), "
                             f"got {self.late_onset}")


@dataclass
class EchoMixture:
    """One echo example: `mic` = near speech as heard + `echo` + `noise`; `reference` is what the app
    played; `near` is the target (near-end speech with early reflections; silence when the near end is)."""

    mic: np.ndarray
    reference: np.ndarray
    near: np.ndarray
    echo: np.ndarray
    noise: np.ndarray
    params: dict = field(default_factory=dict)


def _ramp(n: int, start: int, length: float) -> np.ndarray:
    """n samples of 0 up to `start`, rising linearly to 1 over `length` samples, then 1."""
    return np.clip((np.arange(n) - start) / length, 0.0, 1.0)


def loudspeaker(signal: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A loudspeaker's nonlinearity on a unit-peak signal: hard or soft clipping or a polynomial."""
    if kind == "hard_clip":
        limit = rng.uniform(0.3, 0.8)
        return np.clip(signal, -limit, limit) / limit, {"clip_at": round(limit, 3)}
    if kind == "soft_clip":
        drive = rng.uniform(1.5, 5.0)
        return np.tanh(drive * signal) / np.tanh(drive), {"drive": round(drive, 3)}
    if kind == "polynomial":  # asymmetric (even) and compressive (odd) terms, as in AEC-challenge data
        a2, a3 = rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.3)
        return signal + a2 * signal**2 - a3 * signal**3, {"a2": round(a2, 3), "a3": round(a3, 3)}
    raise ValueError(f"unknown loudspeaker nonlinearity {kind!r}; known: {', '.join(NONLINEARITIES)}")


class EchoSynthesizer:
    """Makes `EchoMixture`s; `mixture(seed)` is deterministic.

    The far end (other speakers than the near end, or music, or noise) goes through a loudspeaker
    (optionally distorting), a room (echo path: a simulated or measured RIR, changing once in some clips) and
    a bulk delay; the near end is a `Synthesizer` mixture (speech in its room plus noise at the mic). In
    far-end single talk the near speech is left out (noise stays), in near-end single talk the far end is
    silent (the reference is zeros).
    """

    def __init__(
        self, config: EchoConfig, near_speech: Corpus, far_speech: Corpus, noise: Corpus | None = None,
        music: Corpus | None = None, rirs: Corpus | None = None, cache_dir: str | Path | None = None,
    ):
        near_config = SynthConfig(**{**asdict(config.near), "segment_seconds": config.segment_seconds})
        self.config = config
        self.near = Synthesizer(near_config, near_speech, noise, music, rirs, cache_dir)
        self.far = Synthesizer(near_config, far_speech)  # its speech segments only
        self.music, self.noise = music, noise
        # loudspeaker-to-mic paths: the measured rooms and the simulated bank, whatever the near end's reverb
        rate = near_config.sample_rate
        simulated = load_rir_bank(rate, near_config.t60, near_config.n_sim_rirs, cache_dir, near_config.rir_bank) \
            if near_config.n_sim_rirs > 0 else []
        self.rooms = self.near.real_rooms + [(rir, f"bank:{i}") for i, rir in enumerate(simulated)]
        if not self.rooms:
            raise ValueError("echo scenarios need rooms: give measured RIRs or keep the simulated bank")

    def mixture(self, seed: int) -> EchoMixture:
        """The echo example for `seed`, with every parameter in `params`."""
        config = self.config
        rng = np.random.default_rng(seed)
        scenario = ECHO_SCENARIOS[int(rng.choice(3, p=config.scenario_probs))]
        near = self.near.mixture(int(rng.integers(1 << 31)))
        heard, noise, target = near.noisy - near.noise, near.noise, near.clean
        params: dict = {"seed": seed, "scenario": scenario, **{f"near_{k}": v for k, v in near.params.items()}}

        far, far_kind = self._far_end(rng, params)
        reference = _unit_rms(far) * np.float32(_db_to_gain(rng.uniform(*config.reference_level_dbfs)))
        reference *= np.float32(min(1.0, self.near.config.clip_guard / max(float(np.abs(reference).max()), 1e-12)))
        echo = self._echo_path(reference, rng, params)
        if scenario == "near_end":
            reference, echo = np.zeros_like(reference), np.zeros_like(echo)
        else:
            ser_db = rng.uniform(*config.ser_db)
            echo *= np.float32(_rms(heard) / max(_rms(echo), 1e-12) / _db_to_gain(ser_db))
            params["ser_db"] = round(float(ser_db), 3)
        if scenario == "far_end":
            heard, target = np.zeros_like(heard), np.zeros_like(target)
        params["near_onset"] = None  # (no random draw when late onsets are off: older recipes keep their data)
        if scenario == "double_talk" and config.late_onset_prob > 0 and rng.random() < config.late_onset_prob:
            heard, target, params["near_onset"] = self._late_onset(heard, target, rng)
        mic = heard + echo + noise
        peak = float(np.max(np.abs(mic)))
        if peak > self.near.config.clip_guard:  # keep the mic, and what it is made of, below full scale
            gain = np.float32(self.near.config.clip_guard / peak)
            mic, heard, echo, noise, target = (s * gain for s in (mic, heard, echo, noise, target))
        params.update(far_kind=far_kind, realised_ser_db=round(_rms_db(heard) - _rms_db(echo), 3)
                      if scenario == "double_talk" else None)
        return EchoMixture(mic=mic.astype(np.float32), reference=reference.astype(np.float32),
                           near=target.astype(np.float32), echo=echo.astype(np.float32),
                           noise=noise.astype(np.float32), params=params)

    def _late_onset(self, heard: np.ndarray, target: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, float]:
        """The near end's speech (as heard and as the target) silent before a random onset, faded in over 10 ms;
        returns both and the onset in seconds."""
        rate = self.near.config.sample_rate
        onset = int(round(rng.uniform(*self.config.late_onset) * rate))
        gate = _ramp(len(heard), onset, 0.01 * rate).astype(np.float32)
        return heard * gate, target * gate, round(onset / rate, 3)

    def _far_end(self, rng: np.random.Generator, params: dict) -> tuple[np.ndarray, str]:
        n = self.near.segment_samples
        draw, music_prob = rng.random(), self.config.far_music_prob
        if self.music is not None and draw < music_prob:
            index = int(rng.integers(len(self.music)))
            return _random_segment(self.music.clips[index], n, rng)[0], f"music:{self.music.paths[index]}"
        if music_prob <= draw < music_prob + self.config.far_noise_prob:
            if self.noise is not None:
                index = int(rng.integers(len(self.noise)))
                return _random_segment(self.noise.clips[index], n, rng)[0], f"noise:{self.noise.paths[index]}"
            return generate_noise("pink", n, rng, self.near.config.sample_rate), "generated:pink"
        far_params: dict = {}
        segment = self.far._speech_segment(rng, far_params)
        return segment, f"speech:{far_params['speech_files']}"

    def _echo_path(self, reference: np.ndarray, rng: np.random.Generator, params: dict) -> np.ndarray:
        """Loudspeaker, room (maybe changing once), bulk delay: the echo as it reaches the mic."""
        config, n, rate = self.config, len(reference), self.near.config.sample_rate
        driven = reference / max(float(np.max(np.abs(reference))), 1e-12)
        kind = None
        if rng.random() < config.nonlinearity_prob:
            kind = NONLINEARITIES[int(rng.integers(len(NONLINEARITIES)))]
            driven, nl_params = loudspeaker(driven, kind, rng)
            params.update({f"nonlinearity_{k}": v for k, v in nl_params.items()})
        params["nonlinearity"] = kind or "none"
        first = self.rooms[int(rng.integers(len(self.rooms)))]
        echo = scipy.signal.fftconvolve(driven, first[0][:n])[:n]
        params.update(echo_rir=first[1], path_change_at=None)
        if rng.random() < config.path_change_prob:
            second = self.rooms[int(rng.integers(len(self.rooms)))]
            later = scipy.signal.fftconvolve(driven, second[0][:n])[:n]
            change = int(rng.uniform(0.3, 0.7) * n)
            fade = _ramp(n, change, 0.02 * rate)  # 20 ms crossfade
            echo = (1 - fade) * echo + fade * later
            params.update(path_change_at=round(change / rate, 3), echo_rir_after=second[1])
        delay = int(round(rng.uniform(*config.delay) * rate))
        params["delay"] = round(delay / rate, 4)
        return np.concatenate([np.zeros(delay), echo])[:n].astype(np.float32)


def write_echo_dataset(
    out_dir: str | Path, synth: EchoSynthesizer, n_clips: int, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write `n_clips` echo scenarios: mic/, far_end/ (what was played), clean/ (the near-end target: silence in
    far-end single talk), echo/ (16-bit WAV), metadata.csv (`scenario`, `delay`, `ser_db`, ... per clip) and
    config.json. The folders are what `quell eval --noisy mic --far-end far_end --clean clean` pairs by name.

    Seeds, regeneration and the refusal of a non-empty `out_dir` are those of `write_dataset`.
    """
    config = {**asdict(synth.config), "near": asdict(synth.near.config)}  # the near end as used (clip length)
    return _write_clips(out_dir, synth.mixture, {"mic": "mic", "far_end": "reference", "clean": "near",
                                                 "echo": "echo"},
                        synth.near.config.sample_rate, config, n_clips, seed, overwrite)
