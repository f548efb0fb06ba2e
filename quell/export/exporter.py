"""PyTorch model -> ONNX step graph + sequence graph + model card.

    quell export CHECKPOINT -o quell/assets/dtln.onnx

writes `dtln.onnx` (one hop in, one hop out, every state explicit), `dtln.seq.onnx` (any number of hops per
call, same states) and `dtln.json` (the card). The parity of both graphs with PyTorch is checked before the
files are kept.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quell.streaming.card import ModelCard, StateSpec

OPSET = 18


class _StreamGraph(nn.Module):
    """The model's `stream` with its signal inputs and states as separate positional inputs, as ONNX wants.

    A streaming model names its signal inputs in `stream_inputs` ("audio", and "reference" for an echo
    canceller) and says whether it has a sequence form (`stream(..., single_hop=False)`) in `has_sequence`.
    """

    def __init__(self, model: nn.Module, single_hop: bool):
        super().__init__()
        self.model, self.single_hop = model, single_hop
        self.n_inputs = len(model.stream_inputs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, states = tensors[: self.n_inputs], list(tensors[self.n_inputs :])
        if self.model.has_sequence:
            return self.model.stream(*inputs, states, single_hop=self.single_hop)
        return self.model.stream(*inputs, states)


def export_graph(model: nn.Module, path: Path, single_hop: bool) -> None:
    """Export the step (single_hop) or sequence graph of a streaming model to `path`.

    This uses the TorchScript exporter: the torch.export-based one unrolls nn.LSTM over time and so cannot
    give a sequence graph of any length, while the TorchScript one maps it to one ONNX LSTM node. The graphs
    hold no FFT (the DFT is a MatMul), which is the one thing the TorchScript exporter refuses.
    """
    cfg = model.config
    names = list(model.state_shapes())
    hops = 1 if single_hop else 4
    signals = tuple(torch.zeros(1, hops * cfg.hop) for _ in model.stream_inputs)
    dynamic = None if single_hop else {name: {1: "samples"} for name in (*model.stream_inputs, "enhanced")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _StreamGraph(model, single_hop).eval(), (*signals, *model.initial_states()), str(path), dynamo=False,
            opset_version=OPSET, input_names=[*model.stream_inputs, *names],
            output_names=["enhanced", *[f"{n}_out" for n in names]], dynamic_axes=dynamic,
        )


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a training checkpoint (weights loaded, eval mode) and the checkpoint dict."""
    from quell.models.train import build_model

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(checkpoint["recipe"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def export_model(
    model: nn.Module, out: str | Path, name: str | None = None, training: dict[str, Any] | None = None,
    description: str = "", check: bool = True,
) -> ModelCard:
    """Write the step graph `out`, the sequence graph next to it (`.seq.onnx`) and the card (`.json`)."""
    out = Path(out)
    name = name or out.stem
    model = model.eval()
    if hasattr(model, "dft"):
        model.dft = "matmul"  # a fixed-basis MatMul is cheaper per hop than an FFT node
    cfg = model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    sequence = out.with_suffix(".seq.onnx") if model.has_sequence else None
    card = ModelCard(
        name=name, task=model.task, sample_rate=cfg.sample_rate, hop=cfg.hop, window=cfg.window,
        delay=cfg.window - cfg.hop, step_graph=out.name, sequence_graph=sequence.name if sequence else None,
        audio_input="audio", audio_output="enhanced",
        reference_input="reference" if "reference" in model.stream_inputs else None,
        reference_lead=getattr(model, "reference_lead", 0),
        states=[StateSpec(n, f"{n}_out", list(s)) for n, s in model.state_shapes().items()],
        parameters=sum(p.numel() for p in model.parameters()), description=description,
        training=training or {},
    )
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        graphs = {out: Path(tmp) / out.name}
        export_graph(model, graphs[out], single_hop=True)
        if sequence is not None:
            graphs[sequence] = Path(tmp) / sequence.name
            export_graph(model, graphs[sequence], single_hop=False)
        card_tmp = Path(tmp) / "card.json"
        card.save(card_tmp)
        if check:
            check_parity(model, card_tmp)
        for final, written in graphs.items():
            os.replace(written, final)
    card.save(out.with_suffix(".json"))
    return card


def check_parity(model: nn.Module, card_path: Path, seconds: float = 2.0, tolerance: float = 1e-4) -> float:
    """Max abs difference between PyTorch offline output and the ONNX graphs run by the engine.

    Raises AssertionError above `tolerance`.
    """
    from quell.streaming.engine import StreamingModel

    cfg = model.config
    n_hops = int(seconds * cfg.sample_rate) // cfg.hop
    rng = np.random.default_rng(0)
    t = np.arange(n_hops * cfg.hop) / cfg.sample_rate
    voiced = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    signals = [(voiced + 0.05 * rng.standard_normal(t.size)).astype(np.float32)]
    if len(model.stream_inputs) > 1:  # a far end whose echo is in the mic
        far = (0.2 * rng.standard_normal(t.size)).astype(np.float32)
        signals = [signals[0] + 0.5 * np.concatenate([np.zeros(200, np.float32), far[:-200]]), far]
    with torch.no_grad():
        offline = model(*(torch.from_numpy(s)[None] for s in signals))
    offline = (offline[0] if isinstance(offline, tuple) else offline)[0].numpy()
    delay = cfg.window - cfg.hop  # the stream's first `delay` samples come from before the signal
    engine = StreamingModel(card_path)
    hops = range(0, t.size, cfg.hop)
    outputs = [np.concatenate([engine.step(*(s[i : i + cfg.hop] for s in signals)).copy() for i in hops])]
    if engine.card.sequence_graph:
        engine.reset()
        outputs.append(engine.process(*signals))
    worst = max(np.abs(out[delay:] - offline[:-delay]).max() for out in outputs)
    if worst > tolerance:
        raise AssertionError(f"ONNX differs from PyTorch by {worst:.2e} (tolerance {tolerance:.0e})")
    return float(worst)


def export_checkpoint(checkpoint: str | Path, out: str | Path, name: str | None = None) -> ModelCard:
    """Export a training checkpoint; the card records the recipe and how far training went."""
    model, saved = load_checkpoint(checkpoint)
    recipe = saved["recipe"]
    training = {
        "recipe": recipe,
        "steps": saved["state"]["step"],
        "epochs": saved["state"]["epoch"],
        "best_validation": saved["state"]["best"],
        "data": {key: recipe.get("data", {}).get(key) for key in ("speech", "noise", "music", "rir")},
    }
    return export_model(model, out, name=name, training=training,
                        description=f"{recipe['model'].upper()} trained with quell ({Path(checkpoint).name})")
