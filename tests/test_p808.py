"""The P.808 kit without a browser: packing, building, the server's API and database, and the analysis.

Tests of the server and the analysis use tests made in memory (`synthetic_test`: the structure of a built
test, no audio), so they need neither espeak-ng nor a browser; building needs espeak-ng and skips without it.
The browser flow is in test_p808_browser.py.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import shutil
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from quell.cli import main
from quell.dns.p808 import stimuli, store
from quell.dns.p808.analyze import analyze, read_votes_csv
from quell.dns.p808.build import build_test, pack_sessions, parse_conditions
from quell.dns.p808.design import (
    PROCESSED_FIRST,
    REFERENCE_FIRST,
    SCALE_RANGES,
    SCALES,
    Item,
    ListeningTest,
    P808Error,
    Session,
    VoteError,
    load_test,
)
from quell.dns.p808.serve import open_server
from quell.dns.p808.store import read_votes

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (Debian: apt-get install espeak-ng)")


# ---- a test made in memory, and raters voting on it --------------------------------------------------------------

def synthetic_test(method: str, folder: Path | None = None, conditions=("A", "B", "C"), clips=8, per_session=12,
                   raters_per_session=5, seed=0) -> ListeningTest:
    """Sessions shaped like those of `build_test` (setup, training, rating + gold + trap), without audio."""
    rng = np.random.default_rng(seed)
    pool = {name: [f"clips/conditions/{name}/c{i}.wav" for i in range(clips)] for name in conditions}
    top = SCALES[method][-1]

    def scored(role, clip, **fields):
        if method != "ccr":
            return Item("", role, [clip], **fields)
        reference = "clips/reference/" + clip.rsplit("/", 1)[-1]
        if rng.random() < 0.5:
            return Item("", role, [reference, clip], order=REFERENCE_FIRST, **fields)
        return Item("", role, [clip, reference], order=PROCESSED_FIRST, **fields)

    sessions = []
    for s, rated in enumerate(pack_sessions(pool, per_session, rng)):
        left, right = (int(d) for d in rng.choice(10, 2, replace=False))
        items = [Item("volume", "volume", ["clips/setup/volume.wav"]),
                 Item("headphone", "headphone", [f"clips/setup/headphone_{s}.wav"], answer={"left": left,
                                                                                          "right": right})]
        for t in (1, 2):
            items.append(scored("training", f"clips/training/train_{t}.wav"))
            items[-1].id = f"t{t}"
        block = [scored("rating", clip, condition=clip.split("/")[2]) for clip in rated]
        if method == "ccr":
            block.append(scored("gold", "clips/gold/degraded_1.wav", answer={"ccr": -3}, tolerance=1))
            block.append(Item("", "trap", ["clips/reference/c0.wav"] * 2, answer={"ccr": 0}, tolerance=1,
                              order=REFERENCE_FIRST))
        else:
            block.append(Item("", "gold", ["clips/gold/clean_1.wav"], answer={top: 5}, tolerance=1))
            answer = int(rng.integers(1, 6))
            block.append(Item("", "trap", [f"clips/trap/trap_{s}.wav"],
                              answer={scale: answer for scale in SCALES[method]}))
        block = [block[i] for i in rng.permutation(len(block))]
        for q, item in enumerate(block):
            item.id = f"q{q + 1:02d}"
        sessions.append(Session(f"s{s + 1:03d}", items + block))
    test = ListeningTest(method, sessions, raters_per_session, seed, folder=folder)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        test.save()
    return test


def discrete_with_mean(mean: float, low: int, high: int, width: float = 0.9) -> np.ndarray:
    """Probabilities over low..high, a discretised Gaussian whose expected value is exactly `mean`."""
    values = np.arange(low, high + 1)

    def probabilities(centre):
        p = np.exp(-0.5 * ((values - centre) / width) ** 2)
        return p / p.sum()

    lo, hi = low - 10.0, high + 10.0
    for _ in range(100):  # the expected value grows with the centre: bisection
        centre = (lo + hi) / 2
        lo, hi = (centre, hi) if probabilities(centre) @ values < mean else (lo, centre)
    return probabilities((lo + hi) / 2)


def rater_votes(test: ListeningTest, rater: str, session: Session, rng, means: dict, flaw: str = "") -> list[dict]:
    """The vote rows of one rater on one session: an attentive rater, or one with one `flaw`.

    Ratings are drawn around `means[condition][scale]` (in the analysed orientation) and written as the page
    would, in the presented orientation. Flaws: trap, gold, headphone, unplayed, variance (the same rating
    everywhere), incomplete (stops half way).
    """
    rows = []
    unplayed = next(item.id for item in session.items if item.role == "rating")
    for index, item in enumerate(session.items):
        for scale in item.scales(test.method):
            low, high = SCALE_RANGES[scale]
            if item.answer:
                vote = item.answer[scale] if scale in item.answer else high
                if flaw == item.role:
                    vote = (vote + 2 - low) % (high - low + 1) + low if item.role == "headphone" else \
                        (low if vote - low > high - vote else high)
            elif item.role == "rating" and flaw == "variance":
                vote = 3 if high == 5 else 1
            elif item.role == "rating":
                p = discrete_with_mean(means[item.condition][scale], low, high)
                vote = int(rng.choice(np.arange(low, high + 1), p=p))
            else:
                vote = int(rng.integers(low, high + 1))
            vote = item.oriented(scale, vote)  # analysed -> presented orientation (its own inverse)
            played = 0 if flaw == "unplayed" and item.id == unplayed else 1
            rows.append({"rater": rater, "session": session.id, "item": item.id, "scale": scale, "vote": vote,
                         "played": played})
        if flaw == "incomplete" and index >= len(session.items) // 2:
            break
    return rows


FLAWS = ("trap", "gold", "headphone", "unplayed", "variance", "incomplete")


def crowd(test: ListeningTest, means: dict, raters=30, seed=2) -> tuple[list[dict], dict[str, str]]:
    """Votes of `raters` attentive raters spread over the sessions, plus one rater per flaw.

    A 95% CI misses its true mean once in 20 draws, so with 15 means checked the seed decides, once, whether
    all are covered: this one covers them. (Unbiased: with 1000 raters every mean came back within +-0.02.)
    """
    rng = np.random.default_rng(seed)
    rows, flaws = [], {}
    for r in range(raters):
        session = test.sessions[r % len(test.sessions)]
        rows += rater_votes(test, f"good{r:02d}", session, rng, means)
    for f, flaw in enumerate(FLAWS):
        rows += rater_votes(test, f"bad_{flaw}", test.sessions[f % len(test.sessions)], rng, means, flaw)
        flaws[f"bad_{flaw}"] = flaw
    return rows, flaws


# ---- packing, the test definition --------------------------------------------------------------------------------

def test_packing_balances_conditions_and_uses_every_clip():
    pool = {name: [f"{name}{i}" for i in range(10)] for name in "ABC"}
    sessions = pack_sessions(pool, 6, np.random.default_rng(0))
    assert len(sessions) == 5 and all(len(s) == 6 for s in sessions)  # 30 clips: 5 sessions, none padded
    for session in sessions:
        assert Counter(clip[0] for clip in session) == {"A": 2, "B": 2, "C": 2}
        assert len(set(session)) == 6
    assert sorted(clip for s in sessions for clip in s) == sorted(c for clips in pool.values() for c in clips)

    uneven = pack_sessions({"A": ["a0", "a1", "a2"], "B": ["b0", "b1"]}, 4, np.random.default_rng(1))
    assert [len(s) for s in uneven] == [4, 4]  # 5 clips: the second session is filled up from the first
    assert {c for s in uneven for c in s} == {"a0", "a1", "a2", "b0", "b1"}


def test_votes_are_checked_against_their_item():
    test = synthetic_test("p835")
    session = test.sessions[0]
    rating = next(item for item in session.items if item.role == "rating")
    assert test.check_vote(session.id, rating.id, {"sig": 5, "bak": 1, "ovrl": 3})[2] == {"sig": 5, "bak": 1,
                                                                                          "ovrl": 3}
    assert test.check_vote(session.id, "headphone", {"left": 0, "right": 9})[1].role == "headphone"
    for session_id, item_id, votes in [
        ("s999", rating.id, {"sig": 5, "bak": 1, "ovrl": 3}),  # unknown session
        (session.id, "q99", {"sig": 5, "bak": 1, "ovrl": 3}),  # unknown item
        (session.id, rating.id, {"sig": 5, "bak": 1}),  # a scale missing
        (session.id, rating.id, {"sig": 5, "bak": 1, "ovrl": 3, "acr": 3}),  # a scale too many
        (session.id, rating.id, {"sig": 6, "bak": 1, "ovrl": 3}),  # out of range
        (session.id, rating.id, {"sig": 4.5, "bak": 1, "ovrl": 3}),  # not an integer
        (session.id, rating.id, {"sig": True, "bak": 1, "ovrl": 3}),  # a boolean is no vote
        (session.id, rating.id, [5, 1, 3]),  # not an object
        (None, rating.id, {"sig": 5, "bak": 1, "ovrl": 3}),
    ]:
        with pytest.raises(VoteError):
            test.check_vote(session_id, item_id, votes)


def test_public_session_hides_roles_and_answers():
    test = synthetic_test("acr")
    public = test.public_session(test.sessions[0])
    assert all(set(item) == {"id", "kind", "clips", "scales"} for item in public["items"])
    assert {item["kind"] for item in public["items"]} == {"volume", "headphone", "training", "rate"}


def test_condition_specs():
    assert parse_conditions(["tests"]) == [("tests", Path("tests"))]
    assert parse_conditions(["noisy=tests"]) == [("noisy", Path("tests"))]
    for specs in (["bad name=tests"], ["a=tests", "a=quell"], ["nowhere"], []):
        with pytest.raises(P808Error):
            parse_conditions(specs)


# ---- building --------------------------------------------------------------------------------------------------

def speechlike(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A voiced, syllable-modulated harmonic tone: enough like speech for levels and lengths."""
    t = np.arange(round(seconds * rate)) / rate
    f0 = 110 + 20 * seed
    voiced = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 8))
    return 0.05 * voiced * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """reference/ (clean), noisy/ (WAV, 16 kHz) and mild/ (FLAC, 48 kHz, stereo): 4 clips each, same names."""
    root = tmp_path_factory.mktemp("p808_sources")
    rng = np.random.default_rng(0)
    for i in range(4):
        clean = speechlike(1.2, 16000, i)
        for folder, clip, rate, suffix in (("reference", clean, 16000, "wav"),
                                           ("noisy", clean + 0.03 * rng.standard_normal(clean.size), 16000, "wav")):
            (root / folder).mkdir(exist_ok=True)
            sf.write(root / folder / f"u{i}.{suffix}", clip, rate)
        mild = speechlike(1.2, 48000, i) + 0.005 * rng.standard_normal(57600)
        (root / "mild").mkdir(exist_ok=True)
        sf.write(root / "mild" / f"u{i}.flac", np.stack([mild, mild], 1), 48000)
    return root


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@needs_espeak
@pytest.mark.parametrize("method", ["acr", "ccr", "p835"])
def test_build_writes_a_complete_test(sources, tmp_path, method):
    before = _digest(sources)
    conditions = parse_conditions([str(sources / "noisy"), f"mild={sources / 'mild'}"])
    test = build_test(tmp_path / "test", method, conditions, sources / "reference", clips_per_session=3,
                      raters_per_session=2, seed=3)
    out = tmp_path / "test"
    assert _digest(sources) == before  # inputs untouched
    assert load_test(out).sessions == test.sessions

    # every clip of every item exists, as 16-bit WAV under an opaque name; the copies keep their rate, in mono
    path_of = {name: path for path, name in test.clip_names.items()}
    clips = {clip for session in test.sessions for item in session.items for clip in item.clips}
    for clip in clips:
        assert sf.info(out / clip).subtype == "PCM_16", clip
    assert sf.info(out / path_of["mild/u1"]).samplerate == 48000
    assert sf.info(out / path_of["mild/u1"]).channels == 1
    rated = {test.clip_names[item.rated_clip] for s in test.sessions for item in s.items if item.role == "rating"}
    assert rated == {f"{c}/u{i}" for c in ("noisy", "mild") for i in range(4)}
    assert all(name not in path for path, name in test.clip_names.items())
    assert dict(csv.reader(open(out / "clips.csv"))) == {"clip": "name", **test.clip_names}

    # every session: volume, headphone check, training (the 5-step quality ladder), ratings, one gold, one trap
    for session in test.sessions:
        roles = Counter(item.role for item in session.items)
        assert roles == {"volume": 1, "headphone": 1, "training": 5, "rating": 3, "gold": 1, "trap": 1}
        assert [item.role for item in session.items[:7]] == ["volume", "headphone"] + ["training"] * 5
        assert Counter(item.condition for item in session.items if item.role == "rating").most_common(1)[0][1] <= 2

    # the headphone check: one digit in each ear, the other channel silent meanwhile
    headphone = test.sessions[0].item("headphone")
    stereo, rate = sf.read(out / headphone.clips[0])
    assert stereo.shape[1] == 2 and np.all(np.abs(stereo[:, 0] * stereo[:, 1]) < 1e-6)
    assert np.abs(stereo[:, 0]).max() > 0.01 and np.abs(stereo[:, 1]).max() > 0.01

    traps = [item for s in test.sessions for item in s.items if item.role == "trap"]
    golds = [item for s in test.sessions for item in s.items if item.role == "gold"]
    rows = list(csv.DictReader(open(out / "publish_batch.csv")))
    assert len(rows) == len(test.sessions) and [r["session"] for r in rows] == [s.id for s in test.sessions]
    if method == "ccr":
        assert {item.order for s in test.sessions for item in s.items if item.role == "rating"} == \
            {REFERENCE_FIRST, PROCESSED_FIRST}
        assert all(t.clips[0] == t.clips[1] and t.answer == {"ccr": 0} and t.tolerance == 1 for t in traps)
        assert all(g.answer == {"ccr": -3} for g in golds)
        assert list(rows[0])[:6] == ["Q0_P", "Q0_R", "Q1_P", "Q1_R", "Q2_P", "Q2_R"]
        assert next(csv.reader(open(out / "rating_clips.csv"))) == ["rating_clips", "references", "condition"]
        assert next(csv.reader(open(out / "training_clips.csv"))) == ["training_clips", "training_references"]
    else:
        assert list(rows[0])[:5] == ["Q0", "Q1", "Q2", "TP", "TP_ANS"]
        assert next(csv.reader(open(out / "rating_clips.csv"))) == ["rating_clips", "condition"]
        gold_rows = list(csv.DictReader(open(out / "gold_clips.csv")))
        assert {int(r["gold_clips_ans"]) for r in gold_rows} == {1, 5}
        trap_rows = list(csv.DictReader(open(out / "trapping_clips.csv")))
        assert [r["trapping_clips"] for r in trap_rows] == [t.clips[0] for t in traps]
        for trap in traps:  # the clip's start, then the spoken message at the clip's level
            assert set(trap.answer) == set(SCALES[method]) and len(set(trap.answer.values())) == 1
            clip, rate = sf.read(out / trap.clips[0])
            assert len(clip) > 2 * rate
            message = clip[-rate:]
            level = stimuli.active_rms(sf.read(out / path_of["noisy/u0"])[0], 16000)
            assert abs(20 * np.log10(stimuli.active_rms(message, rate) / level)) < 4
    page = (out / "test.html").read_text()
    assert '"mode": "offline"' in page and "gold" not in page and "trap" not in page and "noisy" not in page

    again = build_test(tmp_path / "again", method, conditions, sources / "reference", clips_per_session=3,
                       raters_per_session=2, seed=3)
    assert again.sessions == test.sessions  # the same seed builds the same test


@needs_espeak
def test_build_refuses_what_it_cannot_do(sources, tmp_path):
    reference = sources / "reference"
    noisy = parse_conditions([str(sources / "noisy")])
    with pytest.raises(P808Error, match="unknown method"):
        build_test(tmp_path / "a", "mushra", noisy, reference)
    with pytest.raises(P808Error, match="no clean reference"):
        build_test(tmp_path / "a", "acr", noisy, tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(reference / "u0.wav", partial)
    with pytest.raises(P808Error, match="CCR needs a reference for every clip; 3 have none"):
        build_test(tmp_path / "a", "ccr", noisy, partial)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(P808Error, match="not empty"):
        build_test(tmp_path / "full", "acr", noisy, reference)
    (tmp_path / "full" / "votes.db").write_text("")
    with pytest.raises(P808Error, match="holds votes"):
        build_test(tmp_path / "full", "acr", noisy, reference, overwrite=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.wav").write_text("not audio")
    with pytest.raises(P808Error, match="x.wav: not readable audio"):
        build_test(tmp_path / "b", "acr", parse_conditions([str(broken)]), reference)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))  # nothing half-built is left


def test_build_without_espeak_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(stimuli.shutil, "which", lambda name: None)
    (tmp_path / "c").mkdir()
    result = CliRunner().invoke(main, ["p808", "build", "-o", str(tmp_path / "out"), "-c", str(tmp_path / "c"),
                                       "--reference", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: espeak-ng is not installed (Debian: apt-get install espeak-ng); it speaks the trapping messages "
        "and the headphone-check digits"]


# ---- the server --------------------------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    """A running server on a synthetic ACR test (2 sessions of 12 clips, 3 raters each), and a request helper."""
    test = synthetic_test("acr", tmp_path / "test", raters_per_session=3)
    (tmp_path / "test" / "clips" / "setup").mkdir(parents=True)
    sf.write(tmp_path / "test" / "clips" / "setup" / "volume.wav", np.zeros(1600), 16000, subtype="PCM_16")
    server = open_server(tmp_path / "test", port=0)
    server.start_background()

    def request(path, body=None, method="POST", headers=None, raw=None):
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        content_type = response.getheader("Content-Type", "")
        return response.status, json.loads(payload) if "json" in content_type else payload, response

    yield server, test, request
    server.close()


def _vote_count(server) -> int:
    return len(read_votes(server.store.path))


def answer(request, rater, session, item, votes):
    assert request("/api/played", {"rater": rater, "session": session.id, "item": item.id})[0] == 200
    return request("/api/vote", {"rater": rater, "session": session.id, "item": item.id, "votes": votes})


def test_server_runs_a_session_and_resumes_it(served):
    server, test, request = served
    status, started, _ = request("/api/start", {"rater": "ann"})
    assert status == 200 and started["answered"] == []
    session = test.session(started["session"]["id"])
    assert started["session"] == test.public_session(session)
    for item in session.items[:3]:
        votes = {scale: SCALE_RANGES[scale][1] for scale in item.scales("acr")}
        assert answer(request, "ann", session, item, votes)[:2] == (200, {"stored": True, "complete": False})

    # ann comes back: the same session, three items answered; another rater gets the other session
    assert request("/api/start", {"rater": "ann"})[1]["answered"] == [item.id for item in session.items[:3]]
    assert request("/api/start", {"rater": "bob"})[1]["session"]["id"] != session.id
    for item in session.items[3:]:
        status, body, _ = answer(request, "ann", session, item, {scale: 1 for scale in item.scales("acr")})
        assert status == 200
    assert body == {"stored": True, "complete": True}
    assert request("/api/start", {"rater": "ann"})[1]["session"]["id"] != session.id  # the next session

    rows = read_votes(server.store.path)
    assert len(rows) == len(session.items) + 1  # the headphone check has two votes
    first = rows[0]
    assert first["rater"] == "ann" and first["session"] == session.id and first["played"] == 1
    assert first["played_at"] <= first["voted_at"]
    gold = next(item for item in session.items if item.role == "gold")
    assert next(r for r in rows if r["item"] == gold.id)["role"] == "gold"
    with sqlite3.connect(server.store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT completed_at IS NOT NULL FROM assignments WHERE rater = 'ann' AND session = ?",
                          (session.id,)).fetchone() == (1,)


def test_sessions_run_out(served):
    server, test, request = served
    for rater in ("a", "b", "c", "d", "e", "f"):  # 2 sessions x 3 raters
        assert "session" in request("/api/start", {"rater": rater})[1]
    assert request("/api/start", {"rater": "g"})[1]["finished"] is True


def test_a_vote_needs_its_clip_played_and_counts_once(served):
    server, test, request = served
    session = test.session(request("/api/start", {"rater": "ann"})[1]["session"]["id"])
    item = session.items[0]
    status, body, _ = request("/api/vote", {"rater": "ann", "session": session.id, "item": item.id,
                                            "votes": {"volume": 1}})
    assert (status, body["code"]) == (409, "not-played")
    assert answer(request, "ann", session, item, {"volume": 1})[0] == 200
    status, body, _ = request("/api/vote", {"rater": "ann", "session": session.id, "item": item.id,
                                            "votes": {"volume": 1}})
    assert (status, body["code"]) == (409, "already-voted")
    assert _vote_count(server) == 1


def test_malformed_submissions_get_400_and_store_nothing(served):
    server, test, request = served
    session = test.session(request("/api/start", {"rater": "ann"})[1]["session"]["id"])
    rating = next(item for item in session.items if item.role == "rating")
    request("/api/played", {"rater": "ann", "session": session.id, "item": rating.id})
    good = {"rater": "ann", "session": session.id, "item": rating.id, "votes": {"acr": 4}}
    cases = [
        (400, {"raw": b"{not json"}),
        (400, {"raw": b"\xff\xfe"}),
        (400, {"body": [1, 2, 3]}),
        (400, {"body": {**good, "votes": {"acr": 9}}}),
        (400, {"body": {**good, "votes": {"acr": "4"}}}),
        (400, {"body": {**good, "votes": {"acr": 4, "sig": 3}}}),
        (400, {"body": {**good, "votes": {}}}),
        (400, {"body": {**good, "item": "q99"}}),
        (400, {"body": {**good, "session": "s999"}}),
        (400, {"body": {**good, "rater": "bob"}}),  # not bob's session
        (400, {"body": {**good, "rater": "ann; DROP TABLE votes"}}),
        (400, {"body": {**good, "extra": 1}}),
        (400, {"body": {key: value for key, value in good.items() if key != "votes"}}),
        (413, {"raw": b"{" + b" " * 20000 + b"}"}),
        (411, {"raw": b"", "headers": {"Content-Length": "x"}}),
        (404, {"body": good, "path": "/api/nothing"}),
    ]
    for expected, case in cases:
        status, body, _ = request(case.get("path", "/api/vote"), case.get("body"), raw=case.get("raw"),
                                  headers=case.get("headers"))
        assert status == expected, case
        assert isinstance(body, dict) and body["error"], case
    assert request("/api/start", {"rater": ""})[0] == 400
    assert request("/api/played", {"rater": "ann", "session": session.id, "item": 7})[0] == 400
    assert _vote_count(server) == 0
    assert request("/api/vote", good)[0] == 200 and _vote_count(server) == 1


def test_clips_are_served_with_ranges_and_nothing_else(served):
    server, test, request = served
    whole = request("/clips/setup/volume.wav", method="GET")
    assert whole[0] == 200 and whole[1][:4] == b"RIFF"
    part = request("/clips/setup/volume.wav", method="GET", headers={"Range": "bytes=4-11"})
    assert part[0] == 206 and part[1] == whole[1][4:12]
    assert part[2].getheader("Content-Range") == f"bytes 4-11/{len(whole[1])}"
    assert request("/clips/setup/volume.wav", method="GET", headers={"Range": "bytes=-4"})[1] == whole[1][-4:]
    for path in ("/clips/../test.json", "/clips/%2e%2e/test.json", "/clips/setup/missing.wav", "/test.json",
                 "/clips/../../etc/passwd"):
        assert request(path, method="GET")[0] == 404, path
    page = request("/", method="GET")
    assert page[0] == 200 and b'"mode": "server"' in page[1]


def test_concurrent_raters_all_land(served):
    server, test, request = served
    raters = [f"r{i}" for i in range(6)]
    failures = []

    def rate(rater):
        try:
            session = test.session(request("/api/start", {"rater": rater})[1]["session"]["id"])
            for item in session.items:
                status, body, _ = answer(request, rater, session, item,
                                         {scale: SCALE_RANGES[scale][0] for scale in item.scales("acr")})
                if status != 200:
                    failures.append((rater, item.id, status, body))
        except Exception as error:  # noqa: BLE001 (reported below, not lost in the thread)
            failures.append((rater, repr(error)))

    threads = [threading.Thread(target=rate, args=(rater,)) for rater in raters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    rows = read_votes(server.store.path)
    per_rater = Counter(row["rater"] for row in rows)
    assert per_rater == {rater: len(test.sessions[0].items) + 1 for rater in raters}
    with sqlite3.connect(server.store.path) as db:
        assert sorted(db.execute("SELECT session, COUNT(*) FROM assignments GROUP BY session")) == \
            [("s001", 3), ("s002", 3)]  # balanced: each session got its 3 raters


def test_one_server_per_database(served, tmp_path):
    server, test, request = served
    with pytest.raises(P808Error, match="in use by another `quell p808 serve`"):
        open_server(tmp_path / "test", port=0)
    result = CliRunner().invoke(main, ["p808", "serve", str(tmp_path / "test"), "--port", "0"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "in use by another" in result.output


def test_a_database_locked_while_serving_answers_503(served, monkeypatch):
    server, test, request = served
    monkeypatch.setattr(store, "BUSY_SECONDS", 0.2)
    holder = sqlite3.connect(server.store.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        status, body, _ = request("/api/start", {"rater": "ann"})
        assert status == 503 and "database busy" in body["error"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert request("/api/start", {"rater": "ann"})[0] == 200


def test_a_locked_database_is_refused_at_start(tmp_path):
    synthetic_test("acr", tmp_path / "test")
    db = tmp_path / "test" / "votes.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(P808Error, match="database is locked"):
            open_server(tmp_path / "test", port=0)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    open_server(tmp_path / "test", port=0).close()  # free again: it starts


def test_a_database_of_another_test_is_refused(tmp_path):
    synthetic_test("acr", tmp_path / "one")
    synthetic_test("acr", tmp_path / "two", seed=5)
    open_server(tmp_path / "one", port=0).close()
    with pytest.raises(P808Error, match="votes of another test"):
        open_server(tmp_path / "two", tmp_path / "one" / "votes.db", port=0)


# ---- analysis ----------------------------------------------------------------------------------------------------

TRUE_MEANS = {
    "acr": {"A": {"acr": 2.0}, "B": {"acr": 3.0}, "C": {"acr": 4.2}},
    "ccr": {"A": {"ccr": -1.5}, "B": {"ccr": 0.0}, "C": {"ccr": 0.8}},
    "p835": {"A": {"sig": 4.0, "bak": 1.8, "ovrl": 2.2}, "B": {"sig": 3.4, "bak": 3.5, "ovrl": 3.1},
             "C": {"sig": 2.6, "bak": 4.4, "ovrl": 3.8}},
}


@pytest.mark.parametrize("method", ["acr", "ccr", "p835"])
def test_analysis_rejects_bad_raters_and_recovers_the_means(method):
    test = synthetic_test(method)
    rows, flaws = crowd(test, TRUE_MEANS[method])
    analysis = analyze(test, rows)

    verdicts = {s.rater: s for s in analysis.submissions}
    assert all(verdicts[f"good{r:02d}"].accepted for r in range(30))
    for rater, flaw in flaws.items():
        if flaw == "incomplete":
            assert not verdicts[rater].complete
        else:
            assert verdicts[rater].rejected == [flaw], rater

    accepted_sessions = Counter(s.session for s in analysis.submissions if s.accepted)
    for row in analysis.per_condition:
        truth = TRUE_MEANS[method][row["condition_name"]]
        for scale in SCALES[method]:
            mean_column, suffix = {"acr": ("MOS", ""), "ccr": ("CMOS", "")}.get(
                scale, (f"MOS_{scale.upper()}", f"_{scale}"))
            assert abs(row[mean_column] - truth[scale]) <= row[f"95%CI{suffix}"], (row, scale)
            assert 0.05 < row[f"95%CI{suffix}"] < 0.35 and row[f"std{suffix}"] > 0.3
        expected_n = sum(n * sum(1 for item in test.session(sid).items
                                 if item.role == "rating" and item.condition == row["condition_name"])
                         for sid, n in accepted_sessions.items())
        assert row["n"] == expected_n
    assert sum(row["n"] for row in analysis.per_clip) == sum(row["n"] for row in analysis.per_condition)


def test_outlier_removal_drops_only_far_votes():
    test = synthetic_test("acr", conditions=("A",), clips=2, per_session=2, raters_per_session=20)
    rows = []
    for r in range(20):  # 5 for clip c0 and 4 for c1 from every rater, but rater 0 gives c0 a 2
        for item in test.sessions[0].items:
            for scale in item.scales("acr"):
                if item.answer:
                    vote = item.answer[scale]
                elif item.role == "rating":
                    vote = (2 if r == 0 else 5) if item.rated_clip.endswith("c0.wav") else 4
                else:
                    vote = 1
                rows.append({"rater": f"r{r}", "session": "s001", "item": item.id, "scale": scale, "vote": vote,
                             "played": 1})
    kept = analyze(test, rows)
    cleaned = analyze(test, rows, remove_outliers=True)
    assert all(s.accepted for s in kept.submissions)
    assert cleaned.outliers_removed == 1 and kept.outliers_removed is None
    first = next(row for row in cleaned.per_clip if row["file_url"].endswith("c0.wav"))
    assert (first["n"], first["MOS"], first["std"]) == (19, 5.0, 0.0)
    assert next(row for row in kept.per_clip if row["file_url"].endswith("c0.wav"))["n"] == 20


def test_analysis_files_and_csv_round_trip(tmp_path):
    test = synthetic_test("p835", tmp_path / "test")
    rows, _ = crowd(test, TRUE_MEANS["p835"], raters=12)
    analysis = analyze(test, rows)
    written, no_plot = analysis.write(tmp_path / "report")
    names = {path.name for path in written}
    assert {"votes_per_clip.csv", "votes_per_condition.csv", "submissions.csv", "votes.csv", "report.md"} <= names
    try:
        import matplotlib  # noqa: F401
        assert "mos_per_condition.png" in names and no_plot is None
        assert (tmp_path / "report" / "mos_per_condition.png").read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        assert no_plot == "no plot: matplotlib is not installed"
    header = next(csv.reader(open(tmp_path / "report" / "votes_per_condition.csv")))
    assert header == ["condition_name", "n", "MOS_SIG", "std_sig", "95%CI_sig", "n_sig", "MOS_BAK", "std_bak",
                      "95%CI_bak", "n_bak", "MOS_OVRL", "std_ovrl", "95%CI_ovrl", "n_ovrl"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| A |" in report and "rejected (unplayed 1, headphone 1, trap 1, gold 1, variance 1)" in report

    again = analyze(test, read_votes_csv(tmp_path / "report" / "votes.csv"))
    assert again.per_condition == analysis.per_condition


def test_analyze_command_reads_the_database_and_offline_csvs(served, tmp_path):
    server, test, request = served
    session = test.session(request("/api/start", {"rater": "ann"})[1]["session"]["id"])
    rng = np.random.default_rng(0)
    threes = {condition: {"acr": 3.0} for condition in "ABC"}
    rows = rater_votes(test, "ann", session, rng, threes)
    for item in session.items:
        votes = {row["scale"]: row["vote"] for row in rows if row["item"] == item.id}
        assert answer(request, "ann", session, item, votes)[0] == 200
    offline = tmp_path / "votes_bob.csv"
    other = next(s for s in test.sessions if s.id != session.id)
    with open(offline, "w", newline="") as file:
        writer = csv.DictWriter(file, ["rater", "session", "item", "scale", "vote", "played", "played_at",
                                       "voted_at"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rater_votes(test, "bob", other, rng, threes, "trap"))

    result = CliRunner().invoke(main, ["p808", "analyze", str(tmp_path / "test"), "--out", str(tmp_path / "r"),
                                       "--db", str(server.store.path), "--votes", str(offline)])
    assert result.exit_code == 0, result.output
    submissions = list(csv.DictReader(open(tmp_path / "r" / "submissions.csv")))
    assert {(s["rater"], s["accepted"], s["rejected"]) for s in submissions} == {("ann", "1", ""),
                                                                                ("bob", "0", "trap")}
    assert "# P.808 listening test (ACR)" in result.output

    bad = tmp_path / "bad.csv"
    bad.write_text("rater,session\nx,s001\n")
    result = CliRunner().invoke(main, ["p808", "analyze", str(tmp_path / "test"), "--out", str(tmp_path / "r"),
                                       "--votes", str(bad)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "no column item" in result.output
    result = CliRunner().invoke(main, ["p808", "analyze", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a test folder" in result.output
