"""`quell p808 analyze`: screen the submissions by the P.808 rules, then MOS per clip and per condition.

A submission is one rater's votes on one session. Only complete submissions count; one is rejected when:

    unplayed    a clip was rated that had not played to its end
    headphone   a digit of the headphone check was wrong
    trap        a trapping clip did not get the answer its voice asked for (P.835: on every scale)
    gold        a gold clip was rated more than 1 away from its known answer (P.835: on OVRL, as the toolkit)
    variance    the rating clips' votes vary less than 0.1 (the same answer, or nearly, everywhere)

Optional outlier removal (as the toolkit's `outlier_removal_clip`): per clip with more than 5 votes, a vote with
|z| >= 3.29 is dropped. Per clip and per condition, each scale gets its MOS (CCR: CMOS, the processed clip against
its reference, positive = better), standard deviation, n and the half-width of the 95% confidence interval
(Student t; the toolkit's 1.96 * std / sqrt(n) is the large-n limit of it). Column names follow the toolkit's
result files: MOS / CMOS, std, 95%CI; P.835: MOS_SIG, MOS_BAK, MOS_OVRL, std_sig, 95%CI_sig, ...; per clip,
`file_url` is the clip's path in the test folder and `short_file_name` what it is (condition/clip).

Votes come from the SQLite file of `quell p808 serve`, or from CSV files with at least the columns rater,
session, item, scale, vote, played (the offline page's download, or the votes.csv this writes).
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quell.dns.evaluate import _csv, _write, mean_ci
from quell.dns.p808.design import SCALES, ListeningTest, P808Error

REJECTION_RULES = ("unplayed", "headphone", "trap", "gold", "variance")
MIN_VARIANCE = 0.1
OUTLIER_Z = 3.29
OUTLIER_MIN_VOTES = 6
CSV_COLUMNS = ("rater", "session", "item", "scale", "vote", "played")
_NAMES = {"acr": ("MOS", ""), "ccr": ("CMOS", ""), "sig": ("MOS_SIG", "_sig"), "bak": ("MOS_BAK", "_bak"),
          "ovrl": ("MOS_OVRL", "_ovrl")}  # scale -> (mean column, suffix of std / 95%CI / n)


@dataclass
class Submission:
    """One rater's votes on one session, and the verdict of the screening."""

    rater: str
    session: str
    complete: bool
    rejected: list[str] = field(default_factory=list)  # the rules it broke, in REJECTION_RULES order
    variance: float = math.nan

    @property
    def accepted(self) -> bool:
        return self.complete and not self.rejected


@dataclass
class Analysis:
    """Screening and results of a test; `write` puts them in a folder."""

    test: ListeningTest
    submissions: list[Submission]
    per_clip: list[dict]
    per_condition: list[dict]
    votes: list[dict]
    outliers_removed: int | None = None  # None: outlier removal was off

    @property
    def scales(self) -> tuple[str, ...]:
        return SCALES[self.test.method]

    def columns(self, key: str) -> list[str]:
        stats = []
        for scale in self.scales:
            mean, suffix = _NAMES[scale]
            stats += [mean, f"std{suffix}", f"95%CI{suffix}"] + ([f"n{suffix}"] if len(self.scales) > 1 else [])
        return [key, "short_file_name", "condition_name", "n"] + stats if key == "file_url" else [key, "n"] + stats

    def markdown(self) -> str:
        """The report: screening counts, then one table row per condition."""
        complete = [s for s in self.submissions if s.complete]
        accepted = [s for s in complete if s.accepted]
        reasons = Counter(reason for s in complete for reason in s.rejected)
        raters = {s.rater for s in self.submissions}
        title = {"acr": "ACR", "ccr": "CCR", "p835": "P.835"}[self.test.method]
        lines = [f"# P.808 listening test ({title})", "",
                 f"{len(self.test.sessions)} sessions, {len(raters)} raters, {len(self.submissions)} submissions: "
                 f"{len(complete)} complete, {len(accepted)} accepted, {len(complete) - len(accepted)} rejected"
                 + (f" ({', '.join(f'{rule} {reasons[rule]}' for rule in REJECTION_RULES if reasons[rule])})"
                    if reasons else "") + ".", ""]
        if self.outliers_removed is not None:
            lines += [f"Outlier removal (|z| >= {OUTLIER_Z} per clip): {self.outliers_removed} votes removed.", ""]
        header = ["condition", "n"] + [f"{_NAMES[scale][0]} ± 95% CI (std)" for scale in self.scales]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.per_condition:
            cells = [row["condition_name"], str(row["n"])]
            for scale in self.scales:
                mean, suffix = _NAMES[scale]
                cells.append("—" if row[mean] is None else
                             f"{row[mean]:.2f} ± {_number(row[f'95%CI{suffix}'])} ({_number(row[f'std{suffix}'])})")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Per clip: votes_per_clip.csv; per submission: submissions.csv; every vote: votes.csv."]
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path) -> tuple[list[Path], str | None]:
        """votes_per_clip.csv, votes_per_condition.csv, submissions.csv, votes.csv, report.md and the plot.

        Returns the paths written and, when there is no plot, why not.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = [
            _write_csv(out / "votes_per_clip.csv", self.columns("file_url"), self.per_clip),
            _write_csv(out / "votes_per_condition.csv", self.columns("condition_name"), self.per_condition),
            _write_csv(out / "submissions.csv", ["rater", "session", "complete", "accepted", "rejected", "variance"],
                       [{"rater": s.rater, "session": s.session, "complete": int(s.complete),
                         "accepted": int(s.accepted), "rejected": " ".join(s.rejected),
                         "variance": _number(s.variance, 3)} for s in self.submissions]),
            _write_csv(out / "votes.csv", list(self.votes[0]) if self.votes else list(CSV_COLUMNS), self.votes),
        ]
        written.append(_write(out / "report.md", lambda file: file.write(self.markdown())))
        plot = _plot(self, out / "mos_per_condition.png")
        if isinstance(plot, Path):
            written.append(plot)
            return written, None
        return written, plot


def _number(value: float | None, decimals: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    return _write(path, lambda file: _csv(file, columns, rows))


def read_votes_csv(path: str | Path) -> list[dict]:
    """Votes from a CSV (the offline page's download or a votes.csv written here)."""
    path = Path(path)
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
    except (OSError, UnicodeDecodeError) as error:
        raise P808Error(f"cannot read {path}: {error}") from None
    missing = [c for c in CSV_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise P808Error(f"{path}: not a votes CSV, no column {', '.join(missing)}")
    try:
        for row in rows:
            row["vote"], row["played"] = int(row["vote"]), int(row["played"])
    except (TypeError, ValueError):
        raise P808Error(f"{path}: vote and played must be integers") from None
    return rows


def _outliers_removed(votes: list[float]) -> list[float]:
    if len(votes) < OUTLIER_MIN_VOTES:
        return votes
    x = np.asarray(votes, float)
    spread = x.std()
    return votes if spread == 0 else [v for v, z in zip(votes, np.abs(x - x.mean()) / spread, strict=True)
                                      if z < OUTLIER_Z]


def _stats(votes_by_scale: dict[str, list[float]], scales: tuple[str, ...]) -> dict:
    row: dict = {"n": max((len(votes_by_scale[s]) for s in scales), default=0)}
    for scale in scales:
        mean, suffix = _NAMES[scale]
        votes = votes_by_scale[scale]
        stat = mean_ci(votes)
        row[mean] = stat.mean if stat.n else None
        row[f"std{suffix}"] = float(np.std(votes, ddof=1)) if stat.n > 1 else None
        row[f"95%CI{suffix}"] = stat.ci95 if stat.n > 1 else None
        if len(scales) > 1:
            row[f"n{suffix}"] = stat.n
    return row


def _screen(test: ListeningTest, rater: str, session_id: str, rows: list[dict]) -> tuple[Submission, dict]:
    session = test.session(session_id)
    if session is None:
        raise P808Error(f"votes for session {session_id!r}, which this test does not have: votes of another test?")
    votes = {(row["item"], row["scale"]): (int(row["vote"]), int(row["played"])) for row in rows}
    needed = {(item.id, scale) for item in session.items for scale in item.scales(test.method)}
    if not needed <= votes.keys():
        return Submission(rater, session_id, complete=False), votes
    broken = set()
    if any(not played for _, played in votes.values()):
        broken.add("unplayed")
    rated = []
    for item in session.items:
        for scale in item.scales(test.method):
            vote = item.oriented(scale, votes[item.id, scale][0])
            if scale in item.answer and abs(vote - item.answer[scale]) > item.tolerance:
                broken.add(item.role)  # headphone, trap or gold
            if item.role == "rating":
                rated.append(vote)
    variance = float(np.var(rated, ddof=1)) if len(rated) > 1 else math.nan
    if not variance >= MIN_VARIANCE:
        broken.add("variance")
    return Submission(rater, session_id, True, [r for r in REJECTION_RULES if r in broken], variance), votes


def analyze(test: ListeningTest, votes: list[dict], remove_outliers: bool = False) -> Analysis:
    """Screen every submission in `votes` (rows with rater, session, item, scale, vote, played), then aggregate."""
    by_submission: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in votes:
        by_submission[str(row["rater"]), str(row["session"])].append(row)
    scales = SCALES[test.method]
    per_clip: dict[str, dict[str, list[float]]] = defaultdict(lambda: {scale: [] for scale in scales})
    condition_of = {}
    submissions = []
    for (rater, session_id), rows in sorted(by_submission.items()):
        submission, answers = _screen(test, rater, session_id, rows)
        submissions.append(submission)
        if not submission.accepted:
            continue
        for item in test.session(session_id).items:
            if item.role == "rating":
                condition_of[item.rated_clip] = item.condition
                for scale in scales:
                    per_clip[item.rated_clip][scale].append(item.oriented(scale, answers[item.id, scale][0]))
    removed = 0
    if remove_outliers:
        for clip_votes in per_clip.values():
            for scale, values in clip_votes.items():
                kept = _outliers_removed(values)
                removed += len(values) - len(kept)
                clip_votes[scale] = kept

    conditions = sorted({item.condition for s in test.sessions for item in s.items if item.role == "rating"})
    pooled = {name: {scale: [] for scale in scales} for name in conditions}
    clip_rows = []
    for clip in sorted(per_clip):
        for scale in scales:
            pooled[condition_of[clip]][scale] += per_clip[clip][scale]
        clip_rows.append({"file_url": clip, "short_file_name": test.clip_names.get(clip, clip),
                          "condition_name": condition_of[clip], **_stats(per_clip[clip], scales)})
    condition_rows = [{"condition_name": name, **_stats(pooled[name], scales)} for name in conditions]
    return Analysis(test, submissions, clip_rows, condition_rows, votes, removed if remove_outliers else None)


def _plot(analysis: Analysis, path: Path) -> Path | str:
    """MOS and 95% CI per condition, one panel per scale."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "no plot: matplotlib is not installed"
    scales = analysis.scales
    names = [row["condition_name"] for row in analysis.per_condition]
    figure = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5) * len(scales), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    for i, scale in enumerate(scales):
        mean, suffix = _NAMES[scale]
        axes = figure.add_subplot(1, len(scales), i + 1)
        values = [row[mean] if row[mean] is not None else math.nan for row in analysis.per_condition]
        errors = [row[f"95%CI{suffix}"] or 0.0 for row in analysis.per_condition]
        axes.bar(range(len(names)), values, yerr=errors, capsize=4, color="#4a74b8")
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axes.set_ylim(*((-3, 3) if scale == "ccr" else (1, 5)))
        axes.set_title(f"{mean} ± 95% CI")
        axes.grid(axis="y", alpha=0.3)
    temporary = path.with_name(f".{path.name}.part")
    figure.savefig(temporary, format="png", dpi=110)
    temporary.replace(path)
    return path
