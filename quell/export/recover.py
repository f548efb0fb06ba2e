"""Training checkpoints from shipped float32 graphs: to fine-tune a shipped model when its run folder is gone.

Every weight of a quell model is an initializer of its exported graph, in a layout the exporter chose:

- DTLN (read from the sequence graph): the LSTMs as ONNX LSTM weights, gates in i, o, f, c order (PyTorch's
  are i, f, g, o), input and recurrent biases concatenated; the linear layers as MatMuls by their transposed
  weights, named after the module; the encoder as the one MatMul left of its shape (a band-gain model has
  one more constant MatMul, the band spread, which its config rebuilds).
- D3Net AEC (read from the step graph): every pseudo-complex convolution is one Conv node whose weight is the
  block matrix [[W_r, -W_i], [W_i, W_r]]; the nodes come in the order of the modules (the order the model
  runs them), each with its bias; a double-talk detector as one ONNX GRU (gates z, r, h) and a MatMul.

`recover_checkpoint` refuses weights whose re-export does not reproduce the shipped graph's output (max abs
difference on a test signal <= 1e-5), so a wrong mapping cannot pass silently. The card next to the graph gives
the recipe (model sizes) and the training the weights had (steps, and the run they started from), so a run
started from the checkpoint records the whole history in its own card.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from quell.export.exporter import export_model
from quell.models.layers import ComplexConv2d
from quell.models.train import build_model
from quell.streaming.engine import StreamingModel

ONNX_TO_TORCH_GATES = [0, 2, 3, 1]  # ONNX blocks (i, o, f, c) in PyTorch's order (i, f, g, o)
GRU_ONNX_TO_TORCH_GATES = [1, 0, 2]  # ONNX blocks (z, r, h) in PyTorch's order (r, z, n)
TOLERANCE = 1e-5


def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant by name, also under the names of the Identity nodes that share one (equal initializers,
    such as zero biases, are stored once by the exporter)."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _gates(weight: np.ndarray, order: list[int] = ONNX_TO_TORCH_GATES) -> torch.Tensor:
    """An ONNX recurrent weight's gate blocks (first axis) in PyTorch's order."""
    blocks = np.split(weight, len(order), axis=0)
    return torch.from_numpy(np.concatenate([blocks[i] for i in order], axis=0).copy())


def dtln_state_dict(graph_path: str | Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The DTLN state dict held by a float32 sequence graph exported by quell."""
    graph = onnx.load(str(graph_path)).graph
    values = _initializers(graph)
    state = {k: torch.from_numpy(values[f"model.{k}"].copy())
             for k in ("stft_norm.weight", "stft_norm.bias", "encoder_norm.weight", "encoder_norm.bias",
                       "mask1.bias", "mask2.bias")}
    lstms = [node for node in graph.node if node.op_type == "LSTM"]
    names = [f"lstm{stage}.layers.{layer}" for stage in (1, 2) for layer in range(model.config.layers)]
    for name, node in zip(names, lstms, strict=True):
        w, r, b = (values[node.input[i]][0] for i in (1, 2, 3))
        hidden = r.shape[1]
        state[f"{name}.weight_ih_l0"] = _gates(w)
        state[f"{name}.weight_hh_l0"] = _gates(r)
        state[f"{name}.bias_ih_l0"] = _gates(b[: 4 * hidden])
        state[f"{name}.bias_hh_l0"] = _gates(b[4 * hidden :])

    # the linear layers are MatMuls by their transposed weights, named after the module; the encoder is the
    # one left of its shape, a product with the inverse DFT matrix ((inverse @ encoder.T) is computed in the
    # graph); a band-gain model has one more constant product, the band spread
    weights = {node.output[0].split("/")[1]: values[node.input[1]].T.copy()
               for node in graph.node if node.op_type == "MatMul" and node.input[1] in values}
    for name in ("mask1", "mask2", "decoder"):
        state[f"{name}.weight"] = torch.from_numpy(weights.pop(name))
    cfg = model.config
    (encoder,) = (w for w in weights.values() if w.shape == (cfg.encoder, cfg.window))
    state["encoder.weight"] = torch.from_numpy(encoder)
    return state


def d3net_aec_state_dict(graph_path: str | Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The D3Net AEC state dict held by a float32 step graph exported by quell."""
    graph = onnx.load(str(graph_path)).graph
    values = _initializers(graph)
    nodes = [node for node in graph.node if node.op_type == "Conv"]
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, ComplexConv2d)]
    if len(nodes) != len(convs):
        raise ValueError(f"{graph_path}: {len(nodes)} convolutions, the recipe's model has {len(convs)}")
    state: dict[str, torch.Tensor] = {}
    for node, (name, conv) in zip(nodes, convs, strict=True):
        block = values[node.input[1]]
        if conv.input_order is not None:  # the graph's input channels in the order the layer takes them
            block = block[:, np.argsort(conv.input_order.numpy())]
        out_channels, in_channels = conv.weight_real.shape[:2]
        if block.shape != (2 * out_channels, 2 * in_channels, *conv.weight_real.shape[2:]):
            raise ValueError(f"{graph_path}: node {node.name} has a {block.shape} weight, {name} another shape")
        real, imag = block[:out_channels, :in_channels], block[out_channels:, :in_channels]
        if not (np.array_equal(block[:out_channels, in_channels:], -imag)
                and np.array_equal(block[out_channels:, in_channels:], real)):
            raise ValueError(f"{graph_path}: node {node.name}'s weight is not a complex block matrix")
        state[f"{name}.weight_real"] = torch.from_numpy(real.copy())
        state[f"{name}.weight_imag"] = torch.from_numpy(imag.copy())
        if conv.bias is not None:
            state[f"{name}.bias"] = torch.from_numpy(values[node.input[2]].copy())
    if getattr(model, "presence", None) is not None:
        state.update(_detector_state_dict(graph, values))
    return state


def _detector_state_dict(graph: onnx.GraphProto, values: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The double-talk detector's weights: its standardization as named initializers, the GRU as an ONNX GRU
    (gates z, r, h; PyTorch's are r, z, n), and the output layer as a MatMul by its transposed weight."""
    (gru,) = [node for node in graph.node if node.op_type == "GRU"]
    w, r, b = (values[gru.input[i]][0] for i in (1, 2, 3))
    hidden = r.shape[1]

    def gates(weight: np.ndarray) -> torch.Tensor:
        return _gates(weight, GRU_ONNX_TO_TORCH_GATES)

    (out,) = [node for node in graph.node if node.op_type == "MatMul" and node.input[0].startswith("/gru/")]
    state = {f"presence.{name}": torch.from_numpy(values[f"model.presence.{name}"].copy())
             for name in ("mean", "std", "out.bias")}
    state.update({"presence.gru.weight_ih_l0": gates(w), "presence.gru.weight_hh_l0": gates(r),
                  "presence.gru.bias_ih_l0": gates(b[: 3 * hidden]), "presence.gru.bias_hh_l0": gates(b[3 * hidden :]),
                  "presence.out.weight": torch.from_numpy(values[out.input[1]].T.copy())})
    return state


STATE_DICTS = {"dtln": (dtln_state_dict, "sequence_graph"), "d3net_aec": (d3net_aec_state_dict, "step_graph")}


def recover_checkpoint(card_path: str | Path, out: str | Path) -> float:
    """Write a training checkpoint `out` with the weights of the float32 model of `card_path`.

    Returns the max abs difference between the shipped graph's output and that of the recovered weights
    exported again (at most 1e-5, else ValueError and nothing is written).
    """
    card_path, out = Path(card_path), Path(out)
    card = json.loads(card_path.read_text())
    training: dict[str, Any] = card.get("training") or {}
    if "recipe" not in training:
        raise ValueError(f"{card_path}: the card records no training recipe (not a model trained by quell)")
    if card.get("precision", "float32") != "float32":
        raise ValueError(f"{card_path}: {card['precision']} weights; recover from the float32 model they came from")
    kind = training["recipe"]["model"]
    if kind not in STATE_DICTS:
        raise ValueError(f"{card_path}: no recovery for model {kind!r} (known: {', '.join(STATE_DICTS)})")
    state_dict, graph_key = STATE_DICTS[kind]
    model = build_model(training["recipe"])
    try:
        model.load_state_dict(state_dict(card_path.with_name(card[graph_key]), model))
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{card_path}: the graph does not fit the recipe's model ({error})") from error
    model.eval()

    # the proof: the recovered model, exported again, gives the shipped graph's output
    rng = np.random.default_rng(0)
    hops = 100
    signal = (0.1 * rng.standard_normal(hops * card["hop"])).astype(np.float32)
    reference = None
    if card.get("reference_input"):  # its echo in the mic, so that an adaptive filter has something to follow
        reference = (0.1 * rng.standard_normal(signal.size)).astype(np.float32)
        signal = 0.2 * signal + np.concatenate([np.zeros(40, np.float32), reference[:-40]])
    shipped = StreamingModel(card_path).process(signal, reference)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, Path(tmp) / "recovered.onnx")
        recovered = StreamingModel(Path(tmp) / "recovered.json").process(signal, reference)
    error = float(np.abs(shipped - recovered).max())
    if not error <= TOLERANCE:
        raise ValueError(f"the recovered weights do not reproduce {card_path} (max abs difference {error:.2e})")
    state = {"step": training.get("steps", 0), "epoch": training.get("epochs", 0),
             "best": training.get("best_validation", float("-inf")), "init": training.get("initialised_from"),
             "recovered_from": str(card_path)}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "recipe": training["recipe"], "state": state}, out)
    return error
