"""Widening a trained echo canceller keeps its output and gives the new channels something to learn."""

import subprocess
import sys

import pytest
import torch

from quell.models.d3net_aec import D3NetAEC, D3NetAECConfig
from quell.models.dtln import DTLN, DTLNConfig
from quell.models.losses import LOSSES
from quell.models.widen import WIDENS, widen_dtln_state_dict, widen_state_dict

NARROW = dict(channels=4, growth=2, layers=2, blocks=2, downsample=1, filter_partitions=3, filter_variable_step=True)


def _trained_like(config: D3NetAECConfig | DTLNConfig) -> D3NetAEC | DTLN:
    """A model whose weights are all non-zero, biases included (fresh biases are zero and would hide mistakes)."""
    torch.manual_seed(3)
    model = D3NetAEC(config) if isinstance(config, D3NetAECConfig) else DTLN(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bias" in name:
                parameter.normal_(0.0, 0.1)
    return model.eval()


def _signals() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(4)
    reference = torch.randn(2, 4000) * 0.1
    mic = 0.5 * torch.roll(reference, 40, -1) + 0.05 * torch.randn(2, 4000)
    return mic, reference


def test_widened_model_computes_what_the_narrow_one_did_and_can_learn():
    narrow = _trained_like(D3NetAECConfig(**NARROW))
    wide_config = D3NetAECConfig(**{**NARROW, "channels": 6, "growth": 5})
    wide = D3NetAEC(wide_config)
    wide.load_state_dict(widen_state_dict(narrow.state_dict(), narrow.config, wide_config))
    wide.eval()
    mic, reference = _signals()
    with torch.no_grad():
        expected, got = narrow(mic, reference), wide(mic, reference)
    for e, g in zip(expected, got, strict=True):
        assert e.abs().max() > 1e-3
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in narrow.parameters())
    # the weights from new channels into old ones start at zero but are not stuck there
    wide.train()
    loss = LOSSES["echo"](wide(mic, reference), (mic, mic))
    loss.backward()
    mix = wide.blocks[0].mix.weight_real
    new_into_old = mix.grad[: NARROW["channels"], NARROW["channels"] : wide_config.channels]
    assert mix[: NARROW["channels"], NARROW["channels"] : wide_config.channels].abs().max() == 0
    assert new_into_old.abs().max() > 0


def test_widen_command_writes_a_checkpoint_that_training_starts_from(tmp_path):
    narrow = _trained_like(D3NetAECConfig(**NARROW))
    source = tmp_path / "narrow.pt"
    recipe = {"model": "d3net_aec", "model_args": NARROW}
    torch.save({"model": narrow.state_dict(), "recipe": recipe, "state": {"step": 7, "epoch": 1, "best": 0.0}},
               source)
    destination = tmp_path / "wide" / "init.pt"
    command = [sys.executable, "-m", "quell.models.widen", str(source), "-o", str(destination),
               "--channels", "8", "--growth", "4"]
    subprocess.run(command, check=True, capture_output=True)
    checkpoint = torch.load(destination, weights_only=False)
    assert checkpoint["recipe"]["model_args"]["channels"] == 8
    assert checkpoint["state"]["widened_from"]["channels"] == 4
    wide = D3NetAEC(D3NetAECConfig(**checkpoint["recipe"]["model_args"]))
    wide.load_state_dict(checkpoint["model"])
    again = subprocess.run(command, capture_output=True, text=True)  # never overwrites
    assert again.returncode != 0 and "exists" in again.stderr


DTLN_NARROW = dict(window=64, hop=16, hidden=8, layers=2, encoder=16)


def test_widened_dtln_computes_what_the_narrow_one_did_and_its_copies_part_ways():
    narrow = _trained_like(DTLNConfig(**DTLN_NARROW))
    wide_config = DTLNConfig(**{**DTLN_NARROW, "hidden": 13})  # 5 of the 8 units get a copy
    torch.manual_seed(6)
    noisy = torch.randn(2, 1600) * 0.1
    with torch.no_grad():
        expected = narrow(noisy)
    assert expected.abs().max() > 1e-3
    for noise, tolerance in ((0.0, 1e-5), (0.01, 0.05)):
        wide = DTLN(wide_config)
        wide.load_state_dict(widen_dtln_state_dict(narrow.state_dict(), narrow.config, wide_config, noise=noise))
        wide.eval()
        with torch.no_grad():
            got = wide(noisy)
            _, states = wide.lstm1(torch.randn(1, 20, wide_config.bins))
        error = (got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
        assert error <= tolerance
        h = states[-1][0, 0]  # unit 8 is a copy of unit 0: the same output, or nearly, but not with noise
        assert (h[8] == h[0]) == (noise == 0.0) and (h[8] - h[0]).abs() < 0.1
    assert error > 1e-5  # the noise did move the output
    assert torch.equal(wide.mask2.weight[:, 0], wide.mask2.weight[:, 8])  # a unit and its copy share its say
    torch.testing.assert_close(2 * wide.mask2.weight[:, 0], narrow.mask2.weight[:, 0])
    torch.testing.assert_close(wide.mask2.weight[:, 7], narrow.mask2.weight[:, 7])  # no copy: its own weight


@pytest.mark.parametrize("model, change", [
    ("d3net_aec", {"channels": 3}), ("d3net_aec", {"layers": 3}), ("d3net_aec", {"downsample": 0}),
    ("dtln", {"hidden": 6}), ("dtln", {"layers": 3}), ("dtln", {"encoder": 32})])
def test_widening_refuses_what_it_cannot_keep(model, change):
    config_class, _, widen, _ = WIDENS[model]
    sizes = NARROW if model == "d3net_aec" else DTLN_NARROW
    narrow = _trained_like(config_class(**sizes))
    with pytest.raises(ValueError):
        widen(narrow.state_dict(), narrow.config, config_class(**{**sizes, **change}))


def test_widen_command_widens_a_dtln_and_names_the_sizes_it_takes(tmp_path):
    narrow = _trained_like(DTLNConfig(**DTLN_NARROW))
    source = tmp_path / "narrow.pt"
    torch.save({"model": narrow.state_dict(), "recipe": {"model": "dtln", "model_args": DTLN_NARROW},
                "state": {"step": 7, "epoch": 1, "best": 0.0}}, source)
    destination = tmp_path / "wide.pt"
    wrong = subprocess.run([sys.executable, "-m", "quell.models.widen", str(source), "-o", str(destination),
                            "--channels", "8"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "--hidden" in wrong.stderr.splitlines()[-1] and not destination.exists()
    subprocess.run([sys.executable, "-m", "quell.models.widen", str(source), "-o", str(destination),
                    "--hidden", "12"], check=True, capture_output=True)
    checkpoint = torch.load(destination, weights_only=False)
    assert checkpoint["recipe"]["model_args"]["hidden"] == 12
    assert checkpoint["state"]["widened_from"] == {"checkpoint": str(source), "hidden": 8}
    noisy = subprocess.run([sys.executable, "-m", "quell.models.widen", str(source), "-o", str(tmp_path / "b.pt"),
                            "--hidden", "12", "--noise", "0"], capture_output=True, text=True)
    assert noisy.returncode == 0
    assert torch.load(tmp_path / "b.pt", weights_only=False)["state"]["widened_from"]["noise"] == 0.0
    DTLN(DTLNConfig(**checkpoint["recipe"]["model_args"])).load_state_dict(checkpoint["model"])
