"""`quell bench`: what a model costs on this machine, on one thread.

- step graph: per-hop latency of `StreamingModel.step` (p50, p99, max) over many hops;
- streaming: real-time factor of `Denoiser.process` on 10 ms chunks at the model rate;
- sequence graph: real-time factor of `StreamingModel.process` over a long signal, and of `quell denoise` on a
  48 kHz WAV file of that length (reading, resampling and writing included);
- model load time and the process's peak resident memory;
- `compare_steps`: the step cost of several models in interleaved rounds, for comparisons on a machine whose
  speed drifts (a shared VM: one p50 of the same graph read anywhere from 0.52 to 0.89 ms minutes apart).
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
from quell.streaming.engine import StreamingModel
from quell.streaming.files import FileEnhancer


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
    _step_times(engine, signal, 200)  # warm-up
    times = _step_times(engine, signal, hops)
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


def _step_times(engine: StreamingModel, signal: np.ndarray, hops: int) -> np.ndarray:
    """Milliseconds of each of `hops` steps over consecutive hops of `signal` (the model's input only)."""
    hop, times = engine.card.hop, np.empty(hops)
    for i in range(hops):
        chunk = signal[i * hop : (i + 1) * hop]
        t0 = time.perf_counter()
        engine.step(chunk)
        times[i] = time.perf_counter() - t0
    return times * 1e3


def compare_steps(models: list[str | Path | ModelCard], rounds: int = 16, hops: int = 1000) -> dict[str, dict]:
    """Per-hop step cost of each model, timed in `rounds` interleaved rounds of `hops` hops (A, B, ..., A, B, ...):
    whatever slows the machine slows every model alike. Per model: the p50 of each round, their median and min."""
    cards = [find_model(m) for m in models]
    names = [str(m) for m in models]
    if len(set(names)) != len(names):
        raise ValueError("compare distinct models")
    engines = [StreamingModel(card, threads=1) for card in cards]
    signals = [_test_signal(hops * card.hop / card.sample_rate, card.sample_rate) for card in cards]
    rounds_ms: list[list[float]] = [[] for _ in cards]
    for _ in range(rounds + 1):  # the first round warms up
        for engine, signal, result in zip(engines, signals, rounds_ms, strict=True):
            result.append(float(np.percentile(_step_times(engine, signal, hops), 50)))
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
