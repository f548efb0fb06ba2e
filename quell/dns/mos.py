"""Non-intrusive MOS predictors with the ONNX models shipped in the `speechmos` wheel: DNSMOS and AECMOS.

Nothing is downloaded: the models are read from the installed package's folder (its Python modules are not
imported: they pull librosa and requests).
- DNSMOS P.835 (SIG, BAK, OVRL) and P.808, scored as Microsoft's reference `dnsmos_local.py` does: 9.01 s
  windows every second (short clips are tiled), P.835 raw scores mapped by the published polynomials, P.808
  on a 120-band log-mel spectrogram (librosa's defaults, reimplemented here in numpy).
- AECMOS (echo and other-degradation ratings of an echo canceller's output, given the far-end reference, the
  mic and the scenario), as in the AEC-challenge's `aecmos.py`: 160-band log-mel of the three signals plus
  the scenario marker, into the 16 kHz model.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

RATE = 16000
_WINDOW_SECONDS = 9.01
P835_POLYNOMIALS = {  # raw model output -> MOS, the non-personalised polynomials (highest power first)
    "sig": np.poly1d([-0.08397278, 1.22083953, 0.0052439]),
    "bak": np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
    "ovrl": np.poly1d([-0.06766283, 1.11546468, 0.04602535]),
}


def models_folder(kind: str = "dnsmos") -> Path:
    spec = importlib.util.find_spec("speechmos")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("DNSMOS needs the 'speechmos' package (pip install 'quell[eval]')")
    return Path(next(iter(spec.submodule_search_locations))) / f"{kind}_models"


@lru_cache(maxsize=1)
def _sessions():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    folder = models_folder()
    return (ort.InferenceSession(str(folder / "sig_bak_ovr.onnx"), options, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(str(folder / "model_v8.onnx"), options, providers=["CPUExecutionProvider"]))


@lru_cache(maxsize=4)
def _mel_filters(n_fft: int = 321, n_mels: int = 120) -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft, n_mels): Slaney mel scale and area normalisation."""

    def hz_to_mel(f):
        f = np.asarray(f, float)
        linear = f / (200.0 / 3)
        log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(f >= 1000.0, log, linear)

    def mel_to_hz(m):
        m = np.asarray(m, float)
        linear = m * (200.0 / 3)
        log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
        return np.where(m >= 15.0, log, linear)

    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / RATE)
    mel_freqs = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(RATE / 2), n_mels + 2))
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    return weights * (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]


def _log_mel(audio: np.ndarray, n_fft: int = 321, hop: int = 160, n_mels: int = 120) -> np.ndarray:
    """(power_to_db(melspectrogram, ref=max, top_db=80) + 40) / 40, frames x bands, as both models want."""
    padded = np.pad(audio.astype(np.float64), n_fft // 2)  # librosa: center=True, zero padding
    n_frames = 1 + (len(padded) - n_fft) // hop
    index = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    power = np.abs(np.fft.rfft(padded[index] * window, axis=1)) ** 2
    mel = power @ _mel_filters(n_fft, n_mels).T
    db = 10 * np.log10(np.maximum(mel, 1e-10))
    db = np.maximum(db - db.max(), -80.0)
    return ((db + 40) / 40).astype(np.float32)


def dnsmos(audio: np.ndarray, sample_rate: int = RATE) -> dict[str, float]:
    """DNSMOS of one clip: {"sig", "bak", "ovrl"} (P.835) and "p808"; audio in [-1, 1], resampled to 16 kHz."""
    audio = np.asarray(audio, np.float32)
    if sample_rate != RATE:
        import soxr

        audio = soxr.resample(audio, sample_rate, RATE).astype(np.float32)
    window = int(_WINDOW_SECONDS * RATE)
    if len(audio) == 0:
        raise ValueError("DNSMOS of an empty signal")
    while len(audio) < window:
        audio = np.concatenate([audio, audio])
    primary, p808 = _sessions()
    scores: dict[str, list[float]] = {"sig": [], "bak": [], "ovrl": [], "p808": []}
    n_windows = int(np.floor(len(audio) / RATE) - _WINDOW_SECONDS) + 1  # as the reference script counts
    for start in range(0, n_windows * RATE, RATE):
        segment = audio[start : start + window]
        if len(segment) < window:
            continue
        raw = primary.run(None, {"input_1": segment[None]})[0][0]
        for name, value in zip(("sig", "bak", "ovrl"), raw, strict=True):
            scores[name].append(float(P835_POLYNOMIALS[name](value)))
        scores["p808"].append(float(p808.run(None, {"input_1": _log_mel(segment[:-160])[None]})[0][0][0]))
    return {name: float(np.mean(values)) for name, values in scores.items()}


AECMOS_TALK_TYPES = {"far_end": "st", "near_end": "nst", "double_talk": "dt"}  # our scenarios -> the model's


@lru_cache(maxsize=1)
def _aecmos_session():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    path = models_folder("aecmos") / "Run_1663915512_Stage_0.onnx"  # the 16 kHz model with scenario marker
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def aecmos(reference: np.ndarray, mic: np.ndarray, enhanced: np.ndarray, scenario: str) -> dict[str, float]:
    """AECMOS {"echo", "degradation"} (1-5) of `enhanced`, given the far end played and the mic, at 16 kHz.

    `scenario` is "far_end" (far-end single talk), "near_end" (near-end single talk) or "double_talk".
    Signals are cut to the shortest and to the model's 20 s.
    """
    if scenario not in AECMOS_TALK_TYPES:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(AECMOS_TALK_TYPES)}")
    length = min(len(reference), len(mic), len(enhanced), 20 * RATE)
    features = [_log_mel(np.asarray(s[:length], np.float32), n_fft=513, hop=256, n_mels=160)
                for s in (reference, mic, enhanced)]
    # the scenario marker: 20 frames of ones or zeros saying who talks, then 20 frames of zeros
    talk = AECMOS_TALK_TYPES[scenario]
    far_single, near_single = talk == "st", talk == "nst"
    marks = (1.0 - near_single, 1.0 - far_single, 1.0)  # reference, mic, enhanced
    features = [np.concatenate([f, np.full((20, f.shape[1]), m, np.float32), np.zeros((20, f.shape[1]), np.float32)])
                for f, m in zip(features, marks, strict=True)]
    session = _aecmos_session()
    feeds = {session.get_inputs()[0].name: np.stack(features)[None].astype(np.float32),
             "h0": np.zeros((4, 1, 64), np.float32)}
    result = np.asarray(session.run(None, feeds)[0]).reshape(-1)
    return {"echo": float(result[0]), "degradation": float(result[1])}
