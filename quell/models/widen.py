"""Widen a trained model without changing what it computes (Net2Net-style, Chen et al. 2016).

A wider model starts from a trained narrow one: every layer keeps the trained weights between the old units,
the new units get fresh random weights from every input, and the weights from new units into old ones start at
zero. The new units are therefore computed but unheard: the widened model gives the narrow one's output
exactly, and training then finds what the extra capacity is good for (the zero weights get gradients from the
first step). Two models widen:
- `D3NetAEC`: more complex channels in the trunk (`--channels`), a larger growth in the D3 blocks (`--growth`);
- `DTLN`: more LSTM units in both stages (`--hidden`); each gate of each LSTM gets the new units.

    python -m quell.models.widen runs/aec_stage3/best.pt -o runs/aec_wide/init.pt --channels 24 --growth 12
    python -m quell.models.widen runs/dtln.pt -o runs/dtln_wide/init.pt --hidden 256
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from quell.models.d3net_aec import D3NetAEC, D3NetAECConfig
from quell.models.dtln import DTLN, DTLNConfig


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


def widen_dtln_state_dict(old: dict[str, torch.Tensor], old_config: DTLNConfig, new_config: DTLNConfig,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights of a `new_config` DTLN (more LSTM units) that computes what `old` computes."""
    changed = [name for name in DTLNConfig.__dataclass_fields__
               if name not in ("hidden", "dropout") and getattr(old_config, name) != getattr(new_config, name)]
    if changed:
        raise ValueError(f"widening a DTLN changes only hidden, not {', '.join(changed)}")
    if new_config.hidden < old_config.hidden:
        raise ValueError("the new model must be at least as wide as the old one")
    torch.manual_seed(seed)
    new = {k: v.clone() for k, v in DTLN(new_config).state_dict().items()}
    narrow, wide = old_config.hidden, new_config.hidden
    # the old units of each of the four gates (PyTorch's order i, f, g, o), at their places in the wide layout
    gates = torch.cat([torch.arange(narrow) + gate * wide for gate in range(4)])
    units = torch.arange(narrow)
    for stack, first_inputs in (("lstm1", old_config.bins), ("lstm2", old_config.encoder)):
        for layer in range(old_config.layers):
            prefix = f"{stack}.layers.{layer}"
            inputs = torch.arange(first_inputs) if layer == 0 else units
            for weight, columns in ((f"{prefix}.weight_ih_l0", inputs), (f"{prefix}.weight_hh_l0", units)):
                new[weight][gates] = 0.0
                new[weight][gates[:, None], columns[None, :]] = old[weight]
            for bias in (f"{prefix}.bias_ih_l0", f"{prefix}.bias_hh_l0"):
                new[bias][gates] = old[bias]
    for mask in ("mask1", "mask2"):
        new[f"{mask}.weight"].zero_()
        new[f"{mask}.weight"][:, units] = old[f"{mask}.weight"]
    for key, value in old.items():  # everything without LSTM units: norms, encoder, decoder, mask biases
        if not key.startswith(("lstm1.", "lstm2.", "mask1.weight", "mask2.weight")):
            new[key] = value.clone()
    return new


# per model of a recipe: its config class, the sizes that widen, and the function that widens its weights
WIDENS = {
    "d3net_aec": (D3NetAECConfig, ("channels", "growth"), widen_state_dict),
    "dtln": (DTLNConfig, ("hidden",), widen_dtln_state_dict),
}


def widen_checkpoint(source: Path, destination: Path, sizes: dict[str, int], seed: int = 0) -> None:
    """A training checkpoint of a wider model from `source` (its recipe's sizes changed), as `--init` takes it.

    `sizes` holds the model's widening sizes (`WIDENS`): channels and growth for a D3NetAEC, hidden for a DTLN.
    """
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    recipe = copy.deepcopy(checkpoint["recipe"])
    if recipe["model"] not in WIDENS:
        raise ValueError(f"widening knows {', '.join(WIDENS)}, not {recipe['model']!r}")
    config_class, names, widen = WIDENS[recipe["model"]]
    if sorted(sizes) != sorted(names):
        raise ValueError(f"a {recipe['model']} widens by {', '.join('--' + n for n in names)}, "
                         f"given {', '.join('--' + n for n in sizes) or 'none'}")
    old_config = config_class(**recipe["model_args"])
    recipe["model_args"].update(sizes)
    new_config = config_class(**recipe["model_args"])
    model = widen(checkpoint["model"], old_config, new_config, seed)
    state = {"step": checkpoint["state"]["step"], "epoch": 0, "best": None,
             "init": checkpoint["state"].get("init"),
             "widened_from": {"checkpoint": str(source), **{n: getattr(old_config, n) for n in names}}}
    destination.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "recipe": recipe, "state": state}, destination)


def main() -> None:
    """Command line: widen a D3NetAEC or DTLN checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--channels", type=int, help="D3NetAEC: complex channels of the trunk")
    parser.add_argument("--growth", type=int, help="D3NetAEC: growth of the D3 blocks")
    parser.add_argument("--hidden", type=int, help="DTLN: units of every LSTM")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists")
    sizes = {name: getattr(args, name) for name in ("channels", "growth", "hidden") if getattr(args, name) is not None}
    try:
        widen_checkpoint(args.checkpoint, args.out, sizes, args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
