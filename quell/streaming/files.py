"""Offline enhancement of files and folders: chunked (memory does not grow with length), atomic, parallel.

Each file is read in blocks, resampled to the model rate with soxr (streaming, high quality), run through the
model's sequence graph with carried states, trimmed of the model's delay so the output is time-aligned with
the input, resampled back and written to a temporary file that is renamed into place only when complete.
`AlignedStream` is that path without the files, for in-memory signals (evaluation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from quell.streaming.card import ModelCard
from quell.streaming.catalog import find_model
from quell.streaming.engine import StreamingModel, make_session

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}
_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}
_BLOCK_SECONDS = 20.0


class FileError(Exception):
    """A file that cannot be processed; the message is one line for the user."""


@dataclass
class FileResult:
    """What happened to one file: status is "done", "skipped" or "failed"."""

    src: Path
    dst: Path
    status: str
    seconds: float = 0.0  # audio duration
    message: str = ""


@dataclass
class BatchSummary:
    """Totals of a batch run."""

    results: list[FileResult] = field(default_factory=list)
    wall_seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def audio_seconds(self) -> float:
        return sum(r.seconds for r in self.results if r.status == "done")

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio enhanced per second of wall time."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.count('done')} enhanced, {self.count('skipped')} skipped, {self.count('failed')} failed; "
                f"{self.audio_seconds / 3600:.3f} h of audio in {self.wall_seconds:.1f} s "
                f"({self.realtime_factor:.0f}x real time)")


class FileEnhancer:
    """Enhances files with one model; sessions are loaded once and reused for every file and channel."""

    def __init__(self, model: str | Path | ModelCard = "dtln", threads: int = 1):
        self.card = find_model(model)
        self.sessions = {"step": make_session(self.card.graph_path("step"), threads)}
        if self.card.sequence_graph:
            self.sessions["sequence"] = make_session(self.card.graph_path("sequence"), threads)

    def enhance(self, src: str | Path, dst: str | Path, overwrite: bool = False, subtype: str | None = None,
                reference: str | Path | None = None, report: Callable[[str], None] | None = None) -> float:
        """Enhance `src` into `dst` (format from its suffix); returns the audio duration in seconds.

        An echo canceller also takes `reference`, the far end that was played (any rate, resampled; several
        channels are mixed to one; shorter is padded with silence, longer cut); without one it only denoises.
        `report` receives one line for each such adjustment. Raises FileError with a one-line reason; never
        leaves a partial `dst` and never writes over `src`.
        """
        src, dst = Path(src), Path(dst)
        info = _audio_info(src)
        reference_info = _audio_info(Path(reference)) if reference is not None else None
        if reference_info is not None and not self.card.reference_input:
            raise FileError(f"model {self.card.name!r} is not an echo canceller: it takes no reference")
        if dst.exists() and dst.samefile(src):
            raise FileError(f"{src}: output would overwrite the input")
        if dst.exists() and not overwrite:
            raise FileError(f"{dst}: exists (use --overwrite to replace it)")
        out_format = _FORMATS.get(dst.suffix.lower())
        if out_format is None:
            raise FileError(f"{dst}: unsupported output format (use .wav, .flac or .ogg)")
        out_subtype = subtype or (info.subtype if sf.check_format(out_format, info.subtype) else None)
        if out_subtype is not None and not sf.check_format(out_format, out_subtype):
            raise FileError(f"{dst}: subtype {out_subtype} cannot be written as {out_format}")
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp.touch()  # fails with the system's reason, where libsndfile would only say "System error"
            writer = sf.SoundFile(tmp, "w", info.samplerate, info.channels, out_subtype, format=out_format)
        except FileExistsError as error:  # mkdir found a file where the folder should be
            raise FileError(f"{dst}: cannot write ({error.filename} is not a folder)") from error
        except (OSError, sf.LibsndfileError) as error:
            if tmp.is_file():
                tmp.unlink()
            raise FileError(f"{dst}: cannot write ({_reason(error)})") from error
        try:
            with writer:
                if self.card.reference_input:
                    self._run_echo(src, info, writer, reference, reference_info, report or (lambda line: None))
                else:
                    self._run(src, info, writer)
            os.replace(tmp, dst)
        except (OSError, sf.LibsndfileError) as error:  # a corrupt stream mid-file, a full disk: this file fails
            tmp.unlink(missing_ok=True)
            raise FileError(f"{src}: failed ({_reason(error)})") from error
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return info.frames / info.samplerate

    def stream(self, sample_rate: int, channels: int, frames: int) -> AlignedStream:
        """A fresh stream for one signal of `frames` samples x `channels` at `sample_rate` (files and arrays)."""
        return AlignedStream(self.card, self.sessions, sample_rate, channels, frames)

    def _run(self, src: Path, info: sf._SoundFileInfo, writer: sf.SoundFile) -> None:
        stream = self.stream(info.samplerate, info.channels, info.frames)
        clip = not writer.subtype.startswith(("FLOAT", "DOUBLE", "VORBIS"))

        def write(out: np.ndarray) -> None:
            writer.write(np.clip(out, -1.0, 1.0) if clip else out)

        with sf.SoundFile(src) as reader:
            for block in reader.blocks(int(_BLOCK_SECONDS * info.samplerate), dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise FileError(f"{src}: contains NaN or Inf samples")
                write(stream.push(block))
        write(stream.finish())


    def _run_echo(self, src: Path, info: sf._SoundFileInfo, writer: sf.SoundFile, reference: str | Path | None,
                  reference_info: sf._SoundFileInfo | None, report: Callable[[str], None]) -> None:
        """The streaming EchoCanceller over the file, its latency trimmed so the output aligns with the mic."""
        from quell.streaming.echo import EchoCanceller, aligned_output

        rate, channels, block = info.samplerate, info.channels, int(_BLOCK_SECONDS * info.samplerate)
        canceller = EchoCanceller(self.card, sample_rate=rate, channels=channels, sessions=self.sessions)
        far = _ReferenceReader(reference, reference_info, rate, info.frames, src, report)
        clip = not writer.subtype.startswith(("FLOAT", "DOUBLE", "VORBIS"))

        piece = max(1, rate // 10)  # 100 ms per call: the canceller's resampler work arrays stay small

        def chunks():
            with sf.SoundFile(src) as reader:
                for mic in reader.blocks(block, dtype="float32", always_2d=True):
                    if not np.isfinite(mic).all():
                        raise FileError(f"{src}: contains NaN or Inf samples")
                    played = far.read(len(mic))
                    for start in range(0, len(mic), piece):
                        yield mic[start : start + piece], played[start : start + piece]

        for out in aligned_output(canceller, chunks(), info.frames):
            writer.write(np.clip(out, -1.0, 1.0) if clip else out)
        far.close()


class AlignedStream:
    """One signal through a model, block by block, time-aligned with its input and at its rate.

    Blocks are resampled to the model rate (soxr, streaming), run through the sequence graph with carried
    states (one StreamingModel per channel), the model's `delay` is dropped from the start and flushed out at
    the end, and the result is resampled back: `push` blocks, then `finish`, and the concatenated outputs have
    exactly `frames` samples. `model_seconds` and `resample_seconds` add up the time spent in each, so a caller
    can state the real-time factor of the model alone.
    """

    def __init__(self, card: ModelCard, sessions: dict, sample_rate: int, channels: int, frames: int):
        self.card, self.channels, self.frames = card, channels, frames
        self.models = [StreamingModel(card, sessions=sessions) for _ in range(channels)]
        self.to_model = soxr.ResampleStream(sample_rate, card.sample_rate, channels, dtype="float32", quality="HQ")
        self.from_model = soxr.ResampleStream(card.sample_rate, sample_rate, channels, dtype="float32", quality="HQ")
        self.pending = np.zeros((0, channels), np.float32)  # model-rate samples short of a hop
        self.to_trim = card.delay  # the stream lags by `delay`: drop that much so output aligns with input
        self.written = 0
        self.model_seconds = self.resample_seconds = 0.0

    def push(self, block: np.ndarray) -> np.ndarray:
        """Enhance the next block (samples x channels, float32); returns the output that is ready."""
        started = time.perf_counter()
        resampled = self.to_model.resample_chunk(block)
        self.resample_seconds += time.perf_counter() - started
        return self._emit(self._enhance(resampled), last=False)

    def finish(self) -> np.ndarray:
        """The rest of the output: the resampler's tail and the model's delayed end."""
        started = time.perf_counter()
        tail = self.to_model.resample_chunk(np.zeros((0, self.channels), np.float32), last=True)
        self.resample_seconds += time.perf_counter() - started
        flush = np.zeros((self.card.delay + self.card.hop, self.channels), np.float32)  # push the delayed end out
        return self._emit(self._enhance(np.concatenate([tail, flush])), last=True)

    def _enhance(self, samples: np.ndarray) -> np.ndarray:
        hop = self.card.hop
        samples = np.concatenate([self.pending, samples])
        usable = len(samples) - len(samples) % hop
        self.pending = samples[usable:]
        started = time.perf_counter()
        out = np.stack([m.process(np.ascontiguousarray(samples[:usable, c])) for c, m in enumerate(self.models)], 1)
        self.model_seconds += time.perf_counter() - started
        trimmed = min(self.to_trim, len(out))
        self.to_trim -= trimmed
        return out[trimmed:]

    def _emit(self, model_rate_samples: np.ndarray, last: bool) -> np.ndarray:
        started = time.perf_counter()
        out = self.from_model.resample_chunk(model_rate_samples, last=last)
        self.resample_seconds += time.perf_counter() - started
        out = out[: max(self.frames - self.written, 0)]
        if last and self.written + len(out) < self.frames:  # resampler rounding: pad the last few samples
            out = np.concatenate([out, np.zeros((self.frames - self.written - len(out), self.channels), np.float32)])
        self.written += len(out)
        return out


class _ReferenceReader:
    """The far-end file, read alongside the mic: mixed to mono, resampled to the mic's rate, padded or cut."""

    def __init__(self, path: str | Path | None, info: sf._SoundFileInfo | None, rate: int, frames: int, src: Path,
                 report: Callable[[str], None]):
        self.file = sf.SoundFile(path) if path is not None else None
        self.resampler = None
        if info is not None:
            if info.channels > 1:
                report(f"{path}: {info.channels} channels mixed to one reference")
            if info.samplerate != rate:
                report(f"{path}: resampled from {info.samplerate} to {rate} Hz, the mic's rate")
                self.resampler = soxr.ResampleStream(info.samplerate, rate, 1, dtype="float32", quality="HQ")
            length = round(info.frames * rate / info.samplerate)
            if length != frames:
                report(f"{path}: {length} samples against the mic's {frames}: "
                       + ("padded with silence" if length < frames else "cut"))
        self.buffered = np.zeros(0, np.float32)

    def read(self, n: int) -> np.ndarray:
        """The next n reference samples at the mic's rate (silence once the file has ended)."""
        while self.file is not None and len(self.buffered) < n:
            block = self.file.read(max(n, 4096), dtype="float32", always_2d=True)
            ended = len(block) == 0
            if not np.isfinite(block).all():
                raise FileError(f"{self.file.name}: contains NaN or Inf samples")
            mono = block.mean(axis=1)
            if self.resampler is not None:
                mono = self.resampler.resample_chunk(mono, last=ended)
            self.buffered = np.concatenate([self.buffered, mono])
            if ended:
                self.close()
        out = np.zeros(n, np.float32)
        take = min(n, len(self.buffered))
        out[:take], self.buffered = self.buffered[:take], self.buffered[take:]
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _audio_info(src: Path) -> sf._SoundFileInfo:
    if not src.exists():
        raise FileError(f"{src}: no such file")
    if not src.is_file():
        raise FileError(f"{src}: not a file")
    try:
        info = sf.info(src)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        raise FileError(f"{src}: not a readable audio file ({_reason(error)})") from error
    if info.frames == 0:
        raise FileError(f"{src}: empty (no samples)")
    return info


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# ---- batches: files and folders, several workers -----------------------------------------------------------------

def plan_outputs(inputs: list[str | Path], output: str | Path, suffix: str | None = None) -> list[tuple[Path, Path]]:
    """(source, destination) pairs: folders recursively, their tree mirrored under `output`.

    One input file with an output that has an audio suffix is a file-to-file job; otherwise `output` is a
    folder; files already under `output` (when it lies inside an input folder) are earlier outputs, not
    inputs. Raises FileError for a missing input, a folder without audio, an output that would overwrite an
    input, or two inputs that would be written to the same output.
    """
    output = Path(output)
    single_file = len(inputs) == 1 and Path(inputs[0]).is_file() and output.suffix.lower() in AUDIO_SUFFIXES
    if single_file:
        return _refuse_clashes([(Path(inputs[0]), output)])
    pairs: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            own = output.resolve() if item.resolve() in output.resolve().parents else None
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                           and own not in p.resolve().parents)
            if not files:
                raise FileError(f"{item}: no audio files (.wav, .flac, .ogg) in this folder")
            pairs += [(f, output / f.relative_to(item)) for f in files]
        elif item.exists():
            pairs.append((item, output / item.name))
        else:
            raise FileError(f"{item}: no such file or folder")
    if suffix:
        pairs = [(src, dst.with_suffix(suffix)) for src, dst in pairs]
    return _refuse_clashes(pairs)


def _refuse_clashes(pairs: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """The pairs without repeats; FileError if an output is an input or two inputs share an output."""
    sources = {src.resolve() for src, _ in pairs}
    planned: dict[Path, tuple[Path, Path]] = {}
    for src, dst in pairs:
        if dst.resolve() in sources:
            raise FileError(f"{dst}: output would overwrite an input")
        first = planned.setdefault(dst.resolve(), (src, dst))[0]
        if first.resolve() != src.resolve():
            raise FileError(f"{dst}: both {first} and {src} would be written there")
    return list(planned.values())  # an input given twice is done once


def pair_references(mics: list[tuple[Path, Path]], mic: str | Path, reference: str | Path) -> list[Path | None]:
    """The far-end file for each planned mic file: the reference file itself, or the file of the same relative
    path in the reference folder (None where there is none: that mic is only denoised)."""
    mic, reference = Path(mic), Path(reference)
    if not reference.exists():
        raise FileError(f"{reference}: no such file or folder")
    if reference.is_file():
        if len(mics) != 1:
            raise FileError(f"{reference}: one reference file for {len(mics)} mic files (give a folder)")
        return [reference]
    if not mic.is_dir():
        raise FileError(f"{reference}: a reference folder needs a mic folder")
    matches = []
    for src, _ in mics:
        relative = src.relative_to(mic)
        candidates = [p for p in (reference / relative).parent.glob(relative.stem + ".*")
                      if p.suffix.lower() in AUDIO_SUFFIXES]
        matches.append(candidates[0] if candidates else None)
    return matches


_worker: FileEnhancer | None = None


def _init_worker(model: str, threads: int) -> None:
    global _worker
    _worker = FileEnhancer(model, threads)


def _enhance_one(src: Path, dst: Path, overwrite: bool, subtype: str | None,
                 reference: Path | None = None) -> FileResult:
    assert _worker is not None
    if dst.exists() and not overwrite and dst.resolve() != src.resolve():
        return FileResult(src, dst, "skipped", message=f"{dst}: exists, skipped")
    notes: list[str] = []
    try:
        seconds = _worker.enhance(src, dst, overwrite, subtype, reference, report=notes.append)
        return FileResult(src, dst, "done", seconds, message="; ".join(notes))
    except FileError as error:
        return FileResult(src, dst, "failed", message=str(error))


def enhance_files(
    pairs: list[tuple[Path, Path]], model: str | Path = "dtln", jobs: int = 1, overwrite: bool = False,
    subtype: str | None = None, progress: bool = True, report=print, references: list[Path | None] | None = None,
) -> BatchSummary:
    """Enhance every (src, dst) pair with `jobs` worker processes; failures are reported and the rest go on.

    For an echo canceller, `references[i]` is the far end played during pair i (None: none was).
    """
    from tqdm import tqdm

    started = time.monotonic()
    summary = BatchSummary()
    references = references if references is not None else [None] * len(pairs)
    bar = tqdm(total=len(pairs), unit="file", disable=not progress, dynamic_ncols=True)
    if jobs <= 1:
        _init_worker(str(model), 1)
        results = (_enhance_one(src, dst, overwrite, subtype, ref) for (src, dst), ref in zip(pairs, references,
                                                                                              strict=True))
        executor = None
    else:
        executor = ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(str(model), 1))
        results = executor.map(_enhance_one, *zip(*pairs, strict=True), [overwrite] * len(pairs),
                               [subtype] * len(pairs), references)
    try:
        for result in results:
            summary.results.append(result)
            if result.message:
                with bar.external_write_mode():  # clear the bar (stdout or stderr) while the line is written
                    report(("error: " if result.status == "failed" else "note: ") + result.message)
            bar.update()
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    summary.wall_seconds = time.monotonic() - started
    return summary
