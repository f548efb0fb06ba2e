"""The linear echo filter alone on an echo set (`quell synth --echo`), aligned by each clip's true delay.

    python recipes/d3net_aec/linear_only.py runs/tune_echo runs/linear_only [--step 0.2]
    quell eval --noisy runs/tune_echo/mic --clean runs/tune_echo/clean --far-end runs/tune_echo/far_end \
        --enhanced runs/linear_only --baselines '' --out runs/eval_linear_only --no-dnsmos

What the network gets to work on, scored as if it were the output (README.md here, "Late onset").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from echo_set import aligned_far_end, clips  # beside this script

from quell.models.adaptive import AdaptiveEchoFilter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("echo_set", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--step", type=float, default=0.5, help="largest step of the variable-step filter")
    parser.add_argument("--partitions", type=int, default=20, help="filter length in 10 ms hops")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    hop = 160
    for row in clips(args.echo_set).values():
        mic, rate = sf.read(args.echo_set / "mic" / row["file"], dtype="float32")
        n = mic.size // hop * hop
        reference = aligned_far_end(args.echo_set, row, n)
        echo_filter = AdaptiveEchoFilter(hop, args.partitions, args.step, variable_step=True, sample_rate=rate)
        with torch.no_grad():
            residual, _ = echo_filter(torch.from_numpy(mic[None, :n]), torch.from_numpy(reference[None]))
        out = np.zeros_like(mic)
        out[:n] = residual[0].numpy()
        sf.write(args.output / row["file"], out, rate, subtype="FLOAT")


if __name__ == "__main__":
    main()
