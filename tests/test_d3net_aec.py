"""The echo canceller model: causal blocks stream exactly, and its ONNX step graph equals PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from quell.export.exporter import check_parity, export_model  # noqa: E402
from quell.models.d3net_aec import D3NetAEC, D3NetAECConfig  # noqa: E402
from quell.models.layers import ComplexConv2d, D3Block  # noqa: E402
from quell.streaming.card import ModelCard  # noqa: E402


def test_complex_convolution_multiplies_complex_numbers():
    conv = ComplexConv2d(1, 1, kernel_f=1, kernel_t=1, bias=False)
    w = complex(conv.weight_real.item(), conv.weight_imag.item())
    x = torch.tensor([[[[0.3]], [[-1.2]]]])  # 0.3 - 1.2j as [real, imag] channels
    y = conv(x)[0, :, 0, 0]
    expected = w * complex(0.3, -1.2)
    assert complex(y[0].item(), y[1].item()) == pytest.approx(expected, abs=1e-6)


def test_d3_block_is_causal_and_streams_exactly():
    torch.manual_seed(0)
    block = D3Block(channels=3, growth=2, layers=3).eval()
    x = torch.randn(1, 6, 20, 9)
    with torch.no_grad():
        offline = block(x)
        changed = x.clone()
        changed[:, :, 12:] += 1.0  # the future must not change the past
        assert torch.equal(block(changed)[:, :, :12], offline[:, :, :12])
        histories = [torch.zeros(1, 2 * c, d, 9) for c, d in zip(block.group_channels, block.history_frames(),
                                                                    strict=False)]
        frames = []
        for t in range(20):
            out, histories = block.step(x[:, :, t : t + 1], histories)
            frames.append(out)
    torch.testing.assert_close(torch.cat(frames, dim=2), offline, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hybrid,variable_step,detector", [(False, False, False), (True, False, False),
                                                            (True, True, False), (True, True, True)],
                         ids=["plain", "linear-filter-and-downsampling", "variable-step-filter",
                              "double-talk-detector"])
def test_streaming_equals_offline_and_onnx_equals_pytorch(tmp_path, hybrid, variable_step, detector):
    torch.manual_seed(1)
    extra = {"downsample": 2, "filter_partitions": 4, "filter_variable_step": variable_step} if hybrid else {}
    if detector:
        extra |= {"presence_hidden": 6, "double_talk_mix": 0.5}
    model = D3NetAEC(D3NetAECConfig(channels=8, growth=4, layers=3, blocks=2, **extra)).eval()
    rng = np.random.default_rng(0)
    mic, ref = (torch.from_numpy(rng.standard_normal((1, 160 * 30)).astype(np.float32) * 0.1) for _ in range(2))
    mic = mic + torch.nn.functional.pad(ref, (40, 0))[:, : mic.shape[-1]]  # an echo for the filter to follow
    with torch.no_grad():
        near, echo_free = model(mic, ref)
        states, hops = model.initial_states(), []
        for k in range(30):
            out, *states = model.stream(mic[:, k * 160 : (k + 1) * 160], ref[:, k * 160 : (k + 1) * 160], states)
            hops.append(out)
    torch.testing.assert_close(torch.cat(hops, -1)[:, 160:], near[:, :-160], atol=1e-5, rtol=0)
    assert near.shape == echo_free.shape == mic.shape

    card = export_model(model, tmp_path / "aec.onnx")
    assert check_parity(model, card.path) <= 1e-4
    loaded = ModelCard.load(card.path)
    assert (loaded.task, loaded.reference_input, loaded.sequence_graph) == ("echo", "reference", None)
    assert (loaded.window, loaded.hop, loaded.delay) == (320, 160, 160)
    names = [state.name for state in loaded.states]
    assert any(name.startswith("filter_") for name in names) == hybrid
    if hybrid:  # the blocks run on a quarter of the bins: 161 -> 81 -> 41
        assert all(state.shape[-1] == 41 for state in loaded.states if state.name.startswith("block"))
    assert ("presence_state" in names) == detector


def test_the_double_talk_detector_mixes_the_mic_in_where_both_ends_talk():
    """Sure that the near end talks while the far end plays, at a mix of 1, the output is the mic itself (the
    analysis-synthesis pair reconstructs it); sure that it does not, or with the far end silent, it is the
    canceller's own output, as without a detector."""
    torch.manual_seed(5)
    sizes = {"channels": 4, "growth": 4, "layers": 2, "blocks": 1, "filter_partitions": 4}
    plain = D3NetAEC(D3NetAECConfig(**sizes)).eval()
    model = D3NetAEC(D3NetAECConfig(**sizes, presence_hidden=4, double_talk_mix=1.0)).eval()
    model.load_state_dict(plain.state_dict(), strict=False)  # the same canceller, and a detector
    rng = np.random.default_rng(1)
    mic, ref = (torch.from_numpy(rng.standard_normal((1, 160 * 20)).astype(np.float32) * 0.1) for _ in range(2))
    silent = torch.zeros_like(ref)
    with torch.no_grad():
        canceller, _ = plain(mic, ref)
        alone, _ = plain(mic, silent)
        for bias, reference, expected in ((30.0, ref, mic), (-30.0, ref, canceller), (30.0, silent, alone)):
            model.presence.out.weight.zero_()
            model.presence.out.bias.fill_(bias)
            near, _ = model(mic, reference)
            torch.testing.assert_close(near, expected, atol=1e-5, rtol=0)
    assert (canceller - mic).abs().max() > 0.01 and (alone - mic).abs().max() > 0.01  # the cases differ


def test_the_linear_filter_takes_a_linear_echo_out_before_the_network():
    torch.manual_seed(3)
    model = D3NetAEC(D3NetAECConfig(channels=4, growth=4, layers=2, blocks=1, filter_partitions=4)).eval()
    reference = torch.randn(1, 16000) * 0.1
    echo = 0.5 * torch.nn.functional.pad(reference, (40, 0))[:, :16000]  # a pure 2.5 ms delay
    signals, _ = model._signals(echo, reference)
    residual, estimate, heard = signals
    assert torch.equal(heard, reference)
    late = slice(8000, None)
    assert residual[:, late].pow(2).sum() < 1e-3 * echo[:, late].pow(2).sum()  # > 30 dB out after 0.5 s
    torch.testing.assert_close(residual + estimate, echo, atol=1e-6, rtol=0)


def test_the_reference_matters():
    torch.manual_seed(2)
    model = D3NetAEC(D3NetAECConfig(channels=8, growth=4, layers=2, blocks=1)).eval()
    mic = torch.randn(1, 3200) * 0.1
    with torch.no_grad():
        silent, _ = model(mic, torch.zeros_like(mic))
        playing, _ = model(mic, torch.randn(1, 3200) * 0.1)
    assert not torch.allclose(silent, playing)


def test_a_new_alignment_zeroes_the_linear_filter_and_nothing_else(tmp_path):
    """The card names the filter's states; EchoCanceller zeroes them when it first finds the delay and when the
    delay jumps (the echo path it learnt belongs to the old alignment), not on every small update."""
    from quell.streaming.echo import EchoCanceller
    from quell.streaming.engine import StreamingModel

    torch.manual_seed(0)
    model = D3NetAEC(D3NetAECConfig(channels=4, growth=4, layers=2, blocks=1, downsample=1,
                                    filter_partitions=3)).eval()
    card = export_model(model, tmp_path / "aec.onnx")
    assert card.realign_states and all(name.startswith("filter_") for name in card.realign_states)
    assert set(card.realign_states) < {s.name for s in card.states}  # the network's own states go on

    rate, rng = 16000, np.random.default_rng(0)
    syllables = np.clip(np.sin(2 * np.pi * 3 * np.arange(12 * rate) / rate), 0, None)
    far = (0.1 * rng.standard_normal(12 * rate) * syllables).astype(np.float32)
    echo = [np.concatenate([np.zeros(d, np.float32), far[: far.size - d]]) for d in (1600, 4800)]  # 100, 300 ms
    mic = 0.5 * np.concatenate([echo[0][: 6 * rate], echo[1][6 * rate :]])
    canceller = EchoCanceller(card.path, sample_rate=rate)
    zeroed: list[tuple[float, list[str]]] = []
    stream = canceller.models[0]
    original = StreamingModel.zero_states

    def spy(names):
        zeroed.append((canceller._hops * 160 / rate, list(names)))
        original(stream, names)

    stream.zero_states = spy
    for i in range(0, mic.size, 160):
        canceller.process(mic[i : i + 160], far[i : i + 160])
    assert [names for _, names in zeroed] == [card.realign_states] * 2, zeroed
    assert zeroed[0][0] < 2.0 and 6.0 < zeroed[1][0] < 8.0
    assert abs(canceller.alignment.delay - 0.3) < 0.001

    states = [s.copy() for s in stream.states]
    original(stream, card.realign_states)
    for spec, before, after in zip(card.states, states, stream.states, strict=True):
        expected = np.zeros_like(before) if spec.name in card.realign_states else before
        np.testing.assert_array_equal(after, expected)

    bogus = json.loads(card.path.read_text())
    bogus["realign_states"] = ["filter_nothing"]
    (tmp_path / "bogus.json").write_text(json.dumps(bogus))
    with pytest.raises(ValueError, match="realign_states names no state filter_nothing"):
        ModelCard.load(tmp_path / "bogus.json")
