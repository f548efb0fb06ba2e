"""DTLN: PyTorch offline == PyTorch streaming == ONNX step graph hop by hop == ONNX sequence graph."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from quell.export.exporter import check_parity, export_model  # noqa: E402
from quell.models.dtln import DTLN, DTLNConfig  # noqa: E402
from quell.models.layers import band_spread_matrix  # noqa: E402
from quell.streaming.card import ModelCard  # noqa: E402
from quell.streaming.engine import StreamingModel  # noqa: E402


def _noisy(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 200 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_published_size_is_about_one_million_parameters():
    assert 0.9e6 < sum(p.numel() for p in DTLN().parameters()) < 1.1e6


@pytest.mark.parametrize("dft", ["fft", "matmul", "sliding"])
@pytest.mark.parametrize(("bands", "window"), [(0, "none"), (8, "none"), (0, "hann")])
def test_torch_streaming_equals_offline(dft, bands, window):
    if dft == "sliding" and window == "hann":
        pytest.skip("a windowed DFT does not slide")
    torch.manual_seed(0)
    model = DTLN(DTLNConfig(hidden=32, encoder=64, mask_bands=bands, analysis_window=window)).eval()
    model.dft = dft
    x = torch.from_numpy(_noisy(128 * 40))[None]
    with torch.no_grad():
        offline = model(x)
        states, hops = model.initial_states(), []
        for k in range(40):
            out, *states = model.stream(x[:, k * 128 : (k + 1) * 128], states, single_hop=True)
            hops.append(out)
        block, *_ = model.stream(x, model.initial_states())
    stream = torch.cat(hops, -1)
    torch.testing.assert_close(stream[:, 384:], offline[:, :-384], atol=1e-5, rtol=0)
    torch.testing.assert_close(block, stream, atol=1e-5, rtol=0)


def test_onnx_step_and_sequence_graphs_equal_pytorch(tmp_path):
    torch.manual_seed(1)
    model = DTLN().eval()  # the published size
    card = export_model(model, tmp_path / "dtln.onnx")
    assert check_parity(model, card.path, tolerance=1e-4) <= 1e-4

    x = _noisy(128 * 50, seed=3)
    with torch.no_grad():
        offline = model(torch.from_numpy(x)[None])[0].numpy()
    engine = StreamingModel(card.path)
    step = np.concatenate([engine.step(x[i : i + 128]).copy() for i in range(0, x.size, 128)])
    engine.reset()
    sequence = np.concatenate([engine.process(x[: 128 * 20]), engine.process(x[128 * 20 :])])  # carried states
    assert np.abs(step[384:] - offline[:-384]).max() <= 1e-4
    assert np.abs(sequence - step).max() <= 1e-5


def _constant_matmul_shapes(path) -> list[tuple[int, ...]]:
    """Shapes of the constant right-hand sides of a graph's MatMuls (initializers or Constant nodes)."""
    graph = onnx.load(str(path)).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    return [shapes[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in shapes]


def test_the_exported_dft_slides(tmp_path):
    """A rectangular DTLN's graphs transform each hop once (a [hop, 2 bins] basis), never a whole frame, and
    carry the frames' partial spectra as a state; the output is PyTorch's."""
    torch.manual_seed(5)
    model = DTLN(DTLNConfig(hidden=32, encoder=64)).eval()
    card = export_model(model, tmp_path / "m.onnx")  # parity with PyTorch is checked on export
    for graph in ("step", "sequence"):
        shapes = _constant_matmul_shapes(card.graph_path(graph))
        assert (128, 514) in shapes and (512, 514) not in shapes, (graph, shapes)
    states = {s.name: s.shape for s in card.states}
    assert states["input_spectra"] == [1, 3 * 514] and "input_buffer" not in states


def test_the_dft_slides_over_half_windows_and_refuses_windowed_frames():
    torch.manual_seed(6)
    model = DTLN(DTLNConfig(window=256, hop=128, hidden=16, encoder=32)).eval()
    assert model.export_dft == "sliding"
    x = torch.from_numpy(_noisy(128 * 30))[None]
    with torch.no_grad():
        offline = model(x)
        model.dft = "sliding"
        states, hops = model.initial_states(), []
        for k in range(30):
            out, *states = model.stream(x[:, k * 128 : (k + 1) * 128], states, single_hop=True)
            hops.append(out)
    torch.testing.assert_close(torch.cat(hops, -1)[:, 128:], offline[:, :-128], atol=1e-5, rtol=0)

    windowed = DTLN(DTLNConfig(hidden=16, encoder=32, analysis_window="hann")).eval()
    assert windowed.export_dft == "matmul"
    windowed.dft = "sliding"
    with pytest.raises(ValueError, match="slides only"):
        windowed.stream(x[:, :128], windowed.initial_states(), single_hop=True)


def test_the_analysis_window_is_in_the_graph_at_no_extra_node(tmp_path):
    torch.manual_seed(2)
    plain = DTLN(DTLNConfig(hidden=32, encoder=64)).eval()
    windowed = DTLN(DTLNConfig(hidden=32, encoder=64, analysis_window="hann")).eval()
    windowed.load_state_dict(plain.state_dict())
    cards = [export_model(m, tmp_path / f"{name}.onnx") for m, name in ((plain, "plain"), (windowed, "hann"))]
    assert check_parity(windowed, cards[1].path, tolerance=1e-4) <= 1e-4
    # a windowed frame's DFT does not slide: the plain model's step graph with a whole frame's DFT as well
    from quell.export.exporter import export_graph
    from quell.export.simplify import simplify_step_graph

    plain.dft, unwindowed = "matmul", tmp_path / "plain_frame_dft.onnx"
    export_graph(plain, unwindowed, single_hop=True)
    simplify_step_graph(unwindowed)
    nodes = [len(onnx.load(path).graph.node) for path in (unwindowed, cards[1].graph_path("step"))]
    assert nodes[0] == nodes[1]
    x = _noisy(128 * 30, seed=4)
    outputs = [StreamingModel(c.path).process(x) for c in cards]
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3  # the same weights hear a windowed spectrum
    with pytest.raises(ValueError, match="analysis_window"):
        DTLN(DTLNConfig(analysis_window="hamming"))


def test_band_gains_spread_over_the_bins_as_weights_summing_to_one():
    spread = band_spread_matrix(257, 32, 16000)
    assert spread.shape == (32, 257)
    torch.testing.assert_close(spread.sum(0), torch.ones(257, dtype=torch.float64))
    assert (spread >= 0).all() and (spread.sum(1) > 0).all()  # every band reaches some bin
    peaks = spread.argmax(1)
    assert (peaks[1:] >= peaks[:-1]).all() and peaks[0] == 0 and peaks[-1] == 256
    widths = (spread > 0).sum(1)
    assert widths[-1] > 4 * widths[1]  # ERB spacing: high bands span many more bins than low ones
    with pytest.raises(ValueError, match="bands"):
        band_spread_matrix(257, 1, 16000)


def test_band_gain_model_exports_with_parity_and_starts_from_a_per_bin_one(tmp_path):
    torch.manual_seed(2)
    per_bin = DTLN(DTLNConfig(hidden=32, encoder=64)).eval()
    with torch.no_grad():  # a mask layer whose logit is the same in every bin: the bands can say it exactly
        per_bin.mask1.weight.copy_(torch.randn(1, 32).expand(per_bin.config.bins, 32))
        per_bin.mask1.bias.fill_(0.3)
    banded = DTLN(DTLNConfig(hidden=32, encoder=64, mask_bands=8)).eval()
    banded.load_state_dict(banded.adapt_state_dict(per_bin.state_dict()))
    x = torch.from_numpy(_noisy(128 * 30))[None]
    with torch.no_grad():
        torch.testing.assert_close(banded(x), per_bin(x), atol=1e-6, rtol=0)
    own = banded.state_dict()
    assert banded.adapt_state_dict(own) is own  # weights of a band-gain model are taken as they are

    with torch.no_grad():
        banded.mask1.weight.normal_()
    card = export_model(banded, tmp_path / "bands.onnx")
    assert check_parity(banded, card.path, tolerance=1e-4) <= 1e-4


def test_card_describes_the_graphs(tiny_dtln_card):
    card = ModelCard.load(tiny_dtln_card)
    assert (card.sample_rate, card.hop, card.window, card.delay) == (16000, 128, 512, 384)
    assert card.algorithmic_latency == pytest.approx(0.032)
    assert card.graph_path("step").is_file() and card.graph_path("sequence").is_file()
    names = {s.name for s in card.states}
    assert {"input_spectra", "output_buffer", "lstm1_0_h", "lstm2_1_c"} <= names
    assert card.parameters == sum(p.numel() for p in DTLN(DTLNConfig(hidden=32, encoder=64)).parameters())


def test_a_parity_failure_is_detected(tmp_path):
    torch.manual_seed(2)
    model = DTLN(DTLNConfig(hidden=32, encoder=64)).eval()
    card = export_model(model, tmp_path / "m.onnx")
    with torch.no_grad():
        model.mask2.bias += 0.5  # the PyTorch model no longer matches its export
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        check_parity(model, card.path)


def test_a_transpose_that_changes_the_shape_stays(tmp_path):
    """[1, 1, 8] -> [1, 1, 8] moves nothing and goes; [1, 3, 1, 8] -> [1, 1, 3, 8] moves no data either but
    changes the shape its consumer sees, and stays."""
    import onnx
    from onnx import TensorProto, helper

    from quell.export.simplify import simplify_step_graph

    def graph(shape: list[int], perm: list[int]) -> onnx.ModelProto:
        transposed = [shape[axis] for axis in perm]
        nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=perm), helper.make_node("Relu", ["t"], ["y"])]
        return helper.make_model(helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, transposed)]))

    for shape, perm, removed in (([1, 1, 8], [1, 0, 2], 1), ([1, 3, 1, 8], [0, 2, 1, 3], 0)):
        path = tmp_path / "g.onnx"
        onnx.save(graph(shape, perm), path)
        assert simplify_step_graph(path) == removed, (shape, perm)


def test_step_graph_loses_the_lstm_shape_shuffles_and_not_a_bit_of_output(tmp_path):
    import onnx

    from quell.export.exporter import export_graph
    from quell.export.simplify import simplify_step_graph

    torch.manual_seed(2)
    model = DTLN(DTLNConfig(hidden=32, encoder=64)).eval()
    model.dft = "matmul"  # as export_model sets it
    plain, simple = tmp_path / "plain.onnx", tmp_path / "simple.onnx"
    export_graph(model, plain, single_hop=True)
    export_graph(model, simple, single_hop=True)
    assert simplify_step_graph(simple) == 8  # a Transpose and a Squeeze around each of the four LSTMs
    ops = [node.op_type for node in onnx.load(simple).graph.node]
    assert "Squeeze" not in ops and ops.count("LSTM") == 4

    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (plain, simple)]
    feeds = {i.name: np.zeros(i.shape, np.float32) for i in sessions[0].get_inputs()}
    x = _noisy(128 * 30, seed=4)
    for k in range(30):
        feeds["audio"] = x[None, k * 128 : (k + 1) * 128]
        outputs = [s.run(None, feeds) for s in sessions]
        for a, b in zip(*outputs, strict=True):
            np.testing.assert_array_equal(a, b)
        names = [o.name for o in sessions[0].get_outputs()]
        feeds.update({i.name: outputs[0][names.index(f"{i.name}_out")] for i in sessions[0].get_inputs()[1:]})
