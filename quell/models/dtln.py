"""DTLN: the Dual-signal Transformation LSTM Network (Westhausen & Meyer, Interspeech 2020).

Stage 1 predicts a magnitude mask on the STFT of a 512-sample frame (the "norm" variant: the log magnitude is
normalised by an instant layer norm); stage 2 encodes the resulting time frame with a learned basis, predicts
a mask on it, decodes and overlap-adds. Frames have no analysis window, as in the original, unless
`analysis_window` is "hann": a rectangular window leaks every harmonic into its neighbours (sidelobes 13 dB
down), so no mask can take out the noise between them; a mask computed from the clean target itself scores
DNSMOS OVRL 2.69 and PESQ-WB 2.55 on the validation set with none, 2.79 and 3.56 with square-root Hann windows
(recipes/dtln/README.md). The window is folded into the DFT basis, so it costs nothing per hop. With
`mask_bands` stage 1 predicts one gain per ERB band instead of one per bin, spread over the bins by fixed
triangles.

The same module runs in two ways:
- `forward(noisy)` for training: whole signals, time-aligned output, torch.fft for the DFT;
- `stream(audio, states)` for export: a block of hops in, the same number of enhanced hops out, every buffer
  and LSTM state explicit. Its output is the enhanced signal delayed by `window - hop` samples. With
  `dft="matmul"` the DFT is a product with a fixed basis, which is cheaper than an FFT node per hop. With
  `dft="sliding"` (rectangular frames whose hop is a quarter or a half of the window) each hop's samples are
  transformed once, as if they started a frame, and the partial DFTs of the frames still to come are carried
  as a state: a frame's DFT is the sum of its blocks' DFTs, each turned by where the block sits in the frame,
  and those turns are whole quarter turns per bin, exact swaps of real and imaginary parts and of signs. That
  is a quarter of a full frame's products per hop (the step graph's largest product).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from quell.models.layers import band_spread_matrix, real_dft_matrices


@dataclass
class DTLNConfig:
    """Sizes of a DTLN; the defaults are the published model (about 1 M parameters)."""

    sample_rate: int = 16000
    window: int = 512
    hop: int = 128
    hidden: int = 128
    layers: int = 2
    encoder: int = 256
    dropout: float = 0.25
    eps: float = 1e-7
    mask_bands: int = 0  # stage 1's gains: 0, one per bin (published); N, one per ERB band, spread over the bins
    analysis_window: str = "none"  # stage 1's DFT: "none" (rectangular, published) or "hann" (periodic)

    @property
    def bins(self) -> int:
        return self.window // 2 + 1


class LSTMStack(nn.Module):
    """Single-layer LSTMs in series (dropout between), so each layer's (h, c) is its own state tensor."""

    def __init__(self, input_size: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        sizes = [input_size] + [hidden] * (layers - 1)
        self.layers = nn.ModuleList(nn.LSTM(size, hidden, batch_first=True) for size in sizes)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, states: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        new_states: list[torch.Tensor] = []
        for i, lstm in enumerate(self.layers):
            if i > 0:
                x = self.dropout(x)
            if states is None:
                x, (h, c) = lstm(x)
            else:
                x, (h, c) = lstm(x, (states[2 * i], states[2 * i + 1]))
            new_states += [h, c]
        return x, new_states


class DTLN(nn.Module):
    """The two-stage DTLN noise suppressor."""

    task = "denoise"
    stream_inputs = ("audio",)
    has_sequence = True  # stream() also takes many hops at once

    def __init__(self, config: DTLNConfig | None = None):
        super().__init__()
        cfg = self.config = config or DTLNConfig()
        self.stft_norm = nn.LayerNorm(cfg.bins, eps=cfg.eps)
        self.lstm1 = LSTMStack(cfg.bins, cfg.hidden, cfg.layers, cfg.dropout)
        self.mask1 = nn.Linear(cfg.hidden, cfg.mask_bands or cfg.bins)
        self.encoder = nn.Linear(cfg.window, cfg.encoder, bias=False)
        self.encoder_norm = nn.LayerNorm(cfg.encoder, eps=cfg.eps)
        self.lstm2 = LSTMStack(cfg.encoder, cfg.hidden, cfg.layers, cfg.dropout)
        self.mask2 = nn.Linear(cfg.hidden, cfg.encoder)
        self.decoder = nn.Linear(cfg.encoder, cfg.window, bias=False)
        if cfg.analysis_window not in ("none", "hann"):
            raise ValueError(f"analysis_window is 'none' or 'hann', not {cfg.analysis_window!r}")
        window = torch.hann_window(cfg.window, dtype=torch.float64) if cfg.analysis_window == "hann" else None
        self.register_buffer("analysis", None if window is None else window.float(), persistent=False)
        self.dft = "fft"
        self._make_dft_basis()
        if cfg.mask_bands:
            spread = band_spread_matrix(cfg.bins, cfg.mask_bands, cfg.sample_rate)
            self.register_buffer("band_spread", spread.float(), persistent=False)

    def _make_dft_basis(self) -> None:
        """Real DFT and its inverse as matrices: frame @ forward = [re | im] (of the windowed frame);
        [re | im] @ inverse = frame."""
        forward, inverse = real_dft_matrices(self.config.window)
        if self.analysis is not None:
            forward = self.analysis.double()[:, None] * forward
        self.register_buffer("dft_forward", forward.float(), persistent=False)
        self.register_buffer("dft_inverse", inverse.float(), persistent=False)
        if self.slides:
            self.register_buffer("dft_block", forward[: self.config.hop].float(), persistent=False)
            blocks = self.config.window // self.config.hop
            # a block at every position of a frame, newest (the frame's end) first; then the turns R^d,
            # d = blocks / 2, blocks / 4, ..., 1, that sum many blocks in halves
            turns = {"placed": list(range(blocks - 1, -1, -1))}
            turns.update({f"half_{d}": [d] for d in _halvings(blocks)})
            for name, distances in turns.items():
                same, swapped = zip(*(_quarter_turn(self.config, d) for d in distances), strict=True)
                self.register_buffer(f"turn_{name}_same", torch.stack(same), persistent=False)
                self.register_buffer(f"turn_{name}_swapped", torch.stack(swapped), persistent=False)

    @property
    def slides(self) -> bool:
        """Whether the DFT can slide (`dft="sliding"`): rectangular frames, a hop of a quarter or half window."""
        cfg = self.config
        return self.analysis is None and cfg.window % cfg.hop == 0 and cfg.window // cfg.hop in (2, 4)

    @property
    def export_dft(self) -> str:
        """The cheapest DFT form per hop for the exported graphs: "sliding" where it can, else "matmul"."""
        return "sliding" if self.slides else "matmul"

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights of a per-bin DTLN made fit for this band-gain one (or `state` as it is): each band's mask
        logit starts as the average of its bins' logits, weighted by the band's triangle."""
        cfg = self.config
        weight, bias = state["mask1.weight"], state["mask1.bias"]
        if not cfg.mask_bands or weight.shape[0] != cfg.bins:
            return state
        average = self.band_spread / self.band_spread.sum(1, keepdim=True)
        return {**state, "mask1.weight": average @ weight, "mask1.bias": average @ bias}

    # ---- the core: frames in, frames out ------------------------------------------------------------------
    def _enhance_frames(
        self, frames: torch.Tensor, states: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Enhance [batch, n_frames, window] time frames; returns frames of the same shape and new LSTM states."""
        return self._enhance_spectra(self._spectra(frames), states)

    def _spectra(self, frames: torch.Tensor) -> torch.Tensor:
        """[batch, n_frames, window] time frames -> their [batch, n_frames, 2, bins] DFTs (real, imaginary)."""
        cfg = self.config
        if self.dft == "fft":
            spec = torch.fft.rfft(frames if self.analysis is None else frames * self.analysis, dim=-1)
            return torch.stack([spec.real, spec.imag], dim=-2)
        # [..., 2, bins]: real and imaginary parts as one tensor, fewer nodes once exported
        return (frames @ self.dft_forward).reshape(frames.shape[0], -1, 2, cfg.bins)

    def _enhance_spectra(
        self, spec: torch.Tensor, states: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Enhance frames given as [batch, n_frames, 2, bins] DFTs; returns time frames and new LSTM states."""
        cfg = self.config
        s1 = None if states is None else states[: 2 * cfg.layers]
        s2 = None if states is None else states[2 * cfg.layers :]
        magnitude = torch.sqrt((spec * spec).sum(-2) + cfg.eps * cfg.eps)
        gains, new1 = self.stage1_gains(magnitude, s1)
        masked = spec * gains.unsqueeze(-2)
        if self.dft == "fft":
            encoded = self.encoder(torch.fft.irfft(torch.complex(masked[..., 0, :], masked[..., 1, :]),
                                                   n=cfg.window, dim=-1))
        else:  # inverse DFT and encoder are both linear: one product, a constant once exported
            encoded = masked.reshape(spec.shape[0], -1, 2 * cfg.bins) @ (self.dft_inverse @ self.encoder.weight.T)
        masked_encoded, new2 = self.stage2_masked(encoded, s2)
        return self.decoder(masked_encoded), new1 + new2

    def stage1_gains(
        self, magnitude: torch.Tensor, states: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage 1: the DFT magnitudes of frames -> their gains per bin, and the new LSTM states."""
        x, new = self.lstm1(self.stft_norm(torch.log(magnitude + self.config.eps)), states)
        gains = torch.sigmoid(self.mask1(x))
        return (gains @ self.band_spread if self.config.mask_bands else gains), new

    def stage2_masked(
        self, encoded: torch.Tensor, states: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage 2 up to the decoder: encoded frames -> masked encoded frames, and the new LSTM states."""
        x, new = self.lstm2(self.encoder_norm(encoded), states)
        return encoded * torch.sigmoid(self.mask2(x)), new

    # ---- training: whole signals ----------------------------------------------------------------------------
    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """Enhance [batch, samples] signals; the output is time-aligned with the input and of the same length."""
        cfg = self.config
        length = noisy.shape[-1]
        overlap = cfg.window - cfg.hop
        tail = (-length) % cfg.hop
        padded = nn.functional.pad(noisy, (overlap, overlap + tail))
        frames, _ = self._enhance_frames(frame_signal(padded, cfg.window, cfg.hop))
        out = overlap_add(frames, cfg.hop)
        return out[..., overlap : overlap + length]

    # ---- streaming: a block of hops with explicit states -------------------------------------------------------
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes (batch 1) of the streaming states, in the order `stream` takes and returns them."""
        cfg = self.config
        overlap = cfg.window - cfg.hop
        if self.dft == "sliding":  # the partial DFTs of the next window / hop - 1 frames instead of samples
            shapes: dict[str, tuple[int, ...]] = {"input_spectra": (1, (cfg.window // cfg.hop - 1) * 2 * cfg.bins)}
        else:
            shapes = {"input_buffer": (1, overlap)}
        shapes["output_buffer"] = (1, overlap)
        for stage in (1, 2):
            for layer in range(cfg.layers):
                shapes[f"lstm{stage}_{layer}_h"] = (1, 1, cfg.hidden)
                shapes[f"lstm{stage}_{layer}_c"] = (1, 1, cfg.hidden)
        return shapes

    def initial_states(self) -> list[torch.Tensor]:
        """Zero states for `stream`."""
        return [torch.zeros(shape) for shape in self.state_shapes().values()]

    def stream(
        self, audio: torch.Tensor, states: list[torch.Tensor], single_hop: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Enhance [1, n_hops * hop] samples given the states; returns (enhanced hops, *new states).

        The enhanced signal is delayed by `window - hop` samples: hop k of the output holds the samples that
        were complete once input hop k had arrived. `single_hop` builds the step graph without framing ops.
        """
        cfg = self.config
        input_buffer, output_buffer, *lstm_states = states
        overlap = cfg.window - cfg.hop
        if self.dft == "sliding":
            spec, new_input_buffer = self._slide(audio, input_buffer, single_hop)
        else:
            signal = torch.cat([input_buffer, audio], dim=-1)
            spec = self._spectra(signal.unsqueeze(1) if single_hop else frame_signal(signal, cfg.window, cfg.hop))
            new_input_buffer = signal[:, -overlap:]
        frames, new_lstm = self._enhance_spectra(spec, lstm_states)
        # [1, (n_hops + window / hop - 1) * hop]; one frame needs no overlap-add
        summed = frames.reshape(1, cfg.window) if single_hop else overlap_add(frames, cfg.hop)
        summed = summed + nn.functional.pad(output_buffer, (0, audio.shape[-1]))
        enhanced, new_output_buffer = torch.split(summed, [audio.shape[-1], overlap], dim=-1)
        return (enhanced, new_input_buffer, new_output_buffer, *new_lstm)

    def _slide(
        self, audio: torch.Tensor, partial: torch.Tensor, single_hop: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sliding DFT: [1, n_hops * hop] samples and the partial DFTs of the next window / hop - 1 frames
        (the sums over their blocks so far) -> the [1, n_hops, 2, bins] DFTs of the frames that end with these
        hops, and the new partial DFTs.

        Each block's DFT is taken as if the block started a frame (C); a frame of blocks b_0 .. b_{B-1}, oldest
        first, has the DFT sum_p R^p C(b_p), R the turn of one hop. One hop is placed at all its B positions at
        once (B turned copies); many hops are summed in halves, e.g. for B = 4, (C0 + R^2 C2) + R (C1 + R^2 C3),
        two turned copies of every block instead of four, which the sequence graph's memory traffic prefers.
        Either way the frames' sums overlap-add with the partial ones, as the decoder's frames do in time.
        """
        cfg = self.config
        if not self.slides:
            raise ValueError("the DFT slides only over rectangular frames with a hop of a quarter or half window")
        blocks, n_hops, width = cfg.window // cfg.hop, audio.shape[-1] // cfg.hop, 2 * cfg.bins
        dfts = (audio.reshape(1, -1, cfg.hop) @ self.dft_block).reshape(1, -1, 2, cfg.bins)
        if single_hop:
            summed = self._turned(dfts, "placed").reshape(1, -1)  # [1, blocks * width], this frame first
            summed = summed + torch.cat([partial, partial.new_zeros(1, width)], dim=-1)
        else:  # the sums of every frame that holds a new block (the first and last blocks - 1 of them partial)
            edge = dfts.new_zeros(1, blocks - 1, 2, cfg.bins)
            sums = torch.cat([edge, dfts, edge], dim=1)
            for distance in _halvings(blocks):
                later = self._turned(sums[:, distance:], f"half_{distance}")
                sums = sums[:, : sums.shape[1] - distance] + later
            summed = sums.reshape(1, -1) + nn.functional.pad(partial, (0, n_hops * width))
        spectra, new_partial = torch.split(summed, [n_hops * width, partial.shape[-1]], dim=-1)
        return spectra.reshape(1, -1, 2, cfg.bins), new_partial

    def _turned(self, dfts: torch.Tensor, name: str) -> torch.Tensor:
        """[1, n, 2, bins] block DFTs turned by the factors `turn_{name}_*` ([k, 2, bins]): k == 1, each
        turned; else [1, n, k, 2, bins], each at k positions."""
        same, swapped = getattr(self, f"turn_{name}_same"), getattr(self, f"turn_{name}_swapped")
        if same.shape[0] > 1:
            dfts = dfts.unsqueeze(2)
        else:
            same, swapped = same[0], swapped[0]
        if not bool(swapped.any()):  # whole half turns only: signs
            return dfts * same
        return dfts * same + dfts.flip(-2) * swapped


def _halvings(blocks: int) -> list[int]:
    """blocks / 2, blocks / 4, ..., 1: the distances at which `DTLN._slide` sums a frame's blocks in halves."""
    return [blocks >> level for level in range(1, blocks.bit_length())]


def _quarter_turn(config: DTLNConfig, distance: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The turn of a block's DFT, laid out [2, bins] (re, im), when the block moves `distance` hops later in a
    frame: [2, bins] factors of (re, im) and of (im, re).

    Bin k turns by -2 pi k distance hop / window: q = 4 k distance hop / window quarter turns (a whole number
    when 4 hop is a multiple of the window), times (-j)^q, which maps (re, im) to (re, im), (im, -re),
    (-re, -im) or (-im, re) for q = 0, 1, 2, 3.
    """
    k = torch.arange(config.bins)
    q = (4 * k * distance * config.hop // config.window) % 4
    even = torch.where(q == 0, 1.0, torch.where(q == 2, -1.0, 0.0))
    odd = torch.where(q == 1, 1.0, torch.where(q == 3, -1.0, 0.0))
    return torch.stack([even, even]), torch.stack([odd, -odd])


def frame_signal(signal: torch.Tensor, window: int, hop: int) -> torch.Tensor:
    """[batch, samples] (a multiple of hop) -> [batch, n_frames, window] frames, one every hop.

    Built from hop-sized blocks rather than `unfold`, which the exporter would specialise to one length.
    """
    blocks = signal.reshape(signal.shape[0], -1, hop)
    per_frame = window // hop
    n_frames = blocks.shape[1] - per_frame + 1
    return torch.cat([blocks[:, b : b + n_frames] for b in range(per_frame)], dim=-1)


def overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """Overlap-add [batch, n_frames, window] frames (window a multiple of hop) into [batch, samples]."""
    batch, n_frames, window = frames.shape
    blocks = window // hop
    parts = frames.reshape(batch, n_frames, blocks, hop)
    out = frames.new_zeros(batch, n_frames + blocks - 1, hop)
    for b in range(blocks):
        out = out + nn.functional.pad(parts[:, :, b], (0, 0, b, blocks - 1 - b))
    return out.reshape(batch, -1)


def config_dict(config: DTLNConfig) -> dict:
    """The config as a plain dict (for checkpoints and model cards)."""
    return asdict(config)
