"""Widen a trained model without changing what it computes (Net2Net, Chen et al. 2016).

- `D3NetAEC`: more complex channels in the trunk (`--channels`), a larger growth in the D3 blocks (`--growth`).
  Every convolution keeps the trained weights between the old channels, the new channels get fresh random
  weights from every input, and the weights from new channels into old ones start at zero: the new channels are
  computed but unheard, and training finds what they are good for (the zero weights get gradients at once).
- `DTLN`: more LSTM units in both stages (`--hidden`), by Net2WiderNet's split: each new unit is a copy of an
  old one, heard at a share of the old unit's weight, with a little noise (`--noise`) against symmetry. New
  units that start unheard (the first way) learn too slowly at a fine-tuning learning rate: their outgoing
  weights were ~30x smaller than the old units' after 600 steps at 1.25e-4 (recipes/dtln/README.md).

Either way the widened model gives the narrow one's output (DTLN: to within the noise).

    python -m quell.models.widen runs/aec_stage3/best.pt -o runs/aec_wide/init.pt --channels 24 --growth 12
    python -m quell.models.widen runs/dtln.pt -o runs/dtln_wide/init.pt --hidden 256
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from quell.models.d3net_aec import D3NetAEC, D3NetAECConfig
from quell.models.dtln import DTLNConfig


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
                          seed: int = 0, noise: float = 0.01) -> dict[str, torch.Tensor]:
    """The weights of a `new_config` DTLN (more LSTM units) that computes what `old` computes.

    Net2WiderNet's split: each new unit of an LSTM is a copy of an old one (the same weights in every gate),
    and whatever hears the old unit hears each copy at an equal share of its weight, so a unit and its copies
    together say what the unit said alone. `noise` (relative to each weight row's RMS) is added to the copies'
    weights to break their symmetry with the originals: the output moves by about that much (0: not at all).
    """
    changed = [name for name in DTLNConfig.__dataclass_fields__
               if name not in ("hidden", "dropout") and getattr(old_config, name) != getattr(new_config, name)]
    if changed:
        raise ValueError(f"widening a DTLN changes only hidden, not {', '.join(changed)}")
    if new_config.hidden < old_config.hidden:
        raise ValueError("the new model must be at least as wide as the old one")
    generator = torch.Generator().manual_seed(seed)
    narrow, wide = old_config.hidden, new_config.hidden
    source = torch.arange(wide) % narrow  # the old unit each new unit copies (the first `narrow` are themselves)
    share = 1.0 / torch.bincount(source)[source]  # each copy's share of what its unit said
    # the rows of the four gates (PyTorch's order i, f, g, o) of every new unit, as rows of the old weights
    rows = torch.cat([source + gate * narrow for gate in range(4)])
    copies = torch.cat([torch.arange(narrow, wide) + gate * wide for gate in range(4)])

    def copied(weight: torch.Tensor, hears_units: bool) -> torch.Tensor:
        new = weight[rows][:, source] * share if hears_units else weight[rows]  # indexing copies
        if noise and new.dim() == 2:
            scale = new[copies].pow(2).mean(1, keepdim=True).sqrt()
            new[copies] += noise * scale * torch.randn(new[copies].shape, generator=generator)
        return new

    new = {key: value.clone() for key, value in old.items()}
    for stack in ("lstm1", "lstm2"):
        for layer in range(old_config.layers):
            prefix = f"{stack}.layers.{layer}"
            new[f"{prefix}.weight_ih_l0"] = copied(old[f"{prefix}.weight_ih_l0"], hears_units=layer > 0)
            new[f"{prefix}.weight_hh_l0"] = copied(old[f"{prefix}.weight_hh_l0"], hears_units=True)
            for bias in (f"{prefix}.bias_ih_l0", f"{prefix}.bias_hh_l0"):
                new[bias] = copied(old[bias], hears_units=False)
    for mask in ("mask1", "mask2"):
        new[f"{mask}.weight"] = old[f"{mask}.weight"][:, source] * share
    return new


# per model of a recipe: its config class, the sizes that widen, the function that widens its weights, and
# that function's options
WIDENS = {
    "d3net_aec": (D3NetAECConfig, ("channels", "growth"), widen_state_dict, ()),
    "dtln": (DTLNConfig, ("hidden",), widen_dtln_state_dict, ("noise",)),
}


def widen_checkpoint(source: Path, destination: Path, sizes: dict[str, int], seed: int = 0,
                     options: dict[str, float] | None = None) -> None:
    """A training checkpoint of a wider model from `source` (its recipe's sizes changed), as `--init` takes it.

    `sizes` holds the model's widening sizes (`WIDENS`): channels and growth for a D3NetAEC, hidden for a DTLN;
    `options` what else its widening takes (a DTLN's noise).
    """
    options = options or {}
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    recipe = copy.deepcopy(checkpoint["recipe"])
    if recipe["model"] not in WIDENS:
        raise ValueError(f"widening knows {', '.join(WIDENS)}, not {recipe['model']!r}")
    config_class, names, widen, option_names = WIDENS[recipe["model"]]
    if sorted(sizes) != sorted(names):
        raise ValueError(f"a {recipe['model']} widens by {', '.join('--' + n for n in names)}, "
                         f"given {', '.join('--' + n for n in sizes) or 'none'}")
    if set(options) - set(option_names):
        unknown = ", ".join("--" + name for name in sorted(set(options) - set(option_names)))
        raise ValueError(f"a {recipe['model']}'s widening takes no {unknown}")
    old_config = config_class(**recipe["model_args"])
    recipe["model_args"].update(sizes)
    new_config = config_class(**recipe["model_args"])
    model = widen(checkpoint["model"], old_config, new_config, seed, **options)
    state = {"step": checkpoint["state"]["step"], "epoch": 0, "best": None,
             "init": checkpoint["state"].get("init"),
             "widened_from": {"checkpoint": str(source), **{n: getattr(old_config, n) for n in names}, **options}}
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
    parser.add_argument("--noise", type=float, help="DTLN: noise on the copied units' weights, relative "
                        "(default 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists")
    sizes = {name: getattr(args, name) for name in ("channels", "growth", "hidden") if getattr(args, name) is not None}
    try:
        options = {} if args.noise is None else {"noise": args.noise}
        widen_checkpoint(args.checkpoint, args.out, sizes, args.seed, options)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
