"""DNSMOS P.835 in PyTorch, differentiable, with the weights of the ONNX model that `quell eval` scores with.

The network (Reddy et al., ICASSP 2022) reads raw 16 kHz audio: frames of 320 samples every 160, a DFT's
log10 power (161 bins), seven 3x3 convolutions with three 2x2 max-pools, a global max over time and
frequency, and three dense layers to raw SIG, BAK and OVRL, which the published polynomials map to MOS. It is
fully convolutional up to the global max, so it takes any length of at least a few frames: on a clip shorter
than the 9.01 s window it equals the windowed score of the clip tiled (`quell.dns.mos.dnsmos`) up to the seams.

The weights are read from the `speechmos` package's ONNX file (installed with `quell[eval]`), never copied:
`DNSMOSNet.from_onnx()`. `quell.models.losses.snr_spectral_dnsmos` trains against its predicted OVRL (which
a model learns to please without sounding better: recipes/dtln/README.md).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from quell.dns.mos import P835_POLYNOMIALS, models_folder

FRAME = 320
HOP = 160
BINS = 161
_CONVS = [(1, 128), (128, 64), (64, 64), (64, 32), (32, 32), (32, 32), (32, 64)]
_POOL_AFTER = {3, 4, 5}  # max-pool 2x2 after these convolutions (0-based)


class DNSMOSNet(nn.Module):
    """The P.835 predictor: audio [batch, samples] at 16 kHz -> raw scores [batch, 3] (SIG, BAK, OVRL)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("dft_real", torch.zeros(BINS, FRAME))
        self.register_buffer("dft_imag", torch.zeros(BINS, FRAME))
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in _CONVS)
        self.dense = nn.ModuleList([nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 3)])

    @classmethod
    def from_onnx(cls) -> DNSMOSNet:
        """The network with the weights of speechmos's `sig_bak_ovr.onnx`, frozen, in eval mode."""
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(models_folder() / "sig_bak_ovr.onnx")).graph
        weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        net = cls()
        with torch.no_grad():
            net.dft_real.copy_(torch.from_numpy(weights["time2freq/stft-real/kernel:0"][:, :, 0]))
            net.dft_imag.copy_(torch.from_numpy(weights["time2freq/stft-imag/kernel:0"][:, :, 0]))
            for i, conv in enumerate(net.convs):
                name = "conv2d" if i == 0 else f"conv2d_{i}"
                conv.weight.copy_(torch.from_numpy(weights[f"{name}/kernel:0"]))
                conv.bias.copy_(torch.from_numpy(weights[f"{name}/bias:0"]))
            for layer, name in zip(net.dense, ("dense", "dense_1", "dense_3"), strict=True):
                prefix = f"mos_estimator_logpow/{name}"
                layer.weight.copy_(torch.from_numpy(weights[f"{prefix}/MatMul/ReadVariableOp/resource:0"].T.copy()))
                layer.bias.copy_(torch.from_numpy(weights[f"{prefix}/BiasAdd/ReadVariableOp/resource:0"].copy()))
        return net.eval().requires_grad_(False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        frames = audio.unfold(-1, FRAME, HOP)  # [batch, frames, 320]
        power = (frames @ self.dft_real.T).pow(2) + (frames @ self.dft_imag.T).pow(2)
        x = torch.log10(power.clamp_min(1e-12)).unsqueeze(1)  # [batch, 1, frames, 161]
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i in _POOL_AFTER:
                x = nn.functional.max_pool2d(x, 2)
        x = x.amax(dim=(2, 3))
        for i, layer in enumerate(self.dense):
            x = layer(x)
            if i < len(self.dense) - 1:
                x = torch.relu(x)
        return x


def mapped(raw: torch.Tensor) -> torch.Tensor:
    """Raw P.835 outputs [..., 3] -> SIG, BAK, OVRL on the MOS scale (the non-personalised polynomials)."""
    columns = []
    for i, name in enumerate(("sig", "bak", "ovrl")):
        a, b, c = (float(v) for v in P835_POLYNOMIALS[name].coeffs)
        columns.append(a * raw[..., i] ** 2 + b * raw[..., i] + c)
    return torch.stack(columns, -1)


@lru_cache(maxsize=4)
def _net(device: str) -> DNSMOSNet:
    return DNSMOSNet.from_onnx().to(device)


def dnsmos_ovrl(audio: torch.Tensor) -> torch.Tensor:
    """Predicted DNSMOS OVRL (MOS scale) of each clip of `audio` [batch, samples] at 16 kHz, differentiable."""
    return mapped(_net(str(audio.device))(audio))[..., 2]
