"""Experiment: a double-talk detector learnt on the frozen canceller's features (README.md here, "Mixing ...").

    python recipes/d3net_aec/dt_head.py train runs/aec_stage3/best.pt runs/dt_head3 --clips 400
    python recipes/d3net_aec/dt_head.py attach runs/aec_stage3/best.pt runs/dt_head3 runs/aec_dt3/best.pt
    quell export runs/aec_dt3/best.pt -o quell/assets/aec.onnx --name aec       # stage 4, shipped

    # offline: its probabilities on an echo set (true delay), mixed in afterwards
    python recipes/d3net_aec/dt_head.py detect runs/aec_stage3/best.pt runs/dt_head3 runs/tune_echo runs/dt_probs
    python recipes/d3net_aec/mix_back.py runs/tune_out/aec runs/tune_echo runs/mix_head --gain 0.3 \
        --gate probabilities --probabilities runs/dt_probs

`train` synthesizes echo scenarios from the recipe's training data (8 s, seeds apart from the training run's),
runs the frozen network over them and fits a small causal GRU on what it computed (per 10 ms hop: the bounded
echo and noise masks' magnitudes and the energies of the signals it hears and of its output, in 8 bands; the
last decoder layer's channel magnitudes) to say whether the near end talks (its target above -50 dBFS, the
oracle gate's rule; with `--target double-talk`, whether the reference plays too). `detect` writes, for each
clip of an echo set, the per-hop probabilities (.npy), with the reference aligned by the set's true delay.
`attach` puts the detector into a copy of the canceller's checkpoint (`D3NetAECConfig.presence_hidden`): its
exported graph then mixes the mic in by itself (`quell/models/d3net_aec.py`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from echo_set import aligned_far_end, clips  # beside this script
from torch import nn

from quell.export.exporter import load_checkpoint
from quell.models.d3net_aec import DoubleTalkDetector
from quell.models.train import ExampleSource

ACTIVE_DBFS = -50.0
SEED = 7_000_000  # far from the training runs' seeds


@torch.no_grad()
def features(model, mic: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[B, samples] mic and aligned reference -> [B, T, D] per-hop features of the frozen network."""
    analysis = model.analyse(mic, reference)
    return model.presence_features(analysis["spectra"], analysis["masks"], analysis["near"], analysis["hidden"])


def labels(signal: torch.Tensor, hop: int, hops: int) -> torch.Tensor:
    """[B, samples] signal (the near-end target, the reference) -> [B, hops] 1 where its hop energy is above
    ACTIVE_DBFS."""
    n = hops * hop
    signal = nn.functional.pad(signal, (0, max(0, n - signal.shape[-1])))[..., :n]
    energy = (signal.reshape(signal.shape[0], hops, hop) ** 2).mean(-1)
    return (10 * torch.log10(energy + 1e-12) > ACTIVE_DBFS).float()


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
        target = labels(near, model.config.hop, x.shape[1])
        if args.target == "double-talk":  # near end AND far end: the mix then needs no far-end gate of its own
            target *= labels(reference, model.config.hop, x.shape[1])
        targets.append(target)
        print(f"features: {min(start + 8, args.clips)}/{args.clips} clips", flush=True)
    x, y = torch.cat(feats), torch.cat(targets)
    split = int(0.9 * len(x))
    head = DoubleTalkDetector(x.shape[-1], args.hidden)
    head.mean.copy_(x[:split].reshape(-1, x.shape[-1]).mean(0))
    head.std.copy_(x[:split].reshape(-1, x.shape[-1]).std(0) + 1e-3)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    best = None
    for epoch in range(args.epochs):
        order = torch.randperm(split)
        for i in range(0, split, 16):
            batch = order[i : i + 16]
            loss = loss_fn(head.logits(x[batch])[0], y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = head.logits(x[split:])[0]
            held_out = loss_fn(logits, y[split:]).item()
            accuracy = ((logits > 0).float() == y[split:]).float().mean()
        print(f"epoch {epoch + 1}: train loss {loss.item():.3f}, held-out loss {held_out:.3f}, "
              f"accuracy {accuracy:.3f}", flush=True)
        if args.keep_best and (best is None or held_out < best):  # the epoch with the lowest held-out loss
            best = held_out
            torch.save({"head": head.state_dict(), "inputs": x.shape[-1], "hidden": args.hidden}, args.out / "head.pt")
    if not args.keep_best:  # the last epoch (stage 4's detector was trained so)
        torch.save({"head": head.state_dict(), "inputs": x.shape[-1], "hidden": args.hidden}, args.out / "head.pt")


def detect(args) -> None:
    model, _ = load_checkpoint(args.checkpoint)
    saved = torch.load(args.head / "head.pt")
    head = DoubleTalkDetector(saved["inputs"], saved.get("hidden", 32))
    head.load_state_dict(saved["head"])
    args.probabilities.mkdir(parents=True, exist_ok=True)
    lead = round(args.lead * model.config.sample_rate)
    for row in clips(args.echo_set).values():
        mic, _ = sf.read(args.echo_set / "mic" / row["file"], dtype="float32")
        reference = aligned_far_end(args.echo_set, row, len(mic), lead)
        x = features(model, torch.from_numpy(mic[None]), torch.from_numpy(reference[None]))
        with torch.no_grad():
            probabilities = torch.sigmoid(head.logits(x)[0])[0].numpy()
        np.save(args.probabilities / (Path(row["file"]).stem + ".npy"), probabilities)


def attach(args) -> None:
    """A checkpoint of the canceller with the detector inside: its output then has the mic mixed in."""
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    saved = torch.load(args.head / "head.pt")
    model_args = checkpoint["recipe"]["model_args"]
    model_args.update(presence_hidden=saved.get("hidden", 32), double_talk_mix=args.mix)
    checkpoint["model"].update({f"presence.{name}": value for name, value in saved["head"].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train")
    t.add_argument("checkpoint", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--clips", type=int, default=300)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--hidden", type=int, default=32, help="GRU units")
    t.add_argument("--keep-best", action="store_true", help="keep the epoch of lowest held-out loss, not the last")
    t.add_argument("--target", choices=["near-end", "double-talk"], default="near-end",
                   help="what the detector learns: the near end talks, or both ends do")
    d = commands.add_parser("detect")
    d.add_argument("checkpoint", type=Path)
    d.add_argument("head", type=Path)
    d.add_argument("echo_set", type=Path)
    d.add_argument("probabilities", type=Path)
    d.add_argument("--lead", type=float, default=0.002, help="seconds the reference leads its echo")
    a = commands.add_parser("attach")
    a.add_argument("checkpoint", type=Path)
    a.add_argument("head", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--mix", type=float, default=0.3, help="share of the mic where both ends surely talk")
    args = parser.parse_args()
    torch.set_num_threads(2)
    {"train": train, "detect": detect, "attach": attach}[args.command](args)


if __name__ == "__main__":
    main()
