"""A model that only delays its input: lets tests check the engine's timing exactly (no PyTorch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quell.streaming.card import ModelCard, StateSpec


def write_delay_model(folder: Path, delay: int = 384, hop: int = 128, rate: int = 16000) -> Path:
    """Step graph `(audio[1, hop], buffer[1, delay]) -> (audio delayed by `delay`, buffer)`; returns the card."""
    def ints(name: str, values: list[int]):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes = [
        helper.make_node("Concat", ["buffer", "audio"], ["joined"], axis=1),
        helper.make_node("Slice", ["joined", "zero", "hop", "one"], ["delayed"]),
        helper.make_node("Slice", ["joined", "hop", "end", "one"], ["buffer_out"]),
    ]
    graph = helper.make_graph(
        nodes, "delay",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, hop]),
         helper.make_tensor_value_info("buffer", TensorProto.FLOAT, [1, delay])],
        [helper.make_tensor_value_info("delayed", TensorProto.FLOAT, [1, hop]),
         helper.make_tensor_value_info("buffer_out", TensorProto.FLOAT, [1, delay])],
        [ints("zero", [0]), ints("hop", [hop]), ints("end", [hop + delay]), ints("one", [1])],
    )
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "delay.onnx")
    card = ModelCard(
        name="delay", task="denoise", sample_rate=rate, hop=hop, window=hop + delay, delay=delay,
        step_graph="delay.onnx", audio_input="audio", audio_output="delayed",
        states=[StateSpec("buffer", "buffer_out", [1, delay])],
    )
    card.save(folder / "delay.json")
    return folder / "delay.json"


def write_subtractor_model(folder: Path, hop: int = 160, rate: int = 16000) -> Path:
    """An ideal canceller for an echo that is an exact copy of the aligned reference: mic - reference."""
    graph = helper.make_graph(
        [helper.make_node("Sub", ["audio", "reference"], ["enhanced"])], "subtract",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, hop]),
         helper.make_tensor_value_info("reference", TensorProto.FLOAT, [1, hop])],
        [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, [1, hop])],
    )
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "subtract.onnx")
    card = ModelCard(
        name="subtract", task="echo", sample_rate=rate, hop=hop, window=hop, delay=0, step_graph="subtract.onnx",
        audio_input="audio", audio_output="enhanced", reference_input="reference", states=[],
    )
    card.save(folder / "subtract.json")
    return folder / "subtract.json"
