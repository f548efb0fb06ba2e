"""`quell bench`: what a model costs on this machine, on one thread.

- step graph: per-hop latency of `StreamingModel.step` (p50, p99, max) over many hops;
- streaming: real-time factor of `Denoiser.process` on 10 ms chunks at the model rate;
- sequence graph: real-time factor of `StreamingModel.process` over a long signal, and of `quell denoise` on a
  48 kHz WAV file of that length (reading, resampling and writing included);
- model load time and the process's peak resident memory;
- `compare_steps`: the step cost of several models in interleaved rounds, for comparisons on a machine whose
  speed drifts (a shared VM: one p50 of the same graph read anywhere from 0.52 to 0.89 ms minutes apart);
  a folder in the DTLN release's two-graph layout takes part as the release's own runtime drives it
  (`ReleaseRuntime`).
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from quell.streaming.card import ModelCard
from quell.streaming.catalog import find_model
from quell.streaming.denoiser import Denoiser
from quell.streaming.engine import StreamingModel, make_session
from quell.streaming.files import FileEnhancer

RELEASE_GRAPHS = ("model_1.onnx", "model_2.onnx")  # the DTLN release's file names (quell/export/release.py)


class ReleaseRuntime:
    """A DTLN in the two-graph layout of the authors' ONNX release, run hop by hop as their
    `real_time_processing_onnx.py` runs it: numpy rfft, magnitude and phase; `session.run` of model_1 (mask);
    the masked spectrum back to a frame by numpy irfft; `session.run` of model_2; frame scaled by hop / window
    and overlap-added. Graph inputs and outputs are taken by position, as there, so the release's own files
    work too. One thread per session, as quell's engine runs.
    """

    sample_rate, hop, window = 16000, 128, 512

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.sessions = [make_session(folder / name) for name in RELEASE_GRAPHS]
        self.feeds = [{i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
                       for i in s.get_inputs()} for s in self.sessions]
        self.input_names = [[i.name for i in s.get_inputs()] for s in self.sessions]
        self.in_buffer = np.zeros(self.window, np.float32)
        self.out_buffer = np.zeros(self.window, np.float32)

    @staticmethod
    def is_release_folder(path: str | Path) -> bool:
        """Whether `path` is a folder holding the release's two graphs."""
        return Path(path).is_dir() and all((Path(path) / name).is_file() for name in RELEASE_GRAPHS)

    def step(self, audio: np.ndarray) -> np.ndarray:
        """One hop in, one hop out (delayed by window - hop samples, as quell's DTLN step graph)."""
        hop, (mask_feeds, frame_feeds), (mask_names, frame_names) = self.hop, self.feeds, self.input_names
        self.in_buffer[:-hop] = self.in_buffer[hop:]
        self.in_buffer[-hop:] = audio
        spectrum = np.fft.rfft(self.in_buffer)
        magnitude, phase = np.abs(spectrum), np.angle(spectrum)
        mask_feeds[mask_names[0]] = np.reshape(magnitude, (1, 1, -1)).astype(np.float32)
        mask, mask_feeds[mask_names[1]] = self.sessions[0].run(None, mask_feeds)
        frame = np.fft.irfft(magnitude * mask * np.exp(1j * phase))
        frame_feeds[frame_names[0]] = np.reshape(frame, (1, 1, -1)).astype(np.float32)
        out_frame, frame_feeds[frame_names[1]] = self.sessions[1].run(None, frame_feeds)
        out_frame *= hop / self.window
        self.out_buffer[:-hop] = self.out_buffer[hop:]
        self.out_buffer[-hop:] = 0.0
        self.out_buffer += np.squeeze(out_frame)
        return self.out_buffer[:hop]


def _test_signal(seconds: float, rate: int) -> np.ndarray:
    """A voiced-like tone in noise: the cost of these models does not depend on the signal."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    voiced = 0.2 * np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return (voiced + 0.03 * rng.standard_normal(t.size)).astype(np.float32)


def benchmark(model: str | Path | ModelCard = "dtln", hops: int = 10000, seconds: float = 60.0) -> dict:
    """Measure the model; returns a dict of results (times in milliseconds, factors in x real time)."""
    card = find_model(model)
    started = time.perf_counter()
    engine = StreamingModel(card, threads=1)
    load_ms = (time.perf_counter() - started) * 1e3
    hop = card.hop
    signal = _test_signal(max(seconds, hops * hop / card.sample_rate), card.sample_rate)
    _step_times(engine, hop, signal, 200)  # warm-up
    times = _step_times(engine, hop, signal, hops)
    hop_ms = hop / card.sample_rate * 1e3

    audio = signal[: int(seconds * card.sample_rate) // hop * hop]
    denoiser = Denoiser(card, sample_rate=card.sample_rate)
    chunk = card.sample_rate // 100  # 10 ms, what VoIP stacks hand over
    t0 = time.perf_counter()
    for start in range(0, audio.size, chunk):
        denoiser.process(audio[start : start + chunk])
    streaming_rtf = audio.size / card.sample_rate / (time.perf_counter() - t0)

    results = {
        "model": card.name, "sample_rate": card.sample_rate, "hop_ms": hop_ms, "hops_timed": hops,
        "step_p50_ms": float(np.percentile(times, 50)), "step_p99_ms": float(np.percentile(times, 99)),
        "step_max_ms": float(times.max()), "step_mean_ms": float(times.mean()),
        "streaming_rtf": streaming_rtf, "load_ms": load_ms, "signal_seconds": audio.size / card.sample_rate,
    }
    if card.sequence_graph:
        engine.reset()
        t0 = time.perf_counter()
        engine.process(audio)
        results["sequence_rtf"] = audio.size / card.sample_rate / (time.perf_counter() - t0)
    results["file_rtf"] = _file_rtf(card, audio)
    results["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def _step_times(engine: StreamingModel | ReleaseRuntime, hop: int, signal: np.ndarray, hops: int) -> np.ndarray:
    """Milliseconds of each of `hops` steps over consecutive hops of `signal` (the model's input only)."""
    times = np.empty(hops)
    for i in range(hops):
        chunk = signal[i * hop : (i + 1) * hop]
        t0 = time.perf_counter()
        engine.step(chunk)
        times[i] = time.perf_counter() - t0
    return times * 1e3


def compare_steps(models: list[str | Path | ModelCard], rounds: int = 16, hops: int = 1000) -> dict[str, dict]:
    """Per-hop step cost of each model, timed in `rounds` interleaved rounds of `hops` hops (A, B, ..., A, B, ...):
    whatever slows the machine slows every model alike. Per model: the p50 of each round, their median and min.
    A folder in the DTLN release's layout (`ReleaseRuntime.is_release_folder`) is run as the release runs it."""
    names = [str(m) for m in models]
    if len(set(names)) != len(names):
        raise ValueError("compare distinct models")
    engines: list[StreamingModel | ReleaseRuntime] = [
        ReleaseRuntime(m) if not isinstance(m, ModelCard) and ReleaseRuntime.is_release_folder(m)
        else StreamingModel(find_model(m), threads=1) for m in models]
    rates_hops = [(e.sample_rate, e.hop) if isinstance(e, ReleaseRuntime) else (e.card.sample_rate, e.card.hop)
                  for e in engines]
    signals = [_test_signal(hops * hop / rate, rate) for rate, hop in rates_hops]
    rounds_ms: list[list[float]] = [[] for _ in engines]
    for _ in range(rounds + 1):  # the first round warms up
        for engine, (_, hop), signal, result in zip(engines, rates_hops, signals, rounds_ms, strict=True):
            result.append(float(np.percentile(_step_times(engine, hop, signal, hops), 50)))
    return {name: {"round_p50_ms": result[1:], "median_p50_ms": float(np.median(result[1:])),
                   "min_p50_ms": float(min(result[1:]))} for name, result in zip(names, rounds_ms, strict=True)}


def format_comparison(results: dict[str, dict], hops: int) -> str:
    """`compare_steps` as a short report."""
    rounds = len(next(iter(results.values()))["round_p50_ms"])
    lines = [f"step graph, one thread, {rounds} interleaved rounds of {hops} hops: p50 per round"]
    for name, r in results.items():
        lines.append(f"{name}  median {r['median_p50_ms']:.4f} ms  min {r['min_p50_ms']:.4f} ms")
    return "\n".join(lines)


def _file_rtf(card: ModelCard, audio: np.ndarray, rate: int = 48000) -> float:
    """x real time of enhancing a `rate` WAV file holding `audio` (resampled), as `quell denoise` does."""
    import soundfile as sf
    import soxr

    enhancer = FileEnhancer(card)
    with tempfile.TemporaryDirectory() as folder:
        src, dst = Path(folder) / "in.wav", Path(folder) / "out.wav"
        sf.write(src, soxr.resample(audio, card.sample_rate, rate), rate, subtype="PCM_16")
        t0 = time.perf_counter()
        seconds = enhancer.enhance(src, dst)
        return seconds / (time.perf_counter() - t0)


def format_report(r: dict) -> str:
    """The benchmark as a short human-readable report."""
    lines = [
        f"model {r['model']} ({r['sample_rate']} Hz, hop {r['hop_ms']:.1f} ms), one thread",
        f"step graph   p50 {r['step_p50_ms']:.4f} ms  p99 {r['step_p99_ms']:.4f} ms  max {r['step_max_ms']:.3f} ms"
        f"  per hop over {r['hops_timed']} hops ({r['hop_ms'] / r['step_p50_ms']:.0f}x real time at p50)",
        f"streaming    {r['streaming_rtf']:.0f}x real time (Denoiser.process, 10 ms chunks)",
    ]
    if "sequence_rtf" in r:
        lines.append(f"sequence     {r['sequence_rtf']:.0f}x real time ({r['signal_seconds']:.0f} s signal)")
    lines.append(f"file         {r['file_rtf']:.0f}x real time (a 48 kHz WAV of that length, read to written)")
    lines.append(f"load {r['load_ms']:.0f} ms, peak memory {r['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)
