"""`quell p808 build`: folders of conditions -> a P.808 test folder (ACR, CCR or P.835).

Every session a rater takes has, in this order: the volume setting, the headphone check, the training clips
(spanning the quality range: a clean reference, then noisier and noisier, down to a strongly degraded one), then
the rating clips with one gold clip and one trapping clip hidden among them, in random order.

Rating clips are packed into sessions at random but balanced: the clips of every condition are shuffled and
dealt round-robin across conditions, so each session holds (nearly) the same number from each condition, and
the last session is filled up with clips from the first so that all sessions are equally long.

The folder it writes (paths in every file are relative to it):

    test.json               the test definition (`design.py`): what `serve` and `analyze` read
    test.html               the offline page: open it in a browser, rate, download the votes CSV
    clips/*.wav             every clip as 16-bit WAV: copies of the inputs (never modified), and the generated
                            ones. Names are opaque, so a rater learns neither a condition nor a gold or trap clip
                            from the page; clips.csv (`clip`, `name`) and test.json say what each one is: NAME/STEM
                            for the clip STEM of condition NAME, reference/STEM, setup/..., training/..., gold/...,
                            trap/...
    rating_clips.csv        toolkit layout: `rating_clips` (+ `references` for CCR), and `condition`
    training_clips.csv      `training_clips` (+ `training_references` for CCR)
    gold_clips.csv          ACR/P.835: `gold_clips`, `gold_clips_ans` (P.835: the answer for OVRL)
    trapping_clips.csv      ACR/P.835: `trapping_clips`, `trapping_ans`
    publish_batch.csv       one row per session, columns as the toolkit's create_input.py writes them:
                            `Q0`.. (CCR: `Q0_P`, `Q0_R`, ..), `TP`, `TP_ANS` (ACR/P.835), `gold_clips`,
                            `gold_clips_ans`; then `session`, `headphone`, `headphone_ans` ("left,right"): the
                            headphone check stands in for the toolkit's `math` and `CMP*` columns, not written.

The toolkit expects URLs in its CSVs: upload the folder and prefix the paths with its address.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quell.dns.corpora import _audio_files
from quell.dns.p808.design import (
    METHODS,
    PROCESSED_FIRST,
    REFERENCE_FIRST,
    SCALES,
    Item,
    ListeningTest,
    P808Error,
    Session,
)
from quell.dns.p808.page import render_page
from quell.dns.p808.stimuli import (
    DIGITS,
    TRAP_MESSAGE,
    TRAP_MESSAGE_P835,
    Speaker,
    active_rms,
    degrade,
    headphone_clip,
    read_clip,
    trapping_clip,
    write_clip,
)

TRAINING_LADDER = ((None, False), (25.0, False), (12.0, False), (3.0, False), (-5.0, True))  # (SNR dB, severe)
GOLD_SNR_DB = -5.0  # with `severe`: no rater should call it anything but bad
_SETUP_RATE = 16000  # the headphone check
_NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def parse_conditions(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=FOLDER` or `FOLDER` (named after the folder) -> [(name, folder)], checked."""
    conditions = []
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        folder = Path(folder)
        if not name or not set(name) <= _NAME_CHARACTERS:
            raise P808Error(f"condition name {name!r}: use letters, digits, '.', '_' and '-' only")
        if not folder.is_dir():
            raise P808Error(f"condition {name}: {folder} is not a folder")
        conditions.append((name, folder))
    names = [name for name, _ in conditions]
    if len(set(names)) != len(names):
        raise P808Error(f"two conditions share a name: {', '.join(names)} (name them: NAME=FOLDER)")
    if not conditions:
        raise P808Error("give at least one condition folder")
    return conditions


def pack_sessions(pool: dict[str, list[str]], per_session: int, rng: np.random.Generator) -> list[list[str]]:
    """Clips of every condition -> sessions of `per_session` clips, each condition (nearly) equally in each."""
    queues = {name: [clips[i] for i in rng.permutation(len(clips))] for name, clips in pool.items()}
    dealt: list[str] = []
    while any(queues.values()):
        for name in rng.permutation(sorted(queues)):
            if queues[name]:
                dealt.append(queues[name].pop())
    per_session = min(per_session, len(dealt))
    sessions = math.ceil(len(dealt) / per_session)
    dealt += dealt[: sessions * per_session - len(dealt)]  # the deal goes on from the start: still balanced
    return [[dealt[s * per_session + i] for i in rng.permutation(per_session)] for s in range(sessions)]


class _Folder:
    """The test folder being written (a temporary sibling of the output, renamed into place at the end)."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.names: dict[str, str] = {}  # clips/<opaque>.wav -> what it is

    def clip(self, name: str, make: Callable[..., tuple[np.ndarray, int]], *args) -> str:
        """Write the (clip, rate) that `make(*args)` returns for `name`, once; its path in the folder."""
        path = f"clips/{hashlib.sha256(f'{self.seed}/{name}'.encode()).hexdigest()[:12]}.wav"
        if path not in self.names:
            write_clip(self.root / path, *make(*args))
            self.names[path] = name
        return path

    def csv(self, name: str, columns: list[str], rows: list[list]) -> None:
        with open(self.root / name, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            writer.writerows(rows)


def build_test(
    out: str | Path,
    method: str,
    conditions: list[tuple[str, Path]],
    reference: str | Path,
    clips_per_session: int = 10,
    raters_per_session: int = 5,
    seed: int = 0,
    overwrite: bool = False,
) -> ListeningTest:
    """Build a test in `out` from `conditions` [(name, folder)] and a folder of clean `reference` speech.

    The references give the gold clips, the training range and the volume sample; for CCR they are also the
    reference of every rated clip, matched by relative path (extension aside). The same seed builds the same test.
    """
    if method not in METHODS:
        raise P808Error(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    out, reference = Path(out), Path(reference)
    speaker = Speaker()  # fails here, before any work, when espeak-ng is missing
    references = {path.relative_to(reference).with_suffix("").as_posix(): path for path in _audio_files(reference)} \
        if reference.is_dir() else {}
    if not references:
        raise P808Error(f"no clean reference clips in {reference}: they give the gold, training and volume clips")
    sources = {}  # NAME/STEM -> input file
    pool: dict[str, list[str]] = {}  # condition -> [NAME/STEM]
    missing = []
    for name, folder in conditions:
        files = _audio_files(folder)
        if not files:
            raise P808Error(f"condition {name}: no audio files in {folder}")
        for path in files:
            stem = path.relative_to(folder).with_suffix("").as_posix()
            if method == "ccr" and stem not in references:
                missing.append(f"{name}/{stem}")
            sources[f"{name}/{stem}"] = path
            pool.setdefault(name, []).append(f"{name}/{stem}")
    if missing:
        raise P808Error(f"CCR needs a reference for every clip; {len(missing)} have none in {reference}, "
                        f"e.g. {', '.join(missing[:3])}")
    if out.exists() and (out / "votes.db").exists():
        raise P808Error(f"{out} holds votes (votes.db): build the new test in another folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise P808Error(f"{out} is not empty; pass --overwrite to replace it")

    staging = out.with_name(f".{out.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        test = _write_test(_Folder(staging, seed), method, sources, pool, references, speaker, clips_per_session,
                           raters_per_session, seed)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    test.folder = out
    return test


def _write_test(folder: _Folder, method: str, sources: dict[str, Path], pool: dict[str, list[str]],
                references: dict[str, Path], speaker: Speaker, clips_per_session: int, raters_per_session: int,
                seed: int) -> ListeningTest:
    rng = np.random.default_rng(seed)
    stored = {name: folder.clip(name, read_clip, source) for name, source in sources.items()}
    condition_of = {stored[name]: condition for condition, names in pool.items() for name in names}
    stem_of = {stored[name]: name.split("/", 1)[1] for name in sources}
    all_clips = sorted(condition_of)
    stems = sorted(references)
    volume = folder.clip("setup/volume", read_clip, references[stems[0]])
    speech_level = active_rms(*read_clip(folder.root / volume))

    def reference(stem: str) -> str:
        return folder.clip(f"reference/{stem}", read_clip, references[stem])

    def degraded(stem: str, snr_db: float, severe: bool, name: str) -> str:
        def make() -> tuple[np.ndarray, int]:
            clean, rate = read_clip(references[stem])
            return degrade(clean, rate, snr_db, rng, severe), rate
        return folder.clip(name, make)

    def spoken_digits(left: int, right: int, left_first: bool) -> tuple[np.ndarray, int]:
        say = speaker.say
        return headphone_clip(say(DIGITS[left], _SETUP_RATE), say(DIGITS[right], _SETUP_RATE), _SETUP_RATE,
                              left_first, speech_level), _SETUP_RATE

    def trapped(source: str, message: str) -> tuple[np.ndarray, int]:
        clip, rate = read_clip(folder.root / source)
        return trapping_clip(clip, rate, speaker.say(message, rate)), rate

    def item(role: str, rated: str, stem: str, **fields) -> Item:
        """A scored item; CCR plays the rated clip and the reference `stem` in random order (balanced)."""
        if method != "ccr":
            return Item("", role, [rated], **fields)
        if rng.random() < 0.5:
            return Item("", role, [reference(stem), rated], order=REFERENCE_FIRST, **fields)
        return Item("", role, [rated, reference(stem)], order=PROCESSED_FIRST, **fields)

    training = []
    for j, (snr_db, severe) in enumerate(TRAINING_LADDER):
        stem = stems[j % len(stems)]
        name = f"training/train_{j + 1}"
        clip = degraded(stem, snr_db, severe, name) if snr_db is not None else folder.clip(name, read_clip,
                                                                                          references[stem])
        training.append(item("training", clip, stem))
        training[-1].id = f"t{j + 1}"

    sessions = []
    for s, names in enumerate(pack_sessions(pool, clips_per_session, rng)):
        sid = f"s{s + 1:03d}"
        left, right = (int(digit) for digit in rng.choice(10, 2, replace=False))
        left_first = bool(rng.random() < 0.5)
        headphone = folder.clip(f"setup/headphone_{sid}", spoken_digits, left, right, left_first)
        setup = [Item("volume", "volume", [volume]),
                 Item("headphone", "headphone", [headphone], answer={"left": left, "right": right})]
        setup += [training[i] for i in rng.permutation(len(training))]

        rated = [stored[name] for name in names]
        block = [item("rating", clip, stem_of[clip], condition=condition_of[clip]) for clip in rated]
        g = (s + len(TRAINING_LADDER)) % len(stems)  # other speech than the training clips', where there is
        if method == "ccr":  # gold: a reference against its strongly degraded self; trap: against itself
            bad = degraded(stems[g], GOLD_SNR_DB, True, f"gold/degraded_{g + 1}")
            block.append(item("gold", bad, stems[g], answer={"ccr": -3}, tolerance=1))
            same = reference(stem_of[rated[int(rng.integers(len(rated)))]])
            block.append(Item("", "trap", [same, same], answer={"ccr": 0}, tolerance=1, order=REFERENCE_FIRST))
        else:
            # gold answers alternate 5 and 1 across sessions; P.835 checks gold on OVRL, as the toolkit does
            good = s % 2 == 0
            gold = folder.clip(f"gold/clean_{g + 1}", read_clip, references[stems[g]]) if good \
                else degraded(stems[g], GOLD_SNR_DB, True, f"gold/degraded_{g + 1}")
            block.append(Item("", "gold", [gold], answer={SCALES[method][-1]: 5 if good else 1}, tolerance=1))
            answer = int(rng.integers(1, 6))
            source = all_clips[int(rng.integers(len(all_clips)))]
            message = (TRAP_MESSAGE_P835 if method == "p835" else TRAP_MESSAGE).format(answer=answer)
            trap = folder.clip(f"trap/trap_{sid}", trapped, source, message)
            block.append(Item("", "trap", [trap], answer={scale: answer for scale in SCALES[method]}))
        block = [block[i] for i in rng.permutation(len(block))]
        for q, rated_item in enumerate(block):
            rated_item.id = f"q{q + 1:02d}"
        sessions.append(Session(sid, setup + block))

    test = ListeningTest(method, sessions, raters_per_session, seed, folder.names, folder.root)
    test.save()
    folder.csv("clips.csv", ["clip", "name"], sorted(folder.names.items()))
    _write_toolkit_csvs(folder, test, {name: [stored[n] for n in names] for name, names in pool.items()}, training)
    (folder.root / "test.html").write_text(render_page(
        {"mode": "offline", "sessions": [test.public_session(session) for session in sessions]}))
    return test


def _other(item: Item) -> str:
    """CCR: the reference played with the rated clip."""
    return next(clip for clip in item.clips if clip != item.rated_clip)


def _write_toolkit_csvs(folder: _Folder, test: ListeningTest, pool: dict[str, list[str]],
                        training: list[Item]) -> None:
    """The input CSVs of the public P.808 toolkit and its publish_batch.csv (see the module docstring)."""
    ccr = test.method == "ccr"
    by_role = [{role: [item for item in session.items if item.role == role] for role in ("rating", "gold", "trap")}
               for session in test.sessions]
    if ccr:
        reference_of = {item.rated_clip: _other(item) for roles in by_role for item in roles["rating"]}
        folder.csv("rating_clips.csv", ["rating_clips", "references", "condition"],
                   [[clip, reference_of[clip], name] for name, clips in pool.items() for clip in clips])
        folder.csv("training_clips.csv", ["training_clips", "training_references"],
                   [[item.rated_clip, _other(item)] for item in training])
    else:
        folder.csv("rating_clips.csv", ["rating_clips", "condition"],
                   [[clip, name] for name, clips in pool.items() for clip in clips])
        folder.csv("training_clips.csv", ["training_clips"], [[item.clips[0]] for item in training])
        golds = {(gold.clips[0], *gold.answer.values()) for roles in by_role for gold in roles["gold"]}
        folder.csv("gold_clips.csv", ["gold_clips", "gold_clips_ans"], sorted(golds))
        traps = [trap for roles in by_role for trap in roles["trap"]]
        folder.csv("trapping_clips.csv", ["trapping_clips", "trapping_ans"],
                   [[trap.clips[0], trap.answer[SCALES[test.method][-1]]] for trap in traps])

    per_session = len(by_role[0]["rating"])
    if ccr:
        columns = [f"Q{q}_{part}" for q in range(per_session) for part in ("P", "R")] + ["TP"]
    else:
        columns = [f"Q{q}" for q in range(per_session)] + ["TP", "TP_ANS"]
    columns += ["gold_clips", "gold_clips_ans", "session", "headphone", "headphone_ans"]
    rows = []
    for session, roles in zip(test.sessions, by_role, strict=True):
        trap, gold, headphone = roles["trap"][0], roles["gold"][0], session.item("headphone")
        if ccr:
            row = [clip for item in roles["rating"] for clip in (item.rated_clip, _other(item))] + [trap.clips[0]]
        else:
            row = [item.clips[0] for item in roles["rating"]] + [trap.clips[0], trap.answer[SCALES[test.method][-1]]]
        row += [gold.rated_clip, *gold.answer.values(), session.id, headphone.clips[0],
                f"{headphone.answer['left']},{headphone.answer['right']}"]
        rows.append(row)
    folder.csv("publish_batch.csv", columns, rows)
