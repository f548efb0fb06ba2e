"""The test definition shared by build, serve and analyze: methods, scales, sessions, items, valid votes.

A built test folder holds `test.json`: the method, how many raters each session should get, and every session
as a list of items in the order a rater sees them. An item is one screen of the page:

    volume      play a speech sample and set a comfortable volume (vote "volume": 1 once it was heard)
    headphone   two digits, one spoken in the left ear only, one in the right; the rater types both
    training    clips spanning the quality range, rated like the rest but never counted
    rating      a clip of a condition (CCR: the processed clip and its reference, in the order played)
    gold        a clip with a known answer: a clean reference (5) or a strongly degraded one (1); CCR: -3
    trap        a clip that asks, in a synthetic voice, for a given answer (CCR: the reference against itself)

The page sees neither the roles of rating/gold/trap items nor the answers (`public_session`), and the server
takes from it only what `check_vote` accepts. `answer` and votes are in the orientation of the analysis: for CCR
"the processed clip compared to the reference" (+3 much better ... -3 much worse), whatever order they played in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = 1
METHODS = ("acr", "ccr", "p835")
SCALES = {"acr": ("acr",), "ccr": ("ccr",), "p835": ("sig", "bak", "ovrl")}
SCALE_RANGES = {"acr": (1, 5), "sig": (1, 5), "bak": (1, 5), "ovrl": (1, 5), "ccr": (-3, 3),
                "left": (0, 9), "right": (0, 9), "volume": (1, 1)}
ROLES = ("volume", "headphone", "training", "rating", "gold", "trap")
SCORED_ROLES = ("training", "rating", "gold", "trap")  # items rated on the method's scales
REFERENCE_FIRST, PROCESSED_FIRST = "RP", "PR"  # CCR presentation orders


class P808Error(ValueError):
    """Bad input or a test that cannot be built, served or analysed: one line for the user."""


class VoteError(ValueError):
    """A vote submission that does not fit its item (answered with HTTP 400, nothing stored)."""


@dataclass
class Item:
    """One screen of a session; `clips` are paths relative to the test folder, in the order they play."""

    id: str
    role: str
    clips: list[str]
    condition: str = ""  # rating items: the condition the rated clip belongs to
    answer: dict[str, int] = field(default_factory=dict)  # gold, trap, headphone: expected vote per scale
    tolerance: int = 0  # |vote - answer| allowed (P.808: gold +-1, trap exact; CCR trap: -1..1)
    order: str = ""  # CCR: REFERENCE_FIRST or PROCESSED_FIRST

    def scales(self, method: str) -> tuple[str, ...]:
        """The scales this item is voted on."""
        if self.role == "volume":
            return ("volume",)
        if self.role == "headphone":
            return ("left", "right")
        return SCALES[method]

    @property
    def rated_clip(self) -> str:
        """The clip the votes are about: for CCR the processed one, not the reference."""
        return self.clips[0] if self.order == PROCESSED_FIRST else self.clips[-1]

    def oriented(self, scale: str, vote: int) -> int:
        """A vote as analysed: CCR votes rate the second clip against the first, so flip when processed came first."""
        return -vote if scale == "ccr" and self.order == PROCESSED_FIRST else vote


@dataclass
class Session:
    id: str
    items: list[Item]

    def item(self, item_id: str) -> Item | None:
        return next((item for item in self.items if item.id == item_id), None)


@dataclass
class ListeningTest:
    """A built test: `folder` is where test.json and the clips live (None for a test made in memory)."""

    method: str
    sessions: list[Session]
    raters_per_session: int = 5
    seed: int = 0
    clip_names: dict[str, str] = field(default_factory=dict)  # clip path -> what it is (see build.py)
    folder: Path | None = None

    def session(self, session_id: str) -> Session | None:
        return next((s for s in self.sessions if s.id == session_id), None)

    def public_session(self, session: Session) -> dict:
        """What the page needs to run a session: no roles beyond volume/headphone/training, no answers."""
        kinds = {"volume": "volume", "headphone": "headphone", "training": "training"}
        return {"id": session.id, "method": self.method,
                "items": [{"id": item.id, "kind": kinds.get(item.role, "rate"), "clips": item.clips,
                           "scales": list(item.scales(self.method))} for item in session.items]}

    def check_vote(self, session_id: object, item_id: object, votes: object) -> tuple[Session, Item, dict[str, int]]:
        """The session, item and votes of a submission, or VoteError saying what is wrong with it."""
        session = self.session(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise VoteError(f"unknown session {session_id!r}")
        item = session.item(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise VoteError(f"session {session.id} has no item {item_id!r}")
        expected = item.scales(self.method)
        if not isinstance(votes, dict) or set(votes) != set(expected):
            raise VoteError(f"item {item.id} takes votes for exactly {', '.join(expected)}")
        for scale, vote in votes.items():
            low, high = SCALE_RANGES[scale]
            # bool is an int in Python: true must not pass as a vote of 1
            if isinstance(vote, bool) or not isinstance(vote, int) or not low <= vote <= high:
                raise VoteError(f"vote {scale!r} must be an integer from {low} to {high}, got {vote!r}")
        return session, item, dict(votes)

    def save(self) -> Path:
        """Write test.json into `folder` (atomically)."""
        assert self.folder is not None
        data = {"format": FORMAT, "method": self.method, "raters_per_session": self.raters_per_session,
                "seed": self.seed, "clip_names": self.clip_names,
                "sessions": [asdict(session) for session in self.sessions]}
        path = self.folder / "test.json"
        temporary = path.with_name(".test.json.tmp")
        temporary.write_text(json.dumps(data, indent=1))
        os.replace(temporary, path)
        return path


def load_test(folder: str | Path) -> ListeningTest:
    """Read the test.json of a test folder built by `quell p808 build`."""
    folder = Path(folder)
    path = folder / "test.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise P808Error(f"{folder} is not a test folder: no test.json (make one with `quell p808 build`)") from None
    except (OSError, ValueError) as error:
        raise P808Error(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("method") not in METHODS:
        raise P808Error(f"{path} is not a test definition of this version of quell")
    sessions = [Session(s["id"], [Item(**item) for item in s["items"]]) for s in data["sessions"]]
    return ListeningTest(data["method"], sessions, data["raters_per_session"], data["seed"], data["clip_names"],
                         folder)
