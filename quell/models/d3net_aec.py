"""Joint echo cancellation and noise suppression: a complex-valued multidilated D3Net on the STFT.

After Watcharasupat et al., "End-to-End Complex-Valued Multidilated Convolutional Neural Network for Joint
Acoustic Echo Cancellation and Noise Suppression" (ICASSP 2022): the microphone and the (delay-aligned)
far-end reference enter as two complex channels of a power-law compressed STFT; pseudo-complex
convolutions and densely connected multidilated blocks see far in time and frequency without pooling; two
bounded complex masks come out, one taking the echo out of the mic spectrum and one the noise out of that.

Everything is causal in time (20 ms window, 10 ms hop: one VoIP frame per hop), so the model streams:
`stream()` takes one hop of mic and reference and every state (analysis buffers, the overlap-add buffer and
each dilated convolution's past frames) and gives one hop of near-end speech, `window - hop` samples late.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quell.models.layers import ComplexConv2d, D3Block


@dataclass
class D3NetAECConfig:
    """Sizes of the echo canceller."""

    sample_rate: int = 16000
    window: int = 320
    hop: int = 160
    channels: int = 16  # complex channels inside the blocks
    growth: int = 8  # complex channels each dense layer adds
    layers: int = 4  # per block; group g is dilated 2**g
    blocks: int = 3
    compress: float = 0.3  # power-law compression of the input magnitudes

    @property
    def bins(self) -> int:
        return self.window // 2 + 1


class D3NetAEC(nn.Module):
    """Mic + far-end reference -> near-end speech (echo and noise removed)."""

    task = "echo"
    stream_inputs = ("audio", "reference")
    has_sequence = False  # stream() takes one hop

    def __init__(self, config: D3NetAECConfig | None = None):
        super().__init__()
        cfg = self.config = config or D3NetAECConfig()
        if cfg.window != 2 * cfg.hop:
            raise ValueError("the sqrt-Hann overlap-add needs window == 2 * hop")
        self.encoder = ComplexConv2d(2, cfg.channels, kernel_t=1)
        self.blocks = nn.ModuleList(D3Block(cfg.channels, cfg.growth, cfg.layers) for _ in range(cfg.blocks))
        self.masks = ComplexConv2d(cfg.channels, 2, kernel_t=1)
        n, bins = cfg.window, cfg.bins
        t = torch.arange(n, dtype=torch.float64)
        window = torch.sin(torch.pi * t / n)  # sqrt of a periodic Hann: analysis x synthesis sums to 1 at hop n/2
        angle = 2 * torch.pi * t[:, None] * torch.arange(bins, dtype=torch.float64)[None, :] / n
        forward = window[:, None] * torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1)
        weight = torch.full((bins,), 2.0, dtype=torch.float64)
        weight[0] = weight[-1] = 1.0
        inverse = torch.cat([weight[:, None] * torch.cos(angle.T), -weight[:, None] * torch.sin(angle.T)], 0) / n
        self.register_buffer("dft_forward", forward.float(), persistent=False)  # frame -> [re | im]
        self.register_buffer("dft_inverse", (inverse * window[None, :]).float(), persistent=False)

    # ---- the spectral core: [B, T, 2F] spectra of mic and reference -> enhanced spectra -----------------------
    def _features(self, mic: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Compressed complex features [B, 4, T, F]: real parts of mic and reference, then imaginary parts."""
        cfg = self.config
        parts = []
        for spectrum in (mic, reference):
            re, im = spectrum[..., : cfg.bins], spectrum[..., cfg.bins :]
            scale = (re * re + im * im + 1e-12) ** ((cfg.compress - 1) / 2)
            parts.append((re * scale, im * scale))
        return torch.stack([parts[0][0], parts[1][0], parts[0][1], parts[1][1]], dim=1)

    def _apply_masks(self, mic: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounded complex masks [B, 4, T, F] on the mic spectrum [B, T, 2F] -> (near speech, echo removed)."""
        bins = self.config.bins
        magnitude = torch.sqrt(masks[:, :2] ** 2 + masks[:, 2:] ** 2 + 1e-12)
        bounded = masks * (torch.tanh(magnitude) / magnitude).repeat(1, 2, 1, 1)
        echo_re, noise_re, echo_im, noise_im = bounded.unbind(1)
        re, im = mic[..., :bins], mic[..., bins:]
        echo_free = (re * echo_re - im * echo_im, re * echo_im + im * echo_re)
        near = (echo_free[0] * noise_re - echo_free[1] * noise_im, echo_free[0] * noise_im + echo_free[1] * noise_re)
        return torch.cat(near, -1), torch.cat(echo_free, -1)

    # ---- training: whole signals --------------------------------------------------------------------------------
    def forward(self, mic: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, samples] mic and reference -> (near-end speech, mic without echo), time-aligned, same length."""
        cfg = self.config
        length, overlap = mic.shape[-1], cfg.window - cfg.hop
        tail = (-length) % cfg.hop
        spectra = [_frames(nn.functional.pad(x, (overlap, overlap + tail)), cfg) @ self.dft_forward
                   for x in (mic, reference)]
        x = self.encoder(self._features(*spectra))
        for block in self.blocks:
            x = block(x)
        near, echo_free = self._apply_masks(spectra[0], self.masks(x))
        return tuple(_overlap_add(s @ self.dft_inverse, cfg.hop)[..., overlap : overlap + length]
                     for s in (near, echo_free))

    # ---- streaming: one hop with explicit states ----------------------------------------------------------------
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the streaming states, in the order `stream` takes and returns them."""
        cfg = self.config
        overlap = cfg.window - cfg.hop
        shapes: dict[str, tuple[int, ...]] = {
            "mic_buffer": (1, overlap), "reference_buffer": (1, overlap), "output_buffer": (1, overlap)}
        for b, block in enumerate(self.blocks):
            for g, frames in enumerate(block.history_frames()):
                shapes[f"block{b}_group{g}"] = (1, 2 * block.group_channels[g], frames, cfg.bins)
        return shapes

    def initial_states(self) -> list[torch.Tensor]:
        """Zero states for `stream`."""
        return [torch.zeros(shape) for shape in self.state_shapes().values()]

    def stream(
        self, mic: torch.Tensor, reference: torch.Tensor, states: list[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """One hop [1, hop] of mic and reference -> (near-end hop, *new states), `window - hop` samples late."""
        cfg = self.config
        mic_buffer, reference_buffer, output_buffer, *histories = states
        frames = [torch.cat([mic_buffer, mic], -1), torch.cat([reference_buffer, reference], -1)]
        spectra = [(f @ self.dft_forward).unsqueeze(1) for f in frames]  # [1, 1, 2F]
        x = self.encoder.step(self._features(*spectra), None)
        new_histories: list[torch.Tensor] = []
        position = 0
        for block in self.blocks:
            count = len(block.history_frames())
            x, updated = block.step(x, histories[position : position + count])
            new_histories += updated
            position += count
        near, _ = self._apply_masks(spectra[0], self.masks.step(x, None))
        summed = (near[:, 0] @ self.dft_inverse) + nn.functional.pad(output_buffer, (0, cfg.hop))
        out, new_output = torch.split(summed, [cfg.hop, cfg.window - cfg.hop], dim=-1)
        return (out, frames[0][:, cfg.hop :], frames[1][:, cfg.hop :], new_output, *new_histories)


def _frames(signal: torch.Tensor, cfg: D3NetAECConfig) -> torch.Tensor:
    """[B, samples] -> [B, T, window] frames every hop (window == 2 * hop)."""
    blocks = signal.reshape(signal.shape[0], -1, cfg.hop)
    return torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=-1)


def _overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """[B, T, 2 * hop] -> [B, (T + 1) * hop]."""
    first, second = frames[..., :hop], frames[..., hop:]
    pad = nn.functional.pad
    return (pad(first, (0, 0, 0, 1)) + pad(second, (0, 0, 1, 0))).reshape(frames.shape[0], -1)
