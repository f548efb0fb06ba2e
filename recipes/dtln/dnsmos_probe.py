"""Probes of where DTLN's DNSMOS gap to RNNoise sits: writes folders of audio for `quell eval --enhanced`.

    python recipes/dtln/dnsmos_probe.py peer rnnoise --noisy runs/valid_set/noisy -o runs/probe/rnnoise
    python recipes/dtln/dnsmos_probe.py oracle psm --noisy runs/valid_set/noisy --clean runs/valid_set/clean \
        -o runs/probe/oracle_psm
    python recipes/dtln/dnsmos_probe.py swap --base runs/probe/dtln --donor runs/probe/rnnoise --band 0 1000 \
        -o runs/probe/dtln_rnnoise_below1k
    python recipes/dtln/dnsmos_probe.py comb --base runs/probe/dtln --cutoff 1000 -o runs/probe/comb_1k
    quell eval --noisy runs/valid_set/noisy --clean runs/valid_set/clean --enhanced runs/probe/oracle_psm \
        --baselines '' --limit 100 --jobs 2 --out runs/eval_probe_oracle_psm

`oracle` applies a mask computed from the clean target itself (what no model knows) in an STFT of DTLN's size
(512-point, hop 128, square-root Hann windows, the noisy phase): the best a magnitude mask of that form can do;
with `--rectangular`, in the STFT of DTLN's stage 1 itself (no window, overlap-add divided by 4).
`swap` puts one system's magnitude into another's output in a frequency band (the base's phase), to see how much
of a score difference that band holds. `comb` runs a system's outputs through a pitch filter like RNNoise's
(the noise between harmonics lowered); `blend` adds the noisy input back at a set gain.
`peer` writes a peer's outputs (quell.dns.baselines), aligned.
`levels` prints, per frequency band, each system's output level against the clean target's in the frames where
the target talks, and in those where it is silent (against the talking frames' level there).

    python recipes/dtln/dnsmos_probe.py levels --clean runs/valid_set/clean --limit 100 \
        runs/probe/dtln runs/probe/rnnoise
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import istft, stft

from quell.models.dtln import frame_signal, overlap_add
from quell.models.layers import band_spread_matrix

WINDOW, HOP = 512, 128
_STFT_WINDOW = np.sqrt(np.hanning(WINDOW + 1)[:WINDOW])  # periodic: sums to a constant at hop 128


def _stft(x: np.ndarray, rate: int) -> np.ndarray:
    return stft(x, rate, window=_STFT_WINDOW, nperseg=WINDOW, noverlap=WINDOW - HOP)[2]


def _istft(spectrum: np.ndarray, rate: int, length: int) -> np.ndarray:
    return istft(spectrum, rate, window=_STFT_WINDOW, nperseg=WINDOW, noverlap=WINDOW - HOP)[1][:length]


def _rectangular_frames(x: np.ndarray) -> np.ndarray:
    """DTLN's framing (as in `DTLN.forward`): the signal padded so that each sample is in WINDOW // HOP frames."""
    overlap = WINDOW - HOP
    padded = torch.nn.functional.pad(torch.from_numpy(x)[None], (overlap, overlap + (-x.size) % HOP))
    return frame_signal(padded, WINDOW, HOP)[0].numpy()


def _rectangular_overlap_add(frames: np.ndarray, length: int) -> np.ndarray:
    out = overlap_add(torch.from_numpy(frames)[None], HOP)[0].numpy() / (WINDOW // HOP)
    return out[WINDOW - HOP : WINDOW - HOP + length]


def _ratio(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    return np.minimum(np.abs(clean) / (np.abs(noisy) + 1e-9), 1.0)


def _band32(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    spread = band_spread_matrix(noisy.shape[0], 32, 16000).numpy()
    gains = np.sqrt((spread @ np.abs(clean) ** 2) / (spread @ np.abs(noisy) ** 2 + 1e-12))
    return spread.T @ np.minimum(gains, 1.0)


# oracle masks of the clean target C and the noisy mixture Y (spectra [bins, frames]), values in [0, 1]
ORACLE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "ratio": _ratio,  # |C| / |Y|, at most 1
    "ratio_squared": lambda c, y: _ratio(c, y) ** 2,  # suppresses more where the noise is comparable
    "band32": _band32,  # |C| / |Y| by energy in 32 ERB bands (RNNoise's form), spread back over the bins
    "psm": lambda c, y: np.clip(np.real(c * np.conj(y)) / (np.abs(y) ** 2 + 1e-12), 0.0, 1.0),  # phase-sensitive
    "wiener": lambda c, y: np.abs(c) ** 2 / (np.abs(c) ** 2 + np.abs(y - c) ** 2 + 1e-12),
}


def _clips(folder: Path, limit: int | None) -> list[Path]:
    clips = sorted(folder.glob("*.wav"))[:limit]
    if not clips:
        raise SystemExit(f"no .wav files in {folder}")
    return clips


def oracle(mask: str, noisy: Path, clean: Path, out: Path, limit: int | None, rectangular: bool = False) -> None:
    """Write the noisy clips with the oracle `mask` applied (`rectangular`: in DTLN's unwindowed STFT)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in _clips(noisy, limit):
        y, rate = sf.read(path, dtype="float32")
        c, _ = sf.read(clean / path.name, dtype="float32")
        if rectangular:  # [frames, bins], as the masks want [bins, frames]
            noisy_spec, clean_spec = (np.fft.rfft(_rectangular_frames(x), axis=-1).T for x in (y, c))
            frames = np.fft.irfft((noisy_spec * ORACLE_MASKS[mask](clean_spec, noisy_spec)).T, n=WINDOW, axis=-1)
            enhanced = _rectangular_overlap_add(frames, y.size)
        else:
            noisy_spec, clean_spec = _stft(y, rate), _stft(c, rate)
            enhanced = _istft(noisy_spec * ORACLE_MASKS[mask](clean_spec, noisy_spec), rate, y.size)
        sf.write(out / path.name, enhanced.astype(np.float32), rate)


def swap(base: Path, donor: Path, band: tuple[float, float], out: Path, limit: int | None) -> None:
    """Write `base`'s clips with `donor`'s magnitude in `band` (Hz; the base's phase kept)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in _clips(base, limit):
        a, rate = sf.read(path, dtype="float32")
        b, _ = sf.read(donor / path.name, dtype="float32")
        n = min(a.size, b.size)
        spec_a, spec_b = _stft(a[:n], rate), _stft(b[:n], rate)
        hz = np.fft.rfftfreq(WINDOW, 1 / rate)
        rows = (hz >= band[0]) & (hz < band[1])
        spec_a[rows] = np.abs(spec_b[rows]) * np.exp(1j * np.angle(spec_a[rows]))
        sf.write(out / path.name, _istft(spec_a, rate, n).astype(np.float32), rate)


def peer(name: str, noisy: Path, out: Path, limit: int | None) -> None:
    """Write a peer's enhanced clips (quell.dns.baselines, as `quell eval --baselines` runs them)."""
    from quell.dns.baselines import BASELINES

    system = BASELINES[name]()
    out.mkdir(parents=True, exist_ok=True)
    for path in _clips(noisy, limit):
        y, rate = sf.read(path, dtype="float32")
        sf.write(out / path.name, system.enhance(y, rate).audio, rate)


PITCH_HZ = (60.0, 400.0)
COMB_BAND_BINS = 4  # the pitch filter's bands: 4 bins of 31.25 Hz


def _pitch_periods(padded: np.ndarray, starts: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Per frame (WINDOW samples from each start): the period in samples whose delayed copy correlates best with
    the frame, and that normalised correlation (0 where nothing is periodic)."""
    shortest, longest = int(rate / PITCH_HZ[1]), int(rate / PITCH_HZ[0])
    periods, strengths = np.zeros(starts.size, int), np.zeros(starts.size)
    for f, s in enumerate(starts):
        frame = padded[s : s + WINDOW]
        delayed = np.lib.stride_tricks.sliding_window_view(padded[s - longest : s + WINDOW - shortest], WINDOW)
        delayed = delayed[::-1]  # row i: the frame delayed by shortest + i samples
        corr = delayed @ frame / np.sqrt((delayed**2).sum(1) * (frame @ frame) + 1e-12)
        best = int(np.argmax(corr))
        periods[f], strengths[f] = shortest + best, max(corr[best], 0.0)
    return periods, strengths


def comb(base: Path, out: Path, cutoff: float, strength: float, voicing: float, periods_back: int,
         limit: int | None) -> None:
    """Write `base`'s clips through a pitch filter below `cutoff` Hz, as RNNoise's: in each band of each frame the
    spectrum of the signal one pitch period earlier is added in proportion to how well it correlates with the
    frame's own (times `strength`), and the band's energy is put back to what it was, so the harmonics keep their
    level and what lies between them (uncorrelated from period to period) is lowered. Frames whose best
    period correlates less than `voicing` are left alone. Causal but for the STFT's own window."""
    out.mkdir(parents=True, exist_ok=True)
    window = _STFT_WINDOW
    for path in _clips(base, limit):
        y, rate = sf.read(path, dtype="float64")
        lead = WINDOW + periods_back * int(rate / PITCH_HZ[0])
        padded = np.concatenate([np.zeros(lead), y, np.zeros(WINDOW)])
        starts = np.arange(lead - WINDOW + HOP, lead + y.size, HOP)
        periods, voiced = _pitch_periods(padded, starts, rate)
        frames = np.stack([padded[s : s + WINDOW] for s in starts]) * window
        spec = np.fft.rfft(frames, axis=-1)
        pitch = sum(np.fft.rfft(np.stack([padded[s - k * t : s - k * t + WINDOW] for s, t in zip(starts, periods,
                    strict=True)]) * window, axis=-1) for k in range(1, periods_back + 1)) / periods_back
        bins = int(np.searchsorted(np.fft.rfftfreq(WINDOW, 1 / rate), cutoff))
        for lo in range(0, bins, COMB_BAND_BINS):
            band = slice(lo, min(lo + COMB_BAND_BINS, bins))
            x, p = spec[:, band], pitch[:, band]
            energy = (np.abs(x) ** 2).sum(1)
            r = (x * p.conj()).real.sum(1) / np.sqrt(energy * (np.abs(p) ** 2).sum(1) + 1e-12)
            alpha = strength * np.clip(r, 0, 1) * (voiced >= voicing)
            filtered = x + alpha[:, None] * p
            scale = np.sqrt(energy / ((np.abs(filtered) ** 2).sum(1) + 1e-12))
            spec[:, band] = filtered * scale[:, None]
        enhanced = np.zeros(padded.size)
        for s, frame in zip(starts, np.fft.irfft(spec, n=WINDOW, axis=-1) * window, strict=True):
            enhanced[s : s + WINDOW] += frame
        enhanced = enhanced[lead : lead + y.size] / (window**2).reshape(-1, HOP).sum(0).mean()
        sf.write(out / path.name, enhanced.astype(np.float32), rate)


def blend(base: Path, noisy: Path, gain_db: float, out: Path, limit: int | None) -> None:
    """Write `base`'s clips with the noisy input added at `gain_db` (an attenuation limit: nothing is taken down
    by more than about that much)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in _clips(base, limit):
        y, rate = sf.read(path, dtype="float32")
        x, _ = sf.read(noisy / path.name, dtype="float32")
        sf.write(out / path.name, y + 10 ** (gain_db / 20) * x[: y.size], rate)


LEVEL_BANDS_HZ = (0, 250, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8001)


def levels(clean: Path, systems: list[Path], limit: int | None) -> None:
    """Print each system's output level against the target's, per band, in talking and in silent frames.

    Talking frames: the target's energy within 25 dB of its loudest frame in the clip; silent: 50 dB or more
    below it. Energies are summed over all clips before the ratio (loud clips weigh more).
    """
    hz = np.fft.rfftfreq(WINDOW, 1 / 16000)
    rows = [(hz >= lo) & (hz < hi) for lo, hi in zip(LEVEL_BANDS_HZ[:-1], LEVEL_BANDS_HZ[1:], strict=True)]
    window = np.hanning(WINDOW)

    def power(x: np.ndarray) -> np.ndarray:
        frames = np.lib.stride_tricks.sliding_window_view(x, WINDOW)[:: WINDOW // 2] * window
        return np.abs(np.fft.rfft(frames, axis=-1)) ** 2

    sums = {system: np.zeros((3, len(rows))) for system in systems}  # talking out, talking clean, silent out
    for path in _clips(clean, limit):
        c, _ = sf.read(path, dtype="float32")
        target = power(c)
        energy = target.sum(1)
        talking, silent = energy > energy.max() * 10**-2.5, energy < energy.max() * 10**-5
        for system in systems:
            y, _ = sf.read(system / path.name, dtype="float32")
            out = power(y[: c.size])
            for b, r in enumerate(rows):
                sums[system][:, b] += [out[talking][:, r].sum(), target[talking][:, r].sum(), out[silent][:, r].sum()]
    print("bands (Hz):", " ".join(f"{lo}-{hi}" for lo, hi in zip(LEVEL_BANDS_HZ[:-1], LEVEL_BANDS_HZ[1:], strict=True)))
    for system, (talk_out, talk_clean, silent_out) in sums.items():
        for frames, out in (("talking frames, output / target", talk_out), ("silent frames, output / talking target",
                                                                              silent_out)):
            print(f"{system}: {frames} dB:", np.round(10 * np.log10(out / talk_clean), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("oracle")
    p.add_argument("mask", choices=sorted(ORACLE_MASKS))
    p.add_argument("--noisy", type=Path, required=True)
    p.add_argument("--clean", type=Path, required=True)
    p.add_argument("--rectangular", action="store_true", help="in DTLN's stage-1 STFT (no window)")
    s = commands.add_parser("swap")
    s.add_argument("--base", type=Path, required=True)
    s.add_argument("--donor", type=Path, required=True)
    s.add_argument("--band", type=float, nargs=2, required=True, metavar=("LOW_HZ", "HIGH_HZ"))
    r = commands.add_parser("peer")
    r.add_argument("name")
    r.add_argument("--noisy", type=Path, required=True)
    c = commands.add_parser("comb")
    c.add_argument("--base", type=Path, required=True)
    c.add_argument("--cutoff", type=float, default=1000.0, help="Hz: filter below this")
    c.add_argument("--strength", type=float, default=1.0)
    c.add_argument("--voicing", type=float, default=0.3, help="least correlation at the best period")
    c.add_argument("--periods", type=int, default=1, help="average this many periods back")
    b = commands.add_parser("blend")
    b.add_argument("--base", type=Path, required=True)
    b.add_argument("--noisy", type=Path, required=True)
    b.add_argument("--gain", type=float, required=True, help="dB of the noisy input added")
    for sub in (p, s, r, c, b):
        sub.add_argument("-o", "--out", type=Path, required=True)
    lv = commands.add_parser("levels")
    lv.add_argument("--clean", type=Path, required=True)
    lv.add_argument("systems", type=Path, nargs="+")
    for sub in (p, s, r, c, b, lv):
        sub.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    if args.command == "levels":
        levels(args.clean, args.systems, args.limit)
        return
    if args.command == "oracle":
        oracle(args.mask, args.noisy, args.clean, args.out, args.limit, args.rectangular)
    elif args.command == "blend":
        blend(args.base, args.noisy, args.gain, args.out, args.limit)
    elif args.command == "comb":
        comb(args.base, args.out, args.cutoff, args.strength, args.voicing, args.periods, args.limit)
    elif args.command == "swap":
        swap(args.base, args.donor, tuple(args.band), args.out, args.limit)
    else:
        peer(args.name, args.noisy, args.out, args.limit)


if __name__ == "__main__":
    main()
