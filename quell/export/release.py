"""A DTLN in the layout of the DTLN authors' own ONNX release (breizhn/DTLN, `pretrained_model/model_*.onnx`).

    quell export CHECKPOINT --release-layout -o FOLDER

writes `model_1.onnx` (magnitude [1, 1, bins] and states [1, layers, hidden, 2] -> mask [1, 1, bins] and states)
and `model_2.onnx` (a time frame [1, 1, window] and states -> a frame and states). The release's runtime drives
them with two `session.run` calls and a numpy FFT per hop (`quell.streaming.bench.ReleaseRuntime`), so
`quell bench -m dtln --against FOLDER` prices quell's single step graph against that way of running the same
weights, on the same machine in the same minutes: the reference the speed bar was set against.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from quell.export.exporter import OPSET
from quell.models.dtln import DTLN
from quell.streaming.bench import RELEASE_GRAPHS


def _unpack(states: torch.Tensor, layers: int) -> list[torch.Tensor]:
    """[1, layers, hidden, 2] (the release's packing: h then c per layer) -> [h0, c0, h1, c1, ...] of [1, 1, hidden]."""
    return [states[:, layer, :, part].unsqueeze(0) for layer in range(layers) for part in (0, 1)]


def _pack(states: list[torch.Tensor], layers: int) -> torch.Tensor:
    """The inverse of `_unpack`."""
    per_layer = [torch.stack([states[2 * i][0], states[2 * i + 1][0]], dim=-1) for i in range(layers)]
    return torch.stack(per_layer, dim=1)


class _MaskStage(nn.Module):
    """Stage 1 as the release's model_1: the DFT magnitude of a frame in, its gains out."""

    def __init__(self, model: DTLN):
        super().__init__()
        self.model = model

    def forward(self, magnitude: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.model.config.layers
        gains, new = self.model.stage1_gains(magnitude, _unpack(states, layers))
        return gains, _pack(new, layers)


class _FrameStage(nn.Module):
    """Stage 2 as the release's model_2: a time frame in, an enhanced frame out. Its runtime scales the frame by
    hop / window before the overlap-add, which quell's decoder has learnt already: the graph undoes that."""

    def __init__(self, model: DTLN):
        super().__init__()
        self.model = model

    def forward(self, frame: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, cfg = self.model, self.model.config
        masked, new = m.stage2_masked(m.encoder(frame), _unpack(states, cfg.layers))
        decoder = m.decoder.weight * (cfg.window / cfg.hop)  # a constant once exported
        return nn.functional.linear(masked, decoder), _pack(new, cfg.layers)


def export_release_graphs(model: DTLN, folder: str | Path) -> list[Path]:
    """Write `model_1.onnx` and `model_2.onnx` of `model` into `folder`; returns their paths."""
    if not isinstance(model, DTLN):
        raise ValueError(f"the release layout is DTLN's; this checkpoint holds a {type(model).__name__}")
    if model.config.analysis_window != "none":
        raise ValueError("the release's runtime takes the DFT of unwindowed frames; this DTLN windows them")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.eval().config
    states = torch.zeros(1, cfg.layers, cfg.hidden, 2)
    stages = [(_MaskStage(model), torch.zeros(1, 1, cfg.bins), "magnitude", "mask"),
              (_FrameStage(model), torch.zeros(1, 1, cfg.window), "frame", "enhanced_frame")]
    paths = []
    for name, (stage, signal, input_name, output_name) in zip(RELEASE_GRAPHS, stages, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(stage.eval(), (signal, states), str(folder / name), dynamo=False, opset_version=OPSET,
                              input_names=[input_name, "states"], output_names=[output_name, "states_out"])
        paths.append(folder / name)
    return paths
