"""Experiment: a double-talk detector learnt on the frozen canceller's features (README.md here, "Mixing ...").

    python recipes/d3net_aec/dt_head.py train runs/aec_stage3/best.pt runs/dt_head --clips 300
    python recipes/d3net_aec/dt_head.py detect runs/aec_stage3/best.pt runs/dt_head runs/tune_echo runs/dt_probs
    python recipes/d3net_aec/mix_back.py runs/tune_out/aec runs/tune_echo runs/mix_head --gain 0.3 \
        --gate probabilities --probabilities runs/dt_probs

`train` synthesizes echo scenarios from the recipe's training data (8 s, seeds apart from the training run's),
runs the frozen network over them and fits a small causal GRU on what it computed (per 10 ms hop: the bounded
echo and noise masks' magnitudes and the energies of the signals it hears and of its output, in 8 bands; the
last decoder layer's channel magnitudes) to say whether the near end talks (its target above -50 dBFS, the
oracle gate's rule). `detect` writes, for each clip of an echo set, the per-hop probabilities (.npy), with the
reference aligned by the set's true delay.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import nn

from quell.export.exporter import load_checkpoint
from quell.models.d3net_aec import _frames
from quell.models.train import ExampleSource

BANDS = 8
ACTIVE_DBFS = -50.0
SEED = 7_000_000  # far from the training runs' seeds


def _band_pool(x: torch.Tensor) -> torch.Tensor:
    """[B, T, F] -> [B, T, BANDS]: means over contiguous frequency bands."""
    return torch.stack([chunk.mean(-1) for chunk in x.tensor_split(BANDS, dim=-1)], -1)


@torch.no_grad()
def features(model, mic: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[B, samples] mic and aligned reference -> [B, T, D] per-hop features of the frozen network."""
    cfg = model.config
    overlap, bins = cfg.window - cfg.hop, cfg.bins
    tail = (-mic.shape[-1]) % cfg.hop
    signals, _ = model._signals(*(nn.functional.pad(x, (0, tail)) for x in (mic, reference)))
    spectra = torch.stack([_frames(nn.functional.pad(x, (overlap, overlap)), cfg) for x in signals], 1) \
        @ model.dft_forward
    captured = {}
    handle = model.masks.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))

    def blocks(x):
        for block in model.blocks:
            x = block(x)
        return x

    masks = model._masks(spectra, blocks)
    handle.remove()
    near, _ = model._apply_masks(spectra[:, 0], masks)
    magnitude = torch.tanh(torch.sqrt(masks[:, :2] ** 2 + masks[:, 2:] ** 2 + 1e-12))  # [B, 2, T, F]

    def log_energy(spectrum):  # [B, T, 2F] -> [B, T, BANDS]
        power = spectrum[..., :bins] ** 2 + spectrum[..., bins:] ** 2
        return torch.log10(_band_pool(power) + 1e-10)

    hidden = captured["x"]  # [B, 2C, T, F]: the decoder's last complex layer
    channels = hidden.shape[1] // 2
    hidden = torch.sqrt(hidden[:, :channels] ** 2 + hidden[:, channels:] ** 2 + 1e-12).mean(-1).transpose(1, 2)
    parts = [_band_pool(magnitude[:, 0]), _band_pool(magnitude[:, 1]), log_energy(near), hidden]
    parts += [log_energy(spectra[:, i]) for i in range(spectra.shape[1])]
    return torch.cat(parts, -1)


def labels(near: torch.Tensor, hop: int, hops: int) -> torch.Tensor:
    """[B, samples] near-end target -> [B, hops] 1 where its hop energy is above ACTIVE_DBFS."""
    n = hops * hop
    near = nn.functional.pad(near, (0, max(0, n - near.shape[-1])))[..., :n]
    energy = (near.reshape(near.shape[0], hops, hop) ** 2).mean(-1)
    return (10 * torch.log10(energy + 1e-12) > ACTIVE_DBFS).float()


class Head(nn.Module):
    """Causal per-hop detector: standardized features -> GRU -> probability that the near end talks."""

    def __init__(self, inputs: int, hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(inputs))
        self.register_buffer("std", torch.ones(inputs))
        self.gru = nn.GRU(inputs, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru((x - self.mean) / self.std)
        return self.out(y).squeeze(-1)  # logits [B, T]


def train(args) -> None:
    model, checkpoint = load_checkpoint(args.checkpoint)
    recipe = checkpoint["recipe"]
    base = Path("recipes/d3net_aec")  # the recipe's data paths are relative to its folder
    synth = {**recipe.get("synth", {}), "segment_seconds": 8.0}
    source = ExampleSource("echo", recipe["data"], base, synth)
    args.out.mkdir(parents=True, exist_ok=True)
    feats, targets = [], []
    for start in range(0, args.clips, 8):
        examples = [source.example(SEED + i) for i in range(start, min(start + 8, args.clips))]
        mic, reference = (torch.from_numpy(np.stack([e[0][k] for e in examples])) for k in (0, 1))
        near = torch.from_numpy(np.stack([e[1][0] for e in examples]))
        x = features(model, mic, reference)
        feats.append(x)
        targets.append(labels(near, model.config.hop, x.shape[1]))
        print(f"features: {min(start + 8, args.clips)}/{args.clips} clips", flush=True)
    x, y = torch.cat(feats), torch.cat(targets)
    split = int(0.9 * len(x))
    head = Head(x.shape[-1])
    head.mean.copy_(x[:split].reshape(-1, x.shape[-1]).mean(0))
    head.std.copy_(x[:split].reshape(-1, x.shape[-1]).std(0) + 1e-3)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(args.epochs):
        order = torch.randperm(split)
        for i in range(0, split, 16):
            batch = order[i : i + 16]
            loss = loss_fn(head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = head(x[split:])
            accuracy = ((logits > 0).float() == y[split:]).float().mean()
            print(f"epoch {epoch + 1}: train loss {loss.item():.3f}, held-out loss "
                  f"{loss_fn(logits, y[split:]).item():.3f}, accuracy {accuracy:.3f}", flush=True)
    torch.save({"head": head.state_dict(), "inputs": x.shape[-1]}, args.out / "head.pt")


def detect(args) -> None:
    model, _ = load_checkpoint(args.checkpoint)
    saved = torch.load(args.head / "head.pt")
    head = Head(saved["inputs"])
    head.load_state_dict(saved["head"])
    args.probabilities.mkdir(parents=True, exist_ok=True)
    lead = round(args.lead * model.config.sample_rate)
    with open(args.echo_set / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        mic, rate = sf.read(args.echo_set / "mic" / row["file"], dtype="float32")
        far, _ = sf.read(args.echo_set / "far_end" / row["file"], dtype="float32")
        delay = max(round(float(row["delay"]) * rate) - lead, 0)
        reference = np.concatenate([np.zeros(delay, np.float32), far])[: len(mic)]
        reference = np.pad(reference, (0, len(mic) - len(reference)))
        x = features(model, torch.from_numpy(mic[None]), torch.from_numpy(reference[None]))
        with torch.no_grad():
            probabilities = torch.sigmoid(head(x))[0].numpy()
        np.save(args.probabilities / (Path(row["file"]).stem + ".npy"), probabilities)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train")
    t.add_argument("checkpoint", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--clips", type=int, default=300)
    t.add_argument("--epochs", type=int, default=30)
    d = commands.add_parser("detect")
    d.add_argument("checkpoint", type=Path)
    d.add_argument("head", type=Path)
    d.add_argument("echo_set", type=Path)
    d.add_argument("probabilities", type=Path)
    d.add_argument("--lead", type=float, default=0.002, help="seconds the reference leads its echo")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train(args) if args.command == "train" else detect(args)


if __name__ == "__main__":
    main()
