"""int8 export: graphs that are really quantized, close to float32 (by SNR), step == sequence, and loadable."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import quantize_dynamic

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from quell.cli import main  # noqa: E402
from quell.dns.metrics import snr  # noqa: E402
from quell.export.exporter import INT8_MIN_SNR_DB, check_parity, export_model  # noqa: E402
from quell.export.int8 import fold_constants  # noqa: E402
from quell.models.dtln import DTLN, DTLNConfig  # noqa: E402
from quell.streaming.card import ModelCard  # noqa: E402
from quell.streaming.denoiser import Denoiser  # noqa: E402
from quell.streaming.engine import StreamingModel  # noqa: E402

# What the tests hold an int8 export of the tiny random DTLN to (see INT8_MIN_SNR_DB). Measured on these
# signals: 37.7 dB against float32 (step and sequence), 45-46 dB step against sequence; 35-36 dB on the
# parity signal. With one activation scale per tensor for the MatMuls (plain dynamic quantization): 21-22 dB.
MIN_SNR_DB = INT8_MIN_SNR_DB


def _speech_like(seconds: float, seed: int) -> np.ndarray:
    """Harmonics with a syllable envelope in noise: loud and quiet frames, as a quantizer meets them."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000) // 128 * 128) / 16000  # whole hops
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 10)) * np.clip(np.sin(2 * np.pi * 2.5 * t), 0, 1)
    return (0.2 * voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def int8_export(tiny_dtln, tmp_path_factory):
    """The tiny DTLN of conftest exported with int8 weights, next to its float32 export."""
    model, fp32_card = tiny_dtln
    card = export_model(model, tmp_path_factory.mktemp("int8") / "tiny.onnx", int8=True)
    return model, fp32_card, card.path


def test_the_card_says_int8_and_old_cards_still_load(int8_export, tmp_path):
    _, fp32_card, int8_card = int8_export
    card = ModelCard.load(int8_card)
    assert card.precision == "int8" and "int8" in card.description and "dB SNR" in card.description
    assert ModelCard.load(fp32_card).precision == "float32"
    old = json.loads(fp32_card.read_text())
    del old["precision"]  # a card written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert ModelCard.load(tmp_path / "old.json").precision == "float32"


def test_the_graphs_hold_int8_weights(int8_export):
    _, _, int8_card = int8_export
    card = ModelCard.load(int8_card)
    for which in ("step", "sequence"):
        graph = onnx.load(card.graph_path(which)).graph
        ops = [node.op_type for node in graph.node]
        assert ops.count("DynamicQuantizeLSTM") == 4 and "LSTM" not in ops
        assert ops.count("MatMulNBits") == 5 and "MatMul" not in ops  # DFT, mask1, inverse DFT + encoder, ...
        values = {kind: sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type in types)
                  for kind, types in (("8 bit", (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)),
                                      ("float", (onnx.TensorProto.FLOAT,)))}
        assert values["float"] < values["8 bit"] / 10  # scales (one per 32 weights) and biases


def test_int8_output_is_close_to_float32_and_step_equals_sequence(int8_export):
    _, fp32_card, int8_card = int8_export
    x = _speech_like(3.0, seed=5)
    fp32, int8 = StreamingModel(fp32_card), StreamingModel(int8_card)
    reference = fp32.process(x)
    sequence = int8.process(x)
    int8.reset()
    step = np.concatenate([int8.step(x[i : i + 128]).copy() for i in range(0, x.size, 128)])
    assert snr(sequence, reference) >= MIN_SNR_DB
    assert snr(step, reference) >= MIN_SNR_DB
    assert snr(sequence, step) >= MIN_SNR_DB  # LSTM activation scales per hop, per block
    assert snr(step, reference) < 80  # it is quantized, not a copy of the float32 graph


def test_the_denoiser_runs_the_int8_model(int8_export):
    _, fp32_card, int8_card = int8_export
    x = _speech_like(2.0, seed=6)
    outputs = []
    for card in (fp32_card, int8_card):
        denoiser = Denoiser(card, sample_rate=16000)
        outputs.append(np.concatenate([denoiser.process(x[i : i + 160]) for i in range(0, x.size, 160)]))
    assert np.isfinite(outputs[1]).all()
    assert snr(outputs[1], outputs[0]) >= MIN_SNR_DB


def test_a_broken_quantization_fails_the_parity_check(int8_export, tmp_path):
    model, fp32_card, int8_card = int8_export
    assert check_parity(model, int8_card, min_snr_db=MIN_SNR_DB) < 0.05
    card = ModelCard.load(fp32_card)
    for which in ("step", "sequence"):  # one activation scale per tensor for the MatMuls too: ~22 dB
        folded = tmp_path / f"folded_{which}.onnx"
        fold_constants(card.graph_path(which), folded)
        quantize_dynamic(folded, tmp_path / card.graph_path(which).name, op_types_to_quantize=["MatMul", "LSTM"])
    card.save(tmp_path / "per_tensor.json")
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        check_parity(model, tmp_path / "per_tensor.json", min_snr_db=MIN_SNR_DB)


def test_quell_export_int8(tmp_path):
    torch.manual_seed(3)
    model = DTLN(DTLNConfig(hidden=32, encoder=64))
    checkpoint = {"recipe": {"model": "dtln", "model_args": {"hidden": 32, "encoder": 64}},
                  "model": model.state_dict(), "state": {"step": 7, "epoch": 1, "best": -3.0}}
    torch.save(checkpoint, tmp_path / "best.pt")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "best.pt"), "-o", str(tmp_path / "m.onnx"), "--int8"])
    assert result.exit_code == 0, result.output
    assert "dB SNR against float32" in result.output
    card = ModelCard.load(tmp_path / "m.json")
    assert card.precision == "int8" and card.training["steps"] == 7
    assert StreamingModel(card).process(_speech_like(0.5, seed=7)).size == 62 * 128
