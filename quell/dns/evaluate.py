"""`quell eval`: objective scores of enhanced speech, with the open peers side by side on the same clips.

Every noisy clip is paired by relative path with its clean reference (optional) and its enhanced version (a
folder of outputs, or a model run here). The peers of `baselines.py` run on the same noisy clip at their own rate
and frame size. Each system's output is scored against the clean clip at 16 kHz: PESQ (wide and narrow band),
STOI, ESTOI, SI-SDR and its improvement over the noisy input; DNSMOS P.835 (SIG, BAK, OVRL) and P.808 need no
reference, so without clean clips they are all there is.

With a far end (what was played, paired by name; the noisy clip is then the mic) the systems are echo
cancellers: the model must take a reference and the peers are `ECHO_BASELINES`. The scenario of each clip
(far-end single talk, near-end single talk, double talk) comes from the `scenario` column of `quell synth --echo`'s
metadata.csv, and decides what is scored: ERLE on far-end single talk (without metadata: where the clean
reference is silent), after the first `ERLE_SETTLE_SECONDS` in which cancellers converge; AECMOS as the AEC
challenge reports it, echo rating on far-end single talk and double talk, other-degradation rating on near-end
single talk and double talk (without a scenario it cannot run); the reference metrics where the clean near end
is not silent; DNSMOS everywhere.

The report (`Evaluation.write`): one CSV row per clip and system; mean and 95% confidence interval (Student t)
per metric and system, overall and, when the set has the `metadata.csv` of `quell synth`, per input-SNR bucket,
for reverberant vs dry clips and per echo scenario; the same as JSON and as markdown tables (with each engine's
speed, x real time, timed like the peers: the model alone, resampling apart); box plots when matplotlib is installed.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from quell.dns.baselines import BASELINES, ECHO_BASELINES, run_baselines
from quell.dns.metrics import erle, pesq, si_sdr, stoi
from quell.dns.mos import aecmos, dnsmos
from quell.dns.synth import ECHO_SCENARIOS
from quell.streaming.card import ModelCard
from quell.streaming.catalog import find_model
from quell.streaming.echo import EchoCanceller, aligned_output
from quell.streaming.files import AUDIO_SUFFIXES, FileEnhancer, FileError

METRIC_RATE = 16000  # every score is computed at 16 kHz (PESQ-WB and DNSMOS are defined there)
METRICS = {  # column -> heading, decimals
    "erle": ("ERLE", 1), "aecmos_echo": ("AECMOS echo", 2), "aecmos_degradation": ("AECMOS deg", 2),
    "pesq_wb": ("PESQ-WB", 2), "pesq_nb": ("PESQ-NB", 2), "stoi": ("STOI", 3), "estoi": ("ESTOI", 3),
    "si_sdr": ("SI-SDR", 1), "si_sdr_i": ("SI-SDRi", 1),
    "dnsmos_sig": ("SIG", 2), "dnsmos_bak": ("BAK", 2), "dnsmos_ovrl": ("OVRL", 2), "dnsmos_p808": ("P.808", 2),
}
REFERENCE_METRICS = ("pesq_wb", "pesq_nb", "stoi", "estoi", "si_sdr", "si_sdr_i")
DNSMOS_METRICS = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")
SNR_BUCKETS = (("SNR < 0 dB", -math.inf, 0.0), ("SNR 0-10 dB", 0.0, 10.0), ("SNR 10-20 dB", 10.0, 20.0),
               ("SNR >= 20 dB", 20.0, math.inf))
ROOMS = ("reverberant", "dry")
CONDITION_KEYS = ("snr_condition", "room", "noise_type", "scenario")  # per-file columns that define conditions
ERLE_SETTLE_SECONDS = 2.0  # left out of ERLE (at most half the clip): adaptive cancellers and quell's delay
#                            estimator (1.75 s: a 1 s window behind 0.5 s of lags, confirmed twice) converge first
INPUT_SYSTEMS = ("noisy", "mic")  # the unprocessed input: not an engine, so not timed
_SILENT_RMS = 1e-4  # -80 dBFS: a clean reference this quiet is silence (far-end single talk)
_EXAMPLES = 3  # names shown in a warning line


@dataclass
class Clip:
    """One noisy file and its counterparts; `condition` comes from the set's metadata.csv (may be empty)."""

    name: str  # path relative to the noisy folder, with "/"
    noisy: Path
    clean: Path | None = None
    enhanced: Path | None = None
    far_end: Path | None = None  # what was played, for echo cancellers
    condition: dict = field(default_factory=dict)  # snr_db, snr_condition, room, noise_type, noise_layers, scenario


@dataclass
class Stat:
    """Mean and half-width of its 95% confidence interval (Student t) over `n` finite values."""

    mean: float
    ci95: float
    n: int

    def format(self, decimals: int) -> str:
        if self.n == 0:
            return "—"
        if not math.isfinite(self.ci95):
            return f"{self.mean:.{decimals}f}"
        return f"{self.mean:.{decimals}f} ± {self.ci95:.{decimals}f}"


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Stat:
    """Mean and CI half-width t(1 - (1 - confidence) / 2, n - 1) * s / sqrt(n); NaN and Inf are left out."""
    from scipy.stats import t

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    if x.size == 0:
        return Stat(math.nan, math.nan, 0)
    if x.size == 1:
        return Stat(float(x[0]), math.nan, 1)
    half = t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return Stat(float(x.mean()), float(half), int(x.size))


@dataclass
class SystemReport:
    """One row of the table: a system that ran ("ok") or the reason it did not ("missing: ...", "failed: ...")."""

    name: str
    status: str = "ok"
    files: int = 0
    failures: list[str] = field(default_factory=list)  # "file: reason" where it failed on some files
    audio_seconds: float = 0.0
    engine_seconds: float = 0.0  # 0: not an engine (the noisy input, a folder of outputs)

    @property
    def realtime_factor(self) -> float | None:
        """Seconds of audio per second of engine time (the engine alone), or None when nothing was timed."""
        return self.audio_seconds / self.engine_seconds if self.engine_seconds > 0 else None


# ---- pairing -------------------------------------------------------------------------------------------------------

def _audio_names(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES}


def _folder(path: str | Path | None, what: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise FileError(f"{path}: no such folder (--{what})")
    if not path.is_dir():
        raise FileError(f"{path}: not a folder (--{what})")
    return path


def pair_clips(noisy: Path, clean: Path | None = None, enhanced: Path | None = None,
               far_end: Path | None = None) -> tuple[list[Clip], list[str]]:
    """Clips paired by relative path, and one warning line for names that are not in every folder (skipped)."""
    noisy_files = _audio_names(noisy)
    if not noisy_files:
        raise FileError(f"{noisy}: no audio files (.wav, .flac, .ogg) in this folder")
    others = {what: _audio_names(folder) for what, folder in (("clean", clean), ("enhanced", enhanced),
                                                              ("far_end", far_end)) if folder is not None}
    unpaired = []
    for what, files in others.items():
        unpaired += [f"{name} (no {what})" for name in noisy_files if name not in files]
        unpaired += [f"{name} (only in {what})" for name in files if name not in noisy_files]
    clips = [Clip(name, path, *(others[w].get(name) if w in others else None
                                for w in ("clean", "enhanced", "far_end")))
             for name, path in noisy_files.items()]
    clips = [c for c in clips if all(getattr(c, what) is not None for what in others)]
    return clips, [_warning("file name", "not in every folder, skipped", unpaired)] if unpaired else []


def _warning(noun: str, what: str, items: list[str]) -> str:
    """One line: how many, what happened, and the first few examples."""
    shown = ", ".join(items[:_EXAMPLES]) + (", ..." if len(items) > _EXAMPLES else "")
    return f"{_count(len(items), noun)} {what}: {shown}"


def snr_condition(snr_db: float) -> str:
    return next(name for name, low, high in SNR_BUCKETS if low <= snr_db < high)


def noise_type(layers: str) -> str:
    """The kind of a clip's main (first, 0 dB) noise layer, from `quell synth`'s `noise_layers` column."""
    source = layers.split(";")[0].split("@")[0]
    if source.startswith("generated:"):
        return f"{source.split(':', 1)[1]} noise (generated)"
    return "music" if source.startswith("music") else "recorded noise"


def _in_condition(row: dict, condition: str) -> bool:
    return condition == "all" or any(row.get(key) == condition for key in CONDITION_KEYS)


def read_conditions(noisy: Path) -> dict[str, dict]:
    """Per-file conditions from the metadata.csv of `quell synth` (in the noisy folder or the set above it)."""
    for path in (noisy / "metadata.csv", noisy.parent / "metadata.csv"):
        if path.is_file():
            break
    else:
        return {}
    conditions = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            condition = {}
            snr = row.get("realised_snr_db") or row.get("snr_db")  # the realised one: after the clipping guard
            if snr not in (None, ""):
                condition.update(snr_db=float(snr), snr_condition=snr_condition(float(snr)))
            if row.get("rir_source") is not None:
                condition["room"] = "dry" if row["rir_source"] in ("", "none") else "reverberant"
            layers = row.get("n_noise_layers") or row.get("noise_layers")
            if layers not in (None, "") and layers.isdigit():
                condition["noise_layers"] = int(layers)
            if row.get("noise_layers"):
                condition["noise_type"] = noise_type(row["noise_layers"])
            if row.get("scenario") in ECHO_SCENARIOS:  # an echo set of `quell synth --echo`
                condition["scenario"] = row["scenario"]
            if "file" in row:
                conditions[row["file"]] = condition
    return conditions


# ---- one clip (in a worker process when jobs > 1) -------------------------------------------------------------------

@dataclass
class _Job:
    """What every worker needs to score a clip (picklable)."""

    baselines: list[str]
    model: str | None
    model_name: str | None
    enhanced_name: str | None
    reference: bool
    use_dnsmos: bool
    echo: bool = False  # a far end is given: the systems are echo cancellers


@dataclass
class _ClipResult:
    rows: list[dict] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (noun, what happened, example)
    failures: dict[str, str] = field(default_factory=dict)  # system -> reason
    timing: dict[str, tuple[float, float]] = field(default_factory=dict)  # system -> (audio s, engine s)


_enhancer: FileEnhancer | None = None  # the model, for a noise set
_echo_model: str | None = None  # the model, for an echo set: one EchoCanceller per sample rate, reset per clip
_cancellers: dict[int, EchoCanceller] = {}


def _init_worker(model: str | None, echo: bool = False) -> None:
    global _enhancer, _echo_model
    _enhancer = FileEnhancer(model) if model and not echo else None
    _echo_model = model if echo else None
    _cancellers.clear()


def _read(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate; FileError with a one-line reason for anything that cannot be scored."""
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        raise FileError(f"{path}: not a readable audio file ({str(error).splitlines()[0]})") from error
    if audio.shape[1] != 1:
        raise FileError(f"{path}: {audio.shape[1]} channels (evaluation takes mono files)")
    if audio.size == 0:
        raise FileError(f"{path}: empty (no samples)")
    if not np.isfinite(audio).all():
        raise FileError(f"{path}: contains NaN or Inf samples")
    return audio[:, 0], rate


def _to_rate(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    return audio if rate == target else soxr.resample(audio, rate, target).astype(np.float32)


def enhance_array(enhancer: FileEnhancer, audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
    """A mono signal through the model, time-aligned and at its rate; and the seconds spent in the model alone."""
    stream = enhancer.stream(sample_rate, 1, audio.size)
    out = np.concatenate([stream.push(audio[:, None]), stream.finish()])[:, 0]
    return out, stream.model_seconds


def cancel_echo_array(canceller: EchoCanceller, mic: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float]:
    """A mono mic signal and its far end through the (fresh or reset) echo canceller, time-aligned with the mic;
    and the seconds spent in the canceller (delay alignment included, and resampling when not at its rate)."""
    start = time.perf_counter()
    out = np.concatenate(list(aligned_output(canceller, [(mic, reference)], mic.size)))
    return out, time.perf_counter() - start


def _run_model(audio: np.ndarray, far: np.ndarray | None, rate: int) -> tuple[np.ndarray, float]:
    """This worker's model on one clip: the denoiser, or the echo canceller with the far end."""
    if _echo_model is None:
        return enhance_array(_enhancer, audio, rate)
    canceller = _cancellers.get(rate)
    if canceller is None:
        canceller = _cancellers[rate] = EchoCanceller(_echo_model, sample_rate=rate)
    canceller.reset()
    return cancel_echo_array(canceller, audio, far)


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def _score(clip: Clip, job: _Job) -> _ClipResult:
    result = _ClipResult()
    try:
        noisy, rate = _read(clip.noisy)
        others = {what: _read(path) for what, path in (("clean", clip.clean), ("enhanced", clip.enhanced),
                                                       ("far_end", clip.far_end)) if path}
    except FileError as error:
        result.problems.append(("file", "unreadable, skipped", str(error)))
        return result
    for what, (_, other_rate) in others.items():
        if other_rate != rate:
            result.problems.append((f"{what.replace('_', '-')} file", "at another rate than the noisy one, resampled",
                                    f"{clip.name} ({other_rate} Hz, noisy {rate} Hz)"))
    signals = {"noisy": noisy, **{what: _to_rate(audio, r, rate) for what, (audio, r) in others.items()}}
    n = min(s.size for s in signals.values())
    if any(s.size != n for s in signals.values()):
        lengths = ", ".join(f"{what} {s.size}" for what, s in signals.items())
        result.problems.append(("file", "of different lengths, cut to the shorter", f"{clip.name} ({lengths})"))
    noisy, seconds = signals["noisy"][:n], n / rate
    far = signals["far_end"][:n] if job.echo else None

    outputs: dict[str, np.ndarray] = {}
    for name, done in (run_baselines(job.baselines, noisy, rate, reference=far) if job.baselines else {}).items():
        if isinstance(done, str):
            result.failures[name] = done
            continue
        outputs[name] = done.audio
        if name not in INPUT_SYSTEMS:
            result.timing[name] = (seconds, seconds / done.rtf)
    if job.model_name:
        try:
            outputs[job.model_name], model_seconds = _run_model(noisy, far, rate)
            result.timing[job.model_name] = (seconds, model_seconds)
        except Exception as error:  # reported like a peer's failure; the other systems are still scored
            result.failures[job.model_name] = f"failed: {type(error).__name__}: {error}"
    if job.enhanced_name:
        outputs[job.enhanced_name] = signals["enhanced"][:n]

    clean = _to_rate(signals["clean"][:n], rate, METRIC_RATE) if job.reference else None
    mic = _to_rate(noisy, rate, METRIC_RATE)
    scenario = clip.condition.get("scenario") if job.echo else None
    silent_clean = job.echo and clean is not None and _rms(clean) < _SILENT_RMS
    far_end_single_talk = scenario == "far_end" if scenario else silent_clean
    if silent_clean:  # no near end to score against: the echo metrics say it all
        clean = None
    far16 = _to_rate(far, rate, METRIC_RATE) if scenario else None
    settle = min(round(ERLE_SETTLE_SECONDS * METRIC_RATE), mic.size // 2)
    noisy_si_sdr = float(si_sdr(mic, clean)) if clean is not None else math.nan
    for system, audio in outputs.items():
        audio = _to_rate(audio, rate, METRIC_RATE)
        row = {"file": clip.name, "system": system, **clip.condition, "seconds": round(seconds, 3)}
        if far_end_single_talk:
            row["erle"] = erle(mic[settle:], audio[settle:])
        if scenario:
            scores = aecmos(far16, mic, audio, scenario)
            if scenario != "near_end":  # no echo to rate in near-end single talk
                row["aecmos_echo"] = scores["echo"]
            if scenario != "far_end":  # nothing else to degrade in far-end single talk
                row["aecmos_degradation"] = scores["degradation"]
        if clean is not None:
            row["pesq_wb"] = pesq(audio, clean, METRIC_RATE, "wb")
            row["pesq_nb"] = pesq(audio, clean, METRIC_RATE, "nb")
            row["stoi"] = stoi(audio, clean, METRIC_RATE)
            row["estoi"] = stoi(audio, clean, METRIC_RATE, extended=True)
            row["si_sdr"] = float(si_sdr(audio, clean))
            row["si_sdr_i"] = row["si_sdr"] - noisy_si_sdr
        if job.use_dnsmos:
            row.update({f"dnsmos_{name}": value for name, value in dnsmos(audio, METRIC_RATE).items()})
        result.rows.append(row)
    return result


def _score_in_worker(clip: Clip, job: _Job) -> _ClipResult:
    try:
        return _score(clip, job)
    except Exception as error:  # one clip's failure is reported; the batch goes on
        return _ClipResult(problems=[("file", "failed, skipped", f"{clip.name} ({type(error).__name__}: {error})")])


# ---- the whole set --------------------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Scores of every clip and system, and what is needed to summarise them."""

    rows: list[dict]
    systems: dict[str, SystemReport]  # in table order
    metrics: list[str]
    warnings: list[str]
    inputs: dict

    def conditions(self) -> list[str]:
        """"all", then the SNR buckets, rooms, noise types and echo scenarios that have clips, in a fixed order."""
        present = {row.get(key) for row in self.rows for key in CONDITION_KEYS}
        noise_types = sorted({row["noise_type"] for row in self.rows if row.get("noise_type")})
        return (["all"] + [name for name, *_ in SNR_BUCKETS if name in present] + [r for r in ROOMS if r in present]
                + noise_types + [s for s in ECHO_SCENARIOS if s in present])

    def stats(self, system: str, condition: str = "all") -> dict[str, Stat]:
        rows = [row for row in self.rows if row["system"] == system and _in_condition(row, condition)]
        return {metric: mean_ci(row.get(metric, math.nan) for row in rows) for metric in self.metrics}

    def summary(self) -> dict:
        """{system: {status, files, x_real_time, conditions: {condition: {files, metric: {mean, ci95, n}}}}}."""
        out = {}
        for name, system in self.systems.items():
            conditions = {}
            for condition in self.conditions() if system.status == "ok" else ():
                files = {row["file"] for row in self.rows if row["system"] == name and _in_condition(row, condition)}
                conditions[condition] = {"files": len(files), **{
                    metric: {"mean": _finite(s.mean), "ci95": _finite(s.ci95), "n": s.n}
                    for metric, s in self.stats(name, condition).items()}}
            rtf = system.realtime_factor
            out[name] = {"status": system.status, "files": system.files,
                         "failures": system.failures if system.status == "ok" else [],
                         "x_real_time": None if rtf is None else round(rtf, 2), "conditions": conditions}
        return out

    def markdown(self, condition: str = "all") -> str:
        """Systems as rows, metrics as columns ("mean ± 95% CI"), and each engine's speed (x real time)."""
        header = ["system", *(METRICS[m][0] for m in self.metrics), "x real time"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for name, system in self.systems.items():
            if system.status != "ok":
                cells = [system.status.replace("|", "/")] + [""] * (len(self.metrics) - 1)
            else:
                stats = self.stats(name, condition)
                cells = [stats[m].format(METRICS[m][1]) for m in self.metrics]
            rtf = system.realtime_factor
            lines.append("| " + " | ".join([name, *cells, "—" if rtf is None else f"{rtf:.0f}x"]) + " |")
        return "\n".join(lines)

    def report(self) -> str:
        """The markdown document: inputs, the overall table, one table per condition, warnings."""
        files = len({row["file"] for row in self.rows})
        jobs = self.inputs["jobs"]
        parts = [f"# quell eval: {self.inputs['noisy']}", "",
                 f"{_count(files, 'file')}; scores at {METRIC_RATE} Hz; mean ± 95% confidence interval (Student t). "
                 "Speed: seconds of audio per second of engine time, the engine alone (resampling excluded), "
                 f"timed {'in one process' if jobs == 1 else f'with {jobs} worker processes at once'}.", "",
                 self.markdown()]
        if self.inputs.get("far_end"):
            parts[4:4] = [f"Echo cancellers, with the far end in {self.inputs['far_end']}: ERLE (dB) on far-end "
                          f"single talk after each clip's first {ERLE_SETTLE_SECONDS:g} s (convergence); AECMOS echo "
                          "on far-end single talk and double talk, AECMOS deg(radation) on near-end single talk and "
                          "double talk; quell's canceller is timed whole (its delay alignment included).", ""]
        for condition in self.conditions()[1:]:
            n = len({row["file"] for row in self.rows if _in_condition(row, condition)})
            parts += ["", f"## {condition} ({_count(n, 'file')})", "", self.markdown(condition)]
        if self.warnings:
            parts += ["", "## Warnings", "", *(f"- {line}" for line in self.warnings)]
        return "\n".join(parts) + "\n"

    def write(self, out: str | Path) -> list[Path]:
        """per_file.csv, summary.csv, summary.json, summary.md and, with matplotlib, box plots; the paths written."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        columns = ["file", "system", *(c for c in ("snr_db", *CONDITION_KEYS, "noise_layers")
                                       if any(c in row for row in self.rows)), "seconds", *self.metrics]
        plots = _plots(self, out)
        if isinstance(plots, str) and plots not in self.warnings:
            self.warnings.append(plots)
        written = [
            _write(out / "per_file.csv", lambda f: _csv(f, columns, self.rows)),
            _write(out / "summary.csv", lambda f: _csv(f, ["system", "condition", "metric", "n", "mean", "ci95"], [
                {"system": name, "condition": condition, "metric": metric, "n": s["n"], "mean": s["mean"],
                 "ci95": s["ci95"]}
                for name, system in self.summary().items() for condition, stats in system["conditions"].items()
                for metric, s in stats.items() if metric != "files"])),
            _write(out / "summary.json", lambda f: json.dump(
                {"inputs": self.inputs, "systems": self.summary(), "warnings": self.warnings}, f, indent=2)),
            _write(out / "summary.md", lambda f: f.write(self.report())),
        ]
        return written + ([] if isinstance(plots, str) else plots)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _write(path: Path, fill: Callable) -> Path:
    """Writes through a temporary file renamed into place, so a report is never left half written."""
    temporary = path.with_name(f".{path.name}.part")
    with open(temporary, "w", newline="") as file:
        fill(file)
    temporary.replace(path)
    return path


def _csv(file, columns: list[str], rows: list[dict]) -> None:
    writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _plots(evaluation: Evaluation, out: Path) -> list[Path] | str:
    """Box plots of every metric per system and, with input SNRs, each metric against the input SNR."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "no plots: matplotlib is not installed"
    systems = [name for name, s in evaluation.systems.items() if s.status == "ok"]
    metrics = evaluation.metrics
    columns = min(len(metrics), 4)
    rows = -(-len(metrics) // columns)
    paths = []
    with_snr = any("snr_db" in row for row in evaluation.rows)
    for kind in ("boxplots", "vs_snr") if with_snr else ("boxplots",):
        figure = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
        FigureCanvasAgg(figure)
        for i, metric in enumerate(metrics):
            axes = figure.add_subplot(rows, columns, i + 1)
            axes.set_title(METRICS[metric][0])
            for j, system in enumerate(systems):
                points = [(row.get("snr_db", math.nan), row[metric]) for row in evaluation.rows
                          if row["system"] == system and math.isfinite(row.get(metric, math.nan))]
                if kind == "boxplots":
                    axes.boxplot([v for _, v in points], positions=[j], widths=0.6)
                elif points:
                    axes.plot(*zip(*points, strict=True), ".", label=system)
            if kind == "boxplots":
                axes.set_xticks(range(len(systems)), systems, rotation=30, ha="right")
            else:
                axes.set_xlabel("input SNR (dB)")
        if kind == "vs_snr":
            figure.axes[0].legend(fontsize="small")
        path = out / f"{kind}.png"
        figure.savefig(path, dpi=90)
        paths.append(path)
    return paths


def evaluate(
    noisy: str | Path, clean: str | Path | None = None, enhanced: str | Path | None = None,
    model: str | Path | None = None, baselines: Iterable[str] | None = None, limit: int | None = None,
    jobs: int = 1, use_dnsmos: bool = True, progress: Callable[[int, int], None] | None = None,
    far_end: str | Path | None = None,
) -> Evaluation:
    """Score the systems on every clip of `noisy`: the `baselines` (names of `BASELINES`; default "noisy"), and
    the outputs in `enhanced` or the `model` (a shipped name or a card) run here.

    With `far_end` (what was played, paired by name; `noisy` is then the mic) the systems are echo cancellers:
    `baselines` are names of `ECHO_BASELINES` (default "mic"), the model must take a reference, and ERLE and
    AECMOS are scored per clip as its scenario allows (module docstring).

    Without `clean` only DNSMOS is computed; with `use_dnsmos=False` only the reference metrics. `limit` takes the
    first clips by name; `jobs` worker processes score clips in parallel (each engine's speed is then timed
    under that load). `progress(done, total)` is called as clips are scored. Raises FileError or ValueError on bad
    arguments (missing folder, unknown model or baseline, nothing to score).
    """
    noisy_dir = _folder(noisy, "noisy")
    clean_dir, enhanced_dir = _folder(clean, "clean"), _folder(enhanced, "enhanced")
    far_end_dir = _folder(far_end, "far-end")
    echo = far_end_dir is not None
    registry = ECHO_BASELINES if echo else BASELINES
    baselines = list(dict.fromkeys(baselines if baselines is not None else ["mic" if echo else "noisy"]))
    if enhanced_dir is not None and model is not None:
        raise ValueError("give --enhanced (a folder of outputs) or --model (a model to run), not both")
    unknown = [name for name in baselines if name not in registry]
    if unknown:
        raise ValueError(f"unknown {'echo ' if echo else ''}baseline(s) {', '.join(unknown)}; "
                         f"known: {', '.join(registry)}")
    if clean_dir is None and not use_dnsmos and not echo:
        raise ValueError("nothing to compute: without --clean only DNSMOS can be, and it is turned off")
    card = find_model(model) if model is not None else None
    if card is not None and echo and not card.reference_input:
        raise ValueError(f"model {card.name!r} takes no far-end reference: --far-end needs an echo canceller")
    model_name = _unique(card.name, baselines) if card is not None else None
    enhanced_name = _unique(enhanced_dir.resolve().name or "enhanced", baselines) if enhanced_dir else None
    if not baselines and card is None and enhanced_dir is None:
        raise ValueError("nothing to evaluate: give --enhanced, --model or --baselines")

    clips, warnings = pair_clips(noisy_dir, clean_dir, enhanced_dir, far_end_dir)
    clips = clips[:limit] if limit else clips
    if not clips:
        raise FileError(f"{noisy_dir}: no file has its counterpart in every folder ({warnings[0]})")
    conditions = read_conditions(noisy_dir)
    for clip in clips:
        clip.condition = conditions.get(clip.name, {})
    without_scenario = [clip.name for clip in clips if "scenario" not in clip.condition] if echo else []
    if without_scenario:
        warnings.append(_warning("file", "without a scenario (the `scenario` column of a metadata.csv in or beside "
                                 "the mic folder): no AECMOS, ERLE only where the clean reference is silent",
                                 without_scenario))
    job = _Job(baselines, str(card.path) if card is not None else None, model_name, enhanced_name,
               clean_dir is not None, use_dnsmos, echo)
    systems = {name: SystemReport(name) for name in [*baselines, model_name, enhanced_name] if name}

    if jobs <= 1:
        _init_worker(job.model, echo)
        results: Iterable[_ClipResult] = (_score_in_worker(clip, job) for clip in clips)
        executor = None
    else:
        executor = ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(job.model, echo))
        results = executor.map(_score_in_worker, clips, repeat(job))
    rows, problems = [], defaultdict(list)
    if progress is not None:
        progress(0, len(clips))
    try:
        for done, (clip, result) in enumerate(zip(clips, results, strict=True), 1):
            rows += result.rows
            for noun, what, example in result.problems:
                problems[noun, what].append(example)
            for row in result.rows:
                systems[row["system"]].files += 1
            for name, reason in result.failures.items():
                systems[name].failures.append(f"{clip.name}: {reason}")
            for name, (audio_seconds, engine_seconds) in result.timing.items():
                systems[name].audio_seconds += audio_seconds
                systems[name].engine_seconds += engine_seconds
            if progress is not None:
                progress(done, len(clips))
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    if not rows:
        raise FileError(f"no file could be scored ({_warning(*next(iter(problems)), problems[next(iter(problems))])})"
                        if problems
                        else "no file could be scored")

    warnings += [_warning(noun, what, examples) for (noun, what), examples in problems.items()]
    for system in systems.values():
        if system.files == 0:  # never ran: the table shows why
            system.status = system.failures[0].split(": ", 1)[1] if system.failures else "failed: no output"
        elif system.failures:
            warnings.append(_warning("file", f"where {system.name} failed (scored on the others)", system.failures))
    metrics = [m for m in METRICS if any(m in row for row in rows)]
    undefined = [f"{row['file']} {row['system']} {m}" for row in rows for m in metrics
                 if m in row and not math.isfinite(row[m])]
    if undefined:
        warnings.append(_warning("score", "undefined (NaN, e.g. PESQ of a reference without speech), left out of "
                                 "the means", undefined))
    inputs = {"noisy": str(noisy_dir), "clean": str(clean_dir) if clean_dir else None,
              "enhanced": str(enhanced_dir) if enhanced_dir else None,
              "far_end": str(far_end_dir) if far_end_dir else None,
              "model": str(card.path) if card is not None else None, "baselines": baselines, "files": len(clips),
              "limit": limit, "jobs": jobs, "metric_rate": METRIC_RATE, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return Evaluation(rows, systems, metrics, warnings, inputs)


def _unique(name: str, taken: list[str]) -> str:
    """A system name that no baseline has: the model or folder name, marked when it would clash."""
    return name if name not in taken else f"{name} (quell)"


def record_scores(model: str | Path, evaluation: Evaluation, command: str) -> ModelCard:
    """Put an evaluation into the model's card: its scores (mean, 95% CI, n) and the peers', under the set's
    name, with the command that made them. Returns the card, saved."""
    card = find_model(model)
    summary = evaluation.summary()
    systems = {name: {"status": entry["status"], "x_real_time": entry["x_real_time"],
                      **({"scores": entry["conditions"]["all"]} if entry["conditions"] else {})}
               for name, entry in summary.items()}
    own = next(name for name in evaluation.systems if name not in BASELINES and name not in ECHO_BASELINES)
    card.scores[Path(evaluation.inputs["noisy"]).parent.name or "evaluation"] = {
        "command": command, "files": systems[own].get("scores", {}).get("files"), "date": time.strftime("%Y-%m-%d"),
        "model": systems.pop(own), "peers": systems,
    }
    card.save(card.path)
    return card
