"""PyTorch model -> ONNX step graph + sequence graph + model card.

    quell export CHECKPOINT -o quell/assets/dtln.onnx

writes `dtln.onnx` (one hop in, one hop out, every state explicit), `dtln.seq.onnx` (any number of hops per
call, same states) and `dtln.json` (the card). The parity of both graphs with PyTorch is checked before the
files are kept. With `--int8` both graphs get int8 weights (quell/export/int8.py) once the float32 ones
passed, and are checked again against PyTorch by SNR (see INT8_MIN_SNR_DB).
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

from quell.dns.metrics import snr
from quell.export.int8 import quantize_graph
from quell.export.simplify import simplify_step_graph
from quell.streaming.card import ModelCard, StateSpec

OPSET = 18
# int8 graphs are checked by the SNR of their output against PyTorch's (and of step against sequence, whose
# LSTM activation scales differ: one per hop against one per block of hops). 8-bit rounding of one product
# is ~45-50 dB down; through the nine of a DTLN, measured on the parity signal: 39.7 dB for a trained DTLN,
# 35-36 dB for the tiny random ones of the tests (step against sequence 46-48 dB). With one activation scale
# per tensor for the MatMuls (plain dynamic quantization): 32 dB and 22 dB.
INT8_MIN_SNR_DB = 30.0


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
    description: str = "", check: bool = True, int8: bool = False,
) -> ModelCard:
    """Write the step graph `out`, the sequence graph next to it (`.seq.onnx`) and the card (`.json`).

    `int8`: quantize the weights of both graphs (after the float32 parity check); the card says so, and its
    description gives the SNR against the float32 model on the parity signal.
    """
    out = Path(out)
    name = name or out.stem
    model = model.eval()
    if hasattr(model, "export_dft"):
        model.dft = model.export_dft  # fixed-basis products (sliding where it can): cheaper per hop than FFT nodes
    cfg = model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    sequence = out.with_suffix(".seq.onnx") if model.has_sequence else None
    card = ModelCard(
        name=name, task=model.task, sample_rate=cfg.sample_rate, hop=cfg.hop, window=cfg.window,
        delay=cfg.window - cfg.hop, step_graph=out.name, sequence_graph=sequence.name if sequence else None,
        audio_input="audio", audio_output="enhanced",
        reference_input="reference" if "reference" in model.stream_inputs else None,
        reference_lead=getattr(model, "reference_lead", 0),
        realign_states=list(getattr(model, "realign_states", ())),
        states=[StateSpec(n, f"{n}_out", list(s)) for n, s in model.state_shapes().items()],
        parameters=sum(p.numel() for p in model.parameters()), description=description,
        training=training or {},
    )
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        graphs = {out: Path(tmp) / out.name}
        export_graph(model, graphs[out], single_hop=True)
        simplify_step_graph(graphs[out])
        if sequence is not None:
            graphs[sequence] = Path(tmp) / sequence.name
            export_graph(model, graphs[sequence], single_hop=False)
        card_tmp = Path(tmp) / "card.json"
        card.save(card_tmp)
        if check:
            check_parity(model, card_tmp)
        if int8:
            for written in graphs.values():
                quantize_graph(written, written)
            card.precision = "int8"
            card.description = (f"{card.description}; " if card.description else "") + (
                "int8 weights (MatMul 8-bit blocks of 32, LSTM per tensor)")
            if check:
                errors = parity_errors(model, card_tmp)
                _judge_parity(errors, tolerance=0.0, min_snr_db=INT8_MIN_SNR_DB)
                card.description += (f": {errors['snr_db']:.1f} dB SNR against float32, max abs error "
                                     f"{errors['max_abs']:.1e} on the parity signal")
        for final, written in graphs.items():
            os.replace(written, final)
    card.save(out.with_suffix(".json"))
    return card


def parity_errors(model: nn.Module, card_path: Path, seconds: float = 2.0) -> dict[str, float]:
    """How far the ONNX graphs, run by the engine, are from PyTorch's offline output on a test signal.

    Returns `max_abs` (the largest sample difference, step or sequence graph), `snr_db` (the lower SNR of the
    two graphs' outputs against PyTorch's) and `step_vs_sequence_snr_db` (inf without a sequence graph).
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
    reference = offline[:-delay]
    return {
        "max_abs": max(float(np.abs(out[delay:] - reference).max()) for out in outputs),
        "snr_db": min(float(snr(out[delay:], reference)) for out in outputs),
        "step_vs_sequence_snr_db": float(snr(outputs[-1], outputs[0])) if len(outputs) > 1 else float("inf"),
    }


def check_parity(
    model: nn.Module, card_path: Path, seconds: float = 2.0, tolerance: float = 1e-4, min_snr_db: float | None = None
) -> float:
    """Max abs difference between PyTorch offline output and the ONNX graphs run by the engine.

    Raises AssertionError above `tolerance` or, when `min_snr_db` is given (int8 graphs, whose error is
    quantization noise and scales with the signal), when an SNR of `parity_errors` is below it.
    """
    errors = parity_errors(model, card_path, seconds)
    _judge_parity(errors, tolerance, min_snr_db)
    return errors["max_abs"]


def _judge_parity(errors: dict[str, float], tolerance: float, min_snr_db: float | None) -> None:
    """Raise AssertionError when `parity_errors` are out of bounds (see `check_parity`)."""
    if min_snr_db is None and errors["max_abs"] > tolerance:
        raise AssertionError(f"ONNX differs from PyTorch by {errors['max_abs']:.2e} (tolerance {tolerance:.0e})")
    if min_snr_db is not None and min(errors["snr_db"], errors["step_vs_sequence_snr_db"]) < min_snr_db:
        raise AssertionError(
            f"ONNX differs from PyTorch: SNR {errors['snr_db']:.1f} dB, step against sequence graph "
            f"{errors['step_vs_sequence_snr_db']:.1f} dB (at least {min_snr_db:.0f} dB wanted)")


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, name: str | None = None, int8: bool = False
) -> ModelCard:
    """Export a training checkpoint (`int8`: with int8 weights); the card records the recipe and training."""
    model, saved = load_checkpoint(checkpoint)
    recipe = saved["recipe"]
    training = {
        "recipe": recipe,
        "steps": saved["state"]["step"],
        "epochs": saved["state"]["epoch"],
        "best_validation": saved["state"]["best"],
        "data": {key: recipe.get("data", {}).get(key) for key in ("speech", "noise", "music", "rir")},
    }
    if saved["state"].get("init"):  # a fine-tuning run: the run its weights started from
        training["initialised_from"] = saved["state"]["init"]
    return export_model(model, out, name=name, training=training,
                        description=f"{recipe['model'].upper()} trained with quell ({Path(checkpoint).name})",
                        int8=int8)
