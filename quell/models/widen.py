"""Widen a trained echo canceller without changing what it computes (Net2Net-style, Chen et al. 2016).

A wider `D3NetAEC` (more complex channels in the trunk, a larger growth in the D3 blocks) starts from a trained
narrow one: every convolution keeps the trained weights between the old channels, the new channels get fresh
random weights from every input, and the weights from new channels into old ones start at zero. The new
channels are therefore computed but unheard: the widened model gives the narrow one's output exactly, and
training then finds what the extra capacity is good for (the zero weights get gradients from the first step).

    python -m quell.models.widen runs/aec_stage3/best.pt -o runs/aec_wide/init.pt --channels 24 --growth 12
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from quell.models.d3net_aec import D3NetAEC, D3NetAECConfig


def _place(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], prefix: str,
           out_index: torch.Tensor, in_index: torch.Tensor) -> None:
    """Put a narrow ComplexConv2d's weights into a wide one: old outputs hear only old inputs (as trained)."""
    for part in ("weight_real", "weight_imag"):
        weight = new[f"{prefix}.{part}"]
        weight[out_index] = 0.0
        weight[out_index[:, None], in_index[None, :]] = old[f"{prefix}.{part}"]
    bias = f"{prefix}.bias"
    if bias in old:
        old_out, new_out = old[bias].shape[0] // 2, new[bias].shape[0] // 2
        new[bias][out_index] = old[bias][:old_out]
        new[bias][new_out + out_index] = old[bias][old_out:]


def widen_state_dict(old: dict[str, torch.Tensor], old_config: D3NetAECConfig, new_config: D3NetAECConfig,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights of a `new_config` model (wider: channels, growth) that computes what `old` computes."""
    fixed = ("window", "hop", "layers", "blocks", "downsample", "compress", "filter_partitions")
    changed = [name for name in fixed if getattr(old_config, name) != getattr(new_config, name)]
    if changed:
        raise ValueError(f"widening changes only channels and growth, not {', '.join(changed)}")
    if new_config.channels < old_config.channels or new_config.growth < old_config.growth:
        raise ValueError("the new model must be at least as wide as the old one")
    torch.manual_seed(seed)
    wide = D3NetAEC(new_config)
    new = {k: v.clone() for k, v in wide.state_dict().items()}
    trunk = torch.arange(old_config.channels)
    growth = torch.arange(old_config.growth)
    _place(new, old, "encoder", trunk, torch.arange(old["encoder.weight_real"].shape[1]))
    for i in range(old_config.downsample):
        _place(new, old, f"down.{i}", trunk, trunk)
        _place(new, old, f"up.{i}", trunk, trunk)
    old_sizes = [old_config.channels] + [old_config.growth] * old_config.layers
    for b, block in enumerate(wide.blocks):
        for i in range(old_config.layers):
            for g in range(i + 1):
                _place(new, old, f"blocks.{b}.layers.{i}.{g}", growth, trunk if g == 0 else growth)
        # the mix hears every group: the old groups' channels, in order, sit at each new group's start
        mix_in = torch.cat([torch.arange(size) + offset
                            for size, offset in zip(old_sizes, block.group_offsets, strict=True)])
        _place(new, old, f"blocks.{b}.mix", trunk, mix_in)
    _place(new, old, "masks", torch.arange(2), trunk)
    for key, value in old.items():  # the linear filter and anything else without channels
        if not key.startswith(("encoder.", "down.", "up.", "blocks.", "masks.")):
            new[key] = value.clone()
    return new


def widen_checkpoint(source: Path, destination: Path, channels: int, growth: int, seed: int = 0) -> None:
    """A training checkpoint of a wider model from `source` (its recipe's sizes changed), as `--init` takes it."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    recipe = copy.deepcopy(checkpoint["recipe"])
    old_config = D3NetAECConfig(**recipe["model_args"])
    recipe["model_args"].update(channels=channels, growth=growth)
    new_config = D3NetAECConfig(**recipe["model_args"])
    model = widen_state_dict(checkpoint["model"], old_config, new_config, seed)
    state = {"step": checkpoint["state"]["step"], "epoch": 0, "best": None,
             "init": checkpoint["state"].get("init"),
             "widened_from": {"checkpoint": str(source), "channels": old_config.channels, "growth": old_config.growth}}
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "recipe": recipe, "state": state}, destination)


def main() -> None:
    """Command line: widen a D3NetAEC checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--growth", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists")
    widen_checkpoint(args.checkpoint, args.out, args.channels, args.growth, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
