"""Mix the mic back into a canceller's outputs on an echo set, where a double-talk gate says so.

    python recipes/d3net_aec/mix_back.py runs/tune_out/aec runs/tune_echo runs/mix_02 --gain 0.2 --gate far-end
    quell eval --noisy runs/tune_echo/mic --clean runs/tune_echo/clean --far-end runs/tune_echo/far_end \
        --enhanced runs/mix_02 --baselines '' --out runs/eval_mix_02 --no-dnsmos

The question it answers (README.md here, "Mixing the mic back"): how much does AECMOS's double-talk degradation
rating move when the output leaks the mic (echo included) where both ends talk? Per 10 ms hop, the output is
`(1 - w) * output + w * mic`, w ramping within the hop; w is `gain` while the gate is open and decays by
`release` per hop once it closes. Gates, on smoothed hop energies:
  always   : open everywhere;
  far-end  : the far end plays (its aligned signal above `--far-floor` dBFS; the set's true delay);
  ratio    : the far end plays and the output keeps at least `--threshold` dB of the mic's energy (a causal
             double-talk detector from what a runtime has);
  oracle   : the far end plays and the clean near end is above `--threshold` dBFS (a perfect detector);
  detector : the far end plays and the output, less its noise floor, exceeds the echo expected from the far
             end by `--threshold` dB;
  probabilities : the far end plays and a learnt detector's probability (`dt_head.py`) exceeds `--threshold`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf
from echo_set import aligned_far_end, clips, fit  # beside this script

HOP = 160  # 10 ms at 16 kHz
GATES = ["always", "far-end", "ratio", "oracle", "detector", "probabilities"]


def _hop_energies(signal: np.ndarray, hops: int, smoothing: float) -> np.ndarray:
    """Mean square per hop, smoothed over hops by a one-pole filter."""
    energy = (signal[: hops * HOP].reshape(hops, HOP) ** 2).mean(axis=1)
    smoothed, state = np.empty_like(energy), 0.0
    for t, value in enumerate(energy):
        state = smoothing * state + (1 - smoothing) * value
        smoothed[t] = state
    return smoothed


def _detector(energy: dict[str, np.ndarray], far_plays: np.ndarray, threshold_db: float) -> np.ndarray:
    """Double talk where the output, less its own noise floor, exceeds the echo expected from the far end.

    The echo return (mic over far-end energy, averaged in dB) is learnt where the far end plays and the gate is
    shut; the output's noise floor follows its minimum, rising 0.02 dB per hop."""
    gate = np.zeros_like(far_plays)
    floor, log_return = np.inf, None
    for t, plays in enumerate(far_plays):
        output, mic, far = energy["output"][t], energy["mic"][t], energy["far"][t]
        floor = min(output, floor * 1.005)
        if not plays:
            continue
        if log_return is not None:
            gate[t] = output - floor > 10 ** (threshold_db / 10) * np.exp(log_return) * far
        if not gate[t]:
            ratio = np.log(mic / far)
            log_return = ratio if log_return is None else 0.95 * log_return + 0.05 * ratio
    return gate



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", type=Path, help="the canceller's outputs, one WAV per clip of the echo set")
    parser.add_argument("echo_set", type=Path, help="a `quell synth --echo` folder")
    parser.add_argument("mixed", type=Path)
    parser.add_argument("--gain", type=float, default=0.2, help="share of the mic while the gate is open")
    parser.add_argument("--gate", choices=GATES, default="far-end")
    parser.add_argument("--threshold", type=float, default=-12.0,
                        help="the gate's threshold: dB (ratio, detector), dBFS (oracle) or a probability")
    parser.add_argument("--far-floor", type=float, default=-50.0, help="dBFS: the far end counts as playing above")
    parser.add_argument("--probabilities", type=Path, default=None,
                        help="a folder of per-hop near-end probabilities, CLIP.npy (dt_head.py detect)")
    parser.add_argument("--soft", action="store_true",
                        help="probabilities: mix at gain x probability (no threshold), released as before")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds from the start with the gate shut")
    parser.add_argument("--release", type=float, default=0.9, help="per-hop decay of the mix once the gate closes")
    parser.add_argument("--smoothing", type=float, default=0.7, help="one-pole smoothing of the hop energies")
    args = parser.parse_args()
    args.mixed.mkdir(parents=True, exist_ok=True)
    rows = clips(args.echo_set)
    open_share: dict[str, list[float]] = {}
    for path in sorted(args.outputs.glob("*.wav")):
        output, rate = sf.read(path, dtype="float64")
        n, hops = len(output), len(output) // HOP
        mic = fit(sf.read(args.echo_set / "mic" / path.name, dtype="float64")[0], n)
        far = aligned_far_end(args.echo_set, rows[path.name], n, dtype="float64")
        energy = {name: _hop_energies(signal, hops, args.smoothing) for name, signal in
                  (("output", output), ("mic", mic), ("far", far))}
        gate = np.ones(hops, bool) if args.gate == "always" else energy["far"] > 10 ** (args.far_floor / 10)
        if args.gate == "ratio":
            gate &= energy["output"] > 10 ** (args.threshold / 10) * energy["mic"]
        elif args.gate == "oracle":
            clean = fit(sf.read(args.echo_set / "clean" / path.name, dtype="float64")[0], n)
            gate &= _hop_energies(clean, hops, args.smoothing) > 10 ** (args.threshold / 10)
        if args.gate == "detector":
            gate = _detector(energy, gate, args.threshold)
        elif args.gate == "probabilities":
            probabilities = fit(np.load(args.probabilities / (path.stem + ".npy")), hops)
            if args.soft:  # the share follows the probability instead of a threshold
                share = np.where(gate, probabilities, 0.0)
            gate &= probabilities > args.threshold
        gate[: round(args.hold * rate / HOP)] = False
        weights, w = np.zeros(hops + 1), 0.0
        for t in range(hops):
            if args.soft and args.gate == "probabilities":
                w = max(args.gain * share[t], args.release * w)
            else:
                w = args.gain if gate[t] else args.release * w
            weights[t + 1] = w
        ramp = (weights[:-1, None] + (weights[1:] - weights[:-1])[:, None] * np.arange(HOP) / HOP).ravel()
        mixed = output.copy()
        mixed[: hops * HOP] += ramp * (mic[: hops * HOP] - output[: hops * HOP])
        sf.write(args.mixed / path.name, mixed.astype(np.float32), rate, subtype="FLOAT")
        open_share.setdefault(rows[path.name]["scenario"], []).append(float(np.mean(weights[1:] >= args.gain / 2)))
    for scenario, shares in sorted(open_share.items()):
        print(f"{scenario}: mix on in {np.mean(shares):.0%} of the hops")


if __name__ == "__main__":
    main()
