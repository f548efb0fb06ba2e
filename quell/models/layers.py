"""Blocks shared by the models: pseudo-complex convolutions and multidilated dense (D3) blocks.

Complex tensors are real tensors [batch, 2 * channels, time, freq]: the real parts of every channel, then the
imaginary parts. Convolutions are causal in time (they see the current and past frames only) so that every
block streams: `step` takes one frame and a history of past frames, `forward` a whole sequence, and both give
the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ComplexConv2d(nn.Module):
    """A complex convolution (W_r + iW_i) * (x_r + ix_i), as one real convolution with a block weight.

    Kernel (2, k_f) in time x frequency with dilation (d_t, d_f); in time it looks at frames t and t - d_t.
    A kernel of 1 in time needs no history. `stride_f` 2 halves the frequency resolution (bins -> (bins + 1) // 2).
    `input_order` takes the input's real channels in another order than [all real | all imaginary]: input
    channel k is the block layout's channel input_order[k] (the weights and their names stay the same).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_f: int = 3, kernel_t: int = 2,
                 dilation_t: int = 1, dilation_f: int = 1, bias: bool = True, stride_f: int = 1,
                 input_order: list[int] | None = None):
        super().__init__()
        if kernel_t not in (1, 2):
            raise ValueError("kernel_t is 1 or 2 (a longer reach in time comes from the dilation)")
        self.kernel_t, self.dilation_t, self.dilation_f, self.stride_f = kernel_t, dilation_t, dilation_f, stride_f
        self.pad_f = (kernel_f - 1) // 2 * dilation_f
        shape = (out_channels, in_channels, kernel_t, kernel_f)
        scale = (2 * in_channels * kernel_t * kernel_f) ** -0.5
        self.weight_real = nn.Parameter(torch.randn(shape) * scale)
        self.weight_imag = nn.Parameter(torch.randn(shape) * scale)
        self.bias = nn.Parameter(torch.zeros(2 * out_channels)) if bias else None
        if input_order is not None and sorted(input_order) != list(range(2 * in_channels)):
            raise ValueError(f"input_order must order all {2 * in_channels} input channels")
        self.register_buffer("input_order", None if input_order is None else torch.tensor(input_order),
                             persistent=False)

    def _weight(self) -> torch.Tensor:
        real, imag = self.weight_real, self.weight_imag
        weight = torch.cat([torch.cat([real, -imag], 1), torch.cat([imag, real], 1)], 0)
        return weight if self.input_order is None else weight[:, self.input_order]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 2Cin, T, F] -> [B, 2Cout, T, F], causal in time."""
        past = (self.kernel_t - 1) * self.dilation_t
        if past:
            x = F.pad(x, (0, 0, past, 0))
        return F.conv2d(x, self._weight(), self.bias, stride=(1, self.stride_f), padding=(0, self.pad_f),
                        dilation=(self.dilation_t, self.dilation_f))

    def step(self, frame: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """One frame [B, 2Cin, 1, F] given `history` [B, 2Cin, d_t, F] (its oldest frame is t - d_t)."""
        x = frame if self.kernel_t == 1 else torch.cat([history[:, :, :1], frame], dim=2)
        # the frequency padding is the convolution's own (one node less per convolution in the step graph)
        return F.conv2d(x, self._weight(), self.bias, stride=(1, self.stride_f), padding=(0, self.pad_f),
                        dilation=(1, self.dilation_f))


def complex_activation(x: torch.Tensor) -> torch.Tensor:
    """Split activation: the same nonlinearity on real and imaginary parts (cheap, and it streams)."""
    return F.elu(x)


class D3Block(nn.Module):
    """A densely connected multidilated block (Takahashi & Mitsufuji's D3 block, causal in time).

    Layer i sees the block input (group 0) and the outputs of layers 0..i-1 (groups 1..i); it convolves
    group g with dilation 2**g in time and frequency, so later layers reach far into the past and across
    the spectrum through early features, without pooling. The block returns a 1x1 mix of all groups added to
    its input.
    """

    def __init__(self, channels: int, growth: int, layers: int, max_dilation_f: int = 8):
        super().__init__()
        self.group_channels = [channels] + [growth] * layers
        self.dilations = [2**g for g in range(layers + 1)]
        self.layers = nn.ModuleList(
            nn.ModuleList(
                ComplexConv2d(self.group_channels[g], growth, dilation_t=self.dilations[g],
                              dilation_f=min(self.dilations[g], max_dilation_f), bias=g == 0)
                for g in range(i + 1)
            )
            for i in range(layers)
        )
        # the mix hears the groups concatenated as they are (each its real, then its imaginary channels): one
        # Concat node instead of a Split per group and a Concat
        self.group_offsets = [sum(self.group_channels[:g]) for g in range(len(self.group_channels))]
        total, order = sum(self.group_channels), []
        for offset, size in zip(self.group_offsets, self.group_channels, strict=True):
            order += [offset + j for j in range(size)] + [total + offset + j for j in range(size)]
        self.mix = ComplexConv2d(total, channels, kernel_t=1, kernel_f=1, input_order=order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = [x]
        for convs in self.layers:
            groups.append(complex_activation(sum(conv(g) for conv, g in zip(convs, groups, strict=False))))
        return x + self.mix(torch.cat(groups, 1))

    def history_frames(self) -> list[int]:
        """Past frames each group must keep for streaming (its time dilation); the last group needs none."""
        return self.dilations[: len(self.layers)]

    def step(self, frame: torch.Tensor, histories: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One frame through the block; `histories[g]` holds group g's last `dilation_g` frames."""
        groups = [frame]
        for convs in self.layers:
            total = sum(conv.step(g, h) for conv, g, h in zip(convs, groups, histories, strict=False))
            groups.append(complex_activation(total))
        out = frame + self.mix.step(torch.cat(groups, 1), None)
        new = [torch.cat([h[:, :, 1:], g], dim=2) for h, g in zip(histories, groups, strict=False)]
        return out, new


def real_dft_matrices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real DFT of n samples and its inverse as float64 matrices, for graphs without an FFT node.

    frame [n] @ forward = [re | im] (n // 2 + 1 bins each); [re | im] @ inverse = frame (irfft: DC and Nyquist
    count once, the other bins twice).
    """
    bins = n // 2 + 1
    t = torch.arange(n, dtype=torch.float64)
    angle = 2 * torch.pi * t[:, None] * torch.arange(bins, dtype=torch.float64)[None, :] / n
    forward = torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1)
    weight = torch.full((bins,), 2.0, dtype=torch.float64)
    weight[0] = weight[-1] = 1.0
    inverse = torch.cat([weight[:, None] * torch.cos(angle.T), -weight[:, None] * torch.sin(angle.T)], dim=0) / n
    return forward, inverse


def band_spread_matrix(bins: int, bands: int, sample_rate: int) -> torch.Tensor:
    """[bands, bins]: spreads one gain per band over the DFT bins, as RNNoise's and DeepFilterNet's band gains.

    Band centres lie evenly on the ERB-rate scale from 0 Hz to Nyquist; a bin between two centres takes the two
    bands' gains in linear proportion (triangles), so every column sums to one and gains in [0, 1] stay there.
    """
    if not 2 <= bands <= bins:
        raise ValueError(f"band gains need 2 to {bins} bands, got {bands}")
    nyquist = sample_rate / 2

    def erb_rate(hz: torch.Tensor) -> torch.Tensor:
        return 21.4 * torch.log10(1 + 0.00437 * hz)

    position = erb_rate(torch.linspace(0.0, nyquist, bins, dtype=torch.float64))
    centres = torch.linspace(0.0, float(position[-1]), bands, dtype=torch.float64)
    spacing = centres[1] - centres[0]
    return (1 - (position[None, :] - centres[:, None]).abs() / spacing).clamp_min(0.0)


def upsample_frequency(x: torch.Tensor, bins: int) -> torch.Tensor:
    """[B, C, T, F] -> [B, C, T, bins]: every bin twice (nearest neighbour), cut to `bins` (at most 2F).

    One gather with a fixed index: it exports as one ONNX node (expand + reshape + slice cost ~8 us more per hop).
    """
    if bins > 2 * x.shape[-1]:
        raise ValueError(f"cannot upsample {x.shape[-1]} bins to {bins}")
    return x.index_select(-1, torch.arange(bins, device=x.device) // 2)
