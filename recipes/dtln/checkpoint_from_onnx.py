"""A training checkpoint from a shipped float32 DTLN sequence graph, to fine-tune it when its run is gone.

    python recipes/dtln/checkpoint_from_onnx.py quell/assets/dtln.seq.onnx -o runs/dtln_shipped/best.pt
    quell train recipes/dtln/voices.yaml --init runs/dtln_shipped/best.pt --out runs/dtln_voices

Every weight of the model is an initializer of the sequence graph: the LSTMs as ONNX LSTM weights (gates in
i, o, f, c order; PyTorch's are i, f, g, o), the linear layers transposed. The script refuses a graph whose
re-export does not reproduce it (max abs difference of the outputs on a test signal <= 1e-5), so a wrong
mapping cannot pass silently. The model card next to the graph gives the recipe (its model sizes) and the
training the weights had (steps, and the run they started from), so a run started from the checkpoint records
the whole history in its own card.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from quell.export.exporter import export_model
from quell.models.train import build_model
from quell.streaming.engine import StreamingModel

ONNX_TO_TORCH_GATES = [0, 2, 3, 1]  # ONNX blocks (i, o, f, c) in PyTorch's order (i, f, g, o)


def _gates(weight: np.ndarray) -> torch.Tensor:
    blocks = np.split(weight, 4, axis=0)
    return torch.from_numpy(np.concatenate([blocks[i] for i in ONNX_TO_TORCH_GATES], axis=0).copy())


def state_dict_from_graph(graph_path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The DTLN state dict held by a float32 sequence graph exported by quell."""
    graph = onnx.load(str(graph_path)).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
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
    # one left, a product with the inverse DFT matrix ((inverse @ encoder.T) is computed in the graph)
    weights = {node.output[0].split("/")[1]: values[node.input[1]].T.copy()
               for node in graph.node if node.op_type == "MatMul" and node.input[1] in values}
    for name in ("mask1", "mask2", "decoder"):
        state[f"{name}.weight"] = torch.from_numpy(weights.pop(name))
    (encoder,) = weights.values()
    state["encoder.weight"] = torch.from_numpy(encoder)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path, help="a float32 DTLN sequence graph (*.seq.onnx), its card beside it")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    card_path = args.graph.with_name(args.graph.name.replace(".seq.onnx", ".json"))
    training = json.loads(card_path.read_text())["training"]
    model = build_model(training["recipe"])
    model.load_state_dict(state_dict_from_graph(args.graph, model))
    model.eval()

    # the proof: the recovered model, exported again, gives the shipped graph's output
    rng = np.random.default_rng(0)
    signal = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    shipped = StreamingModel(card_path).process(signal)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, Path(tmp) / "recovered.onnx")
        recovered = StreamingModel(Path(tmp) / "recovered.json").process(signal)
    error = float(np.abs(shipped - recovered).max())
    if error > 1e-5:
        raise SystemExit(f"error: the recovered weights do not reproduce {args.graph} (max abs {error:.2e})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": training["steps"], "epoch": training["epochs"], "best": training["best_validation"],
             "init": training.get("initialised_from"), "recovered_from": str(args.graph)}
    torch.save({"model": model.state_dict(), "recipe": training["recipe"], "state": state}, args.out)
    print(f"{args.out}: weights of {args.graph} (re-export max abs difference {error:.1e})")


if __name__ == "__main__":
    main()
