"""DNSMOS P.835 in PyTorch: the same scores as the ONNX model `quell eval` uses, and a gradient that helps."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("speechmos")

from quell.dns.mos import P835_POLYNOMIALS, _sessions  # noqa: E402
from quell.models.dnsmos import DNSMOSNet, dnsmos_ovrl, mapped  # noqa: E402
from quell.models.losses import LOSSES, dnsmos_crops, snr_and_spectral  # noqa: E402

RATE = 16000


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20)) * np.clip(np.sin(2 * np.pi * 1.5 * t), 0, 1)
    return (0.05 * voiced + 1e-4 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def net() -> DNSMOSNet:
    return DNSMOSNet.from_onnx()


def test_the_port_gives_the_onnx_models_raw_and_mapped_scores(net):
    window = 144160  # 9.01 s, the ONNX model's fixed input
    clean = _speech_like(window / RATE)
    noisy = clean + 0.02 * np.random.default_rng(1).standard_normal(clean.size).astype(np.float32)
    audio = np.stack([clean, noisy])
    expected = np.concatenate([_sessions()[0].run(None, {"input_1": a[None]})[0] for a in audio])
    with torch.no_grad():
        raw = net(torch.from_numpy(audio))
    np.testing.assert_allclose(raw.numpy(), expected, atol=1e-4)
    for i, name in enumerate(("sig", "bak", "ovrl")):
        np.testing.assert_allclose(mapped(raw)[:, i].numpy(), P835_POLYNOMIALS[name](expected[:, i]), atol=1e-4)
    assert raw[1, 1] < raw[0, 1] - 0.3  # the noise is heard: BAK drops


def test_the_gradient_of_ovrl_raises_it_on_a_noisy_clip():
    clean = torch.from_numpy(_speech_like(2.0))
    noisy = (clean + 0.005 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2)))[None]
    audio = noisy.clone().requires_grad_(True)
    before = float(dnsmos_ovrl(noisy))
    optimizer = torch.optim.Adam([audio], lr=2e-3)
    for _ in range(10):
        optimizer.zero_grad()
        (-dnsmos_ovrl(audio).sum()).backward()
        optimizer.step()
    assert float(dnsmos_ovrl(audio.detach())) > before + 0.5  # measured 3.6, past the clean clip's 2.2


def test_the_dnsmos_loss_is_the_snr_loss_minus_the_weighted_ovrl_of_the_crops():
    clean = torch.from_numpy(np.stack([_speech_like(3.0, seed) for seed in range(3)]))
    noisy = clean + 0.01 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    crops = dnsmos_crops(noisy, items=2, seconds=1.0)
    assert crops.shape == (2, RATE)
    starts = [int(np.flatnonzero(np.isclose(noisy[i].numpy(), c[0].item()))[0]) for i, c in enumerate(crops)]
    assert all(torch.equal(noisy[i, s : s + RATE], crops[i]) for i, s in enumerate(starts))
    loss = LOSSES["snr_spectral_dnsmos"]
    torch.manual_seed(0)
    value = loss((noisy,), (clean,), dnsmos_weight=5.0, dnsmos_items=2, dnsmos_seconds=1.0)
    expected = snr_and_spectral(noisy, clean) - 5.0 * dnsmos_ovrl(crops).mean()
    assert float(value) == pytest.approx(float(expected), abs=5 * 0.05)  # the term runs in bfloat16
    torch.manual_seed(0)
    without = loss((noisy,), (clean,), dnsmos_weight=0.0, dnsmos_items=2, dnsmos_seconds=1.0)
    assert float(without) == pytest.approx(float(snr_and_spectral(noisy, clean)), rel=1e-5)
