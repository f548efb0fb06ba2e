"""Joint echo cancellation and noise suppression: a complex-valued multidilated D3Net on the STFT.

After Watcharasupat et al., "End-to-End Complex-Valued Multidilated Convolutional Neural Network for Joint
Acoustic Echo Cancellation and Noise Suppression" (ICASSP 2022): the microphone and the (delay-aligned)
far-end reference enter as two complex channels of a power-law compressed STFT; pseudo-complex
convolutions and densely connected multidilated blocks see far in time and frequency without pooling; two
bounded complex masks come out, one taking the echo out of the mic spectrum and one the noise out of that.

Two additions make it cheap enough to train on a CPU and strong on linear echo: `downsample` strided
convolutions halve the frequency resolution before the blocks (and nearest-neighbour upsampling with added skip
connections restores it before the masks), and `filter_partitions` puts a linear adaptive filter in front
(`quell.models.adaptive`, inside the graph): the masks then act on the filter's residual, and the network also
hears the filter's echo estimate, a third complex input.

An optional double-talk detector (`presence_hidden`) limits the suppression where both ends talk, as classic
cancellers do: a small GRU on the network's own features says whether the near end talks; while it does and the
far end plays, `double_talk_mix` of the mic goes into the output (mixed in the spectrum, released over a few hops
afterwards). It is trained on its own behind the frozen network (recipes/d3net_aec/dt_head.py).

Everything is causal in time (20 ms window, 10 ms hop: one VoIP frame per hop), so the model streams:
`stream()` takes one hop of mic and reference and every state (analysis buffers, the overlap-add buffer and
each dilated convolution's past frames) and gives one hop of near-end speech, `window - hop` samples late.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quell.models.adaptive import AdaptiveEchoFilter
from quell.models.layers import ComplexConv2d, D3Block, complex_activation, real_dft_matrices, upsample_frequency


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
    downsample: int = 0  # stride-2 frequency stages before the blocks (each halves their cost)
    filter_partitions: int = 0  # linear adaptive filter length in hops (0: no linear front end)
    filter_step: float = 0.5  # its NLMS step size (with filter_variable_step: the largest)
    filter_variable_step: bool = False  # per-bin step from the residual echo's share of the error (Valin 2007)
    # a double-talk detector on the network's own features (`DoubleTalkDetector`, trained to hear the near end;
    # 0: none) and the share of the mic that goes into the output where it says the near end talks while the
    # far end plays (10 dB of echo suppression at most there)
    presence_hidden: int = 0
    double_talk_mix: float = 0.3

    @property
    def bins(self) -> int:
        return self.window // 2 + 1


PRESENCE_BANDS = 8  # frequency bands of the double-talk detector's energy and mask features
FAR_SMOOTHING = 0.7  # one-pole smoothing of the reference's hop energy, per hop
FAR_ACTIVE = 1e-5  # smoothed reference energy above which the far end plays (-50 dBFS)
MIX_RELEASE = 0.9  # per-hop decay of the mic's share once double talk ends (a mix flickering on and off hurts)


class DoubleTalkDetector(nn.Module):
    """Per hop, whether the near end talks (as logits), from what the canceller computed: a causal GRU.

    It is trained on its own, behind the frozen canceller (recipes/d3net_aec/dt_head.py); its features are
    standardized by the training set's mean and spread (buffers). The canceller adds the far end's activity.
    """

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(inputs))
        self.register_buffer("std", torch.ones(inputs))
        self.gru = nn.GRU(inputs, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def logits(self, features: torch.Tensor, state: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, T, inputs] -> (logits [B, T], new GRU state [1, B, hidden])."""
        y, state = self.gru((features - self.mean) / self.std, state)
        return self.out(y).squeeze(-1), state


class D3NetAEC(nn.Module):
    """Mic + far-end reference -> near-end speech (echo and noise removed)."""

    task = "echo"
    stream_inputs = ("audio", "reference")
    has_sequence = False  # stream() takes one hop

    def __init__(self, config: D3NetAECConfig | None = None):
        super().__init__()
        cfg = self.config = config or D3NetAECConfig()
        # the linear filter is causal: it wants the echo's first arrival a little after the aligned reference,
        # as in training (the synthesizer's rooms put a few ms of flight between loudspeaker and mic)
        self.reference_lead = round(0.003 * cfg.sample_rate) if cfg.filter_partitions else 0
        if cfg.window != 2 * cfg.hop:
            raise ValueError("the sqrt-Hann overlap-add needs window == 2 * hop")
        self.linear = AdaptiveEchoFilter(cfg.hop, cfg.filter_partitions, cfg.filter_step,
                                         variable_step=cfg.filter_variable_step, sample_rate=cfg.sample_rate) \
            if cfg.filter_partitions else None
        # the filter's states model the echo path at the reference's alignment: the runtime zeroes them when the
        # alignment jumps (a newly found delay), so that weights for the old one need not be unlearnt first
        self.realign_states = tuple(f"filter_{name}" for name in self.linear.state_shapes()) if self.linear else ()
        self.encoder = ComplexConv2d(3 if self.linear else 2, cfg.channels, kernel_t=1)
        c = cfg.channels
        self.down = nn.ModuleList(ComplexConv2d(c, c, kernel_t=1, stride_f=2) for _ in range(cfg.downsample))
        self.blocks = nn.ModuleList(D3Block(cfg.channels, cfg.growth, cfg.layers) for _ in range(cfg.blocks))
        self.up = nn.ModuleList(ComplexConv2d(c, c, kernel_t=1) for _ in range(cfg.downsample))
        self.masks = ComplexConv2d(cfg.channels, 2, kernel_t=1)
        # a sqrt periodic Hann on both sides: analysis x synthesis sums to 1 at hop n/2
        n = cfg.window
        window = torch.sin(torch.pi * torch.arange(n, dtype=torch.float64) / n)
        forward, inverse = real_dft_matrices(n)
        self.register_buffer("dft_forward", (window[:, None] * forward).float(), persistent=False)  # -> [re | im]
        self.register_buffer("dft_inverse", (inverse * window[None, :]).float(), persistent=False)
        pool = torch.zeros(cfg.bins, PRESENCE_BANDS)  # band means, bands as torch.tensor_split cuts the bins
        for band, bins in enumerate(torch.arange(cfg.bins).tensor_split(PRESENCE_BANDS)):
            pool[bins, band] = 1.0 / len(bins)
        self.register_buffer("band_pool", pool, persistent=False)
        heard = 3 if self.linear else 2
        self.presence = DoubleTalkDetector(PRESENCE_BANDS * (3 + heard) + cfg.channels, cfg.presence_hidden) \
            if cfg.presence_hidden else None

    # ---- the spectral core: [B, n, T, 2F] spectra of the signals -> enhanced spectra -------------------------
    def _features(self, spectra: torch.Tensor) -> torch.Tensor:
        """Compressed complex features [B, 2n, T, F] of n spectra [B, n, T, 2F]: all real parts, then all
        imaginary parts (computed on all n at once: a third of the nodes in the step graph)."""
        cfg = self.config
        re, im = spectra[..., : cfg.bins], spectra[..., cfg.bins :]
        scale = (re * re + im * im + 1e-12) ** ((cfg.compress - 1) / 2)
        return torch.cat([re * scale, im * scale], dim=1)

    def _masks(self, spectra: torch.Tensor, blocks) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectra [B, n, T, 2F] -> (mask tensor [B, 4, T, F], the last decoder layer [B, 2C, T, F] it came from);
        `blocks` runs the D3 blocks (whole or one frame)."""
        features = self._features(spectra)
        if self.training:  # channels-last convolutions train 2-3x faster on CPU (same numbers)
            features = features.contiguous(memory_format=torch.channels_last)
        x = self.encoder(features)
        skips = []
        for down in self.down:
            skips.append(x)
            x = complex_activation(down(x))
        x = blocks(x)
        for up, skip in zip(self.up, reversed(skips), strict=True):
            x = complex_activation(up(upsample_frequency(x, skip.shape[-1]) + skip))
        return self.masks(x), x

    def presence_features(self, spectra: torch.Tensor, masks: torch.Tensor, near: torch.Tensor,
                          hidden: torch.Tensor) -> torch.Tensor:
        """The double-talk detector's features [B, T, D] per hop: the bounded echo and noise masks' magnitudes,
        the log energies of the output and of the signals heard, each in PRESENCE_BANDS bands, and the last
        decoder layer's channel magnitudes (means over frequency)."""
        bins = self.config.bins
        magnitudes = torch.tanh(torch.sqrt(masks[:, :2] ** 2 + masks[:, 2:] ** 2 + 1e-12))  # [B, 2, T, F]
        spectra = torch.cat([near.unsqueeze(1), spectra], 1)  # [B, 1 + n, T, 2F]
        powers = spectra[..., :bins] ** 2 + spectra[..., bins:] ** 2
        pooled = torch.cat([magnitudes, powers], 1) @ self.band_pool  # [B, 3 + n, T, bands]
        pooled = torch.cat([pooled[:, :2], torch.log10(pooled[:, 2:] + 1e-10)], 1)
        channels = hidden.shape[1] // 2
        hidden = torch.sqrt(hidden[:, :channels] ** 2 + hidden[:, channels:] ** 2 + 1e-12).mean(-1)  # [B, C, T]
        batch, count, frames, bands = pooled.shape
        return torch.cat([pooled.permute(0, 2, 1, 3).reshape(batch, frames, count * bands),
                          hidden.transpose(1, 2)], -1)

    def _double_talk_shares(self, logits: torch.Tensor, reference_hops: torch.Tensor, far_energy: torch.Tensor,
                            share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mic's share [B, T] per hop: `double_talk_mix` while the detector hears the near end (p > 0.5) and
        the far end plays (the reference hops [B, T, hop], their energy smoothed), else the last share decaying.
        Returns the shares and the last smoothed far-end energy and share [B, 1] (states when streaming)."""
        energies = (reference_hops**2).mean(-1)
        shares = []
        for t in range(logits.shape[1]):
            far_energy = FAR_SMOOTHING * far_energy + (1 - FAR_SMOOTHING) * energies[:, t : t + 1]
            talk = (logits[:, t : t + 1] > 0) & (far_energy > FAR_ACTIVE)
            share = torch.where(talk, torch.full_like(share, self.config.double_talk_mix), MIX_RELEASE * share)
            shares.append(share)
        return torch.cat(shares, 1), far_energy, share

    @staticmethod
    def _double_talk_mix(near: torch.Tensor, mic: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
        """The output spectrum [B, T, 2F] with the mic's [B, T, 2F] mixed in at `shares` [B, T] (before the
        inverse DFT: the synthesis window crossfades from hop to hop)."""
        return near + shares.unsqueeze(-1) * (mic - near)

    def _signals(self, mic: torch.Tensor, reference: torch.Tensor, states: list[torch.Tensor] | None = None):
        """The signals the network hears (the masked one first), and the filter's new states when streaming."""
        if self.linear is None:
            return [mic, reference], []
        if states is None:
            residual, estimate = self.linear(mic, reference)
            return [residual, estimate, reference], []
        residual, estimate, states = self.linear.step(mic, reference, states)
        return [residual, estimate, reference], states

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
        """[B, samples] mic and reference -> (near-end speech, mic without echo), time-aligned, same length.

        With a double-talk detector the near-end output has the mic mixed in where the detector hears the near end
        while the far end plays."""
        cfg = self.config
        length, overlap = mic.shape[-1], cfg.window - cfg.hop
        analysis = self.analyse(mic, reference)
        near, echo_free = analysis["near"], analysis["echo_free"]
        if self.presence is not None:
            logits, _ = self.presence.logits(self.presence_features(
                analysis["spectra"], analysis["masks"], near, analysis["hidden"]))
            hops = nn.functional.pad(reference, (0, (-length) % cfg.hop)).reshape(mic.shape[0], -1, cfg.hop)
            hops = nn.functional.pad(hops, (0, 0, 0, logits.shape[1] - hops.shape[1]))  # the last frame's: zeros
            zero = torch.zeros(mic.shape[0], 1)
            shares, _, _ = self._double_talk_shares(logits, hops, zero, zero)
            near = self._double_talk_mix(near, analysis["mic"], shares)
        return tuple(_overlap_add(s @ self.dft_inverse, cfg.hop)[..., overlap : overlap + length]
                     for s in (near, echo_free))

    def analyse(self, mic: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """Whole [B, samples] signals -> the spectra [B, T, 2F] of the near-end output and the mic without echo
        (and of the mic, with a detector), the spectra heard [B, n, T, 2F], the masks and the last decoder layer
        (as `_masks`)."""
        cfg = self.config
        overlap = cfg.window - cfg.hop
        mic, reference = (nn.functional.pad(x, (0, (-mic.shape[-1]) % cfg.hop)) for x in (mic, reference))
        signals, _ = self._signals(mic, reference)
        if self.presence is not None:  # the mic too, last, for the double-talk mix
            signals = [*signals, mic]
        spectra = torch.stack([_frames(nn.functional.pad(x, (overlap, overlap)), cfg) for x in signals], 1) \
            @ self.dft_forward  # [B, n, T, 2F]

        def blocks(x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

        analysis = {"spectra": spectra} if self.presence is None else {"spectra": spectra[:, :-1],
                                                                       "mic": spectra[:, -1]}
        analysis["masks"], analysis["hidden"] = self._masks(analysis["spectra"], blocks)
        analysis["near"], analysis["echo_free"] = self._apply_masks(analysis["spectra"][:, 0], analysis["masks"])
        return analysis

    # ---- streaming: one hop with explicit states ----------------------------------------------------------------
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the streaming states, in the order `stream` takes and returns them."""
        cfg = self.config
        overlap = cfg.window - cfg.hop
        shapes: dict[str, tuple[int, ...]] = {}
        if self.linear is not None:
            shapes.update({f"filter_{name}": shape for name, shape in self.linear.state_shapes().items()})
        names = ["mic", "estimate", "reference"] if self.linear is not None else ["mic", "reference"]
        shapes.update({f"{name}_buffer": (1, overlap) for name in names})
        shapes["output_buffer"] = (1, overlap)
        bins = cfg.bins
        for _ in range(cfg.downsample):
            bins = (bins + 1) // 2
        for b, block in enumerate(self.blocks):
            for g, frames in enumerate(block.history_frames()):
                shapes[f"block{b}_group{g}"] = (1, 2 * block.group_channels[g], frames, bins)
        if self.presence is not None:  # the mic's analysis buffer (for the mix), the detector's GRU, the mix
            shapes["presence_mic_buffer"] = (1, overlap)
            shapes["presence_state"] = (1, 1, cfg.presence_hidden)
            shapes["presence_far_energy"] = (1, 1)
            shapes["presence_share"] = (1, 1)
        return shapes

    def initial_states(self) -> list[torch.Tensor]:
        """Zero states for `stream`."""
        return [torch.zeros(shape) for shape in self.state_shapes().values()]

    def stream(
        self, mic: torch.Tensor, reference: torch.Tensor, states: list[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """One hop [1, hop] of mic and reference -> (near-end hop, *new states), `window - hop` samples late."""
        cfg = self.config
        filter_count = len(self.linear.state_shapes()) if self.linear is not None else 0
        signals, filter_states = self._signals(mic, reference, states[:filter_count] if filter_count else None)
        *buffers, output_buffer = states[filter_count : filter_count + len(signals) + 1]
        start = filter_count + len(signals) + 1
        history_count = sum(len(block.history_frames()) for block in self.blocks)
        histories = states[start : start + history_count]
        presence_states = states[start + history_count :]  # mic buffer, GRU, far energy, share: with a detector
        heard = len(signals)
        if self.presence is not None:
            signals, buffers = [*signals, mic], [*buffers, presence_states[0]]
        frames = [torch.cat([buffer, signal], -1) for buffer, signal in zip(buffers, signals, strict=True)]
        spectra = (torch.stack(frames, 1) @ self.dft_forward).unsqueeze(2)  # [1, n, 1, 2F]: one MatMul
        new_histories: list[torch.Tensor] = []

        def blocks(x: torch.Tensor) -> torch.Tensor:
            position = 0
            for block in self.blocks:
                count = len(block.history_frames())
                x, updated = block.step(x, histories[position : position + count])
                new_histories.extend(updated)
                position += count
            return x

        heard_spectra = spectra if self.presence is None else spectra[:, :heard]  # the mic's is for the mix only
        masks, hidden = self._masks(heard_spectra, blocks)
        near, _ = self._apply_masks(spectra[:, 0], masks)
        new_presence: list[torch.Tensor] = []
        if self.presence is not None:
            logits, gru_state = self.presence.logits(
                self.presence_features(heard_spectra, masks, near, hidden), presence_states[1])
            shares, far_energy, share = self._double_talk_shares(logits, reference.unsqueeze(1), *presence_states[2:])
            near = self._double_talk_mix(near, spectra[:, heard], shares)
            new_presence = [frames[heard][:, cfg.hop :], gru_state, far_energy, share]
        summed = (near[:, 0] @ self.dft_inverse) + nn.functional.pad(output_buffer, (0, cfg.hop))
        out, new_output = torch.split(summed, [cfg.hop, cfg.window - cfg.hop], dim=-1)
        return (out, *filter_states, *(f[:, cfg.hop :] for f in frames[:heard]), new_output, *new_histories,
                *new_presence)


def _frames(signal: torch.Tensor, cfg: D3NetAECConfig) -> torch.Tensor:
    """[B, samples] -> [B, T, window] frames every hop (window == 2 * hop)."""
    blocks = signal.reshape(signal.shape[0], -1, cfg.hop)
    return torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=-1)


def _overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """[B, T, 2 * hop] -> [B, (T + 1) * hop]."""
    first, second = frames[..., :hop], frames[..., hop:]
    pad = nn.functional.pad
    return (pad(first, (0, 0, 0, 1)) + pad(second, (0, 0, 1, 0))).reshape(frames.shape[0], -1)
