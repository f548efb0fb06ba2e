"""The model card: everything the engine needs to drive a step graph, and what a user wants to know of it.

A card is a JSON file next to its ONNX graphs. The engine reads rate, hop, delay, input/output names and the
state tensors from it; it never knows a model by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CARD_FORMAT = 1


@dataclass
class StateSpec:
    """One state tensor: fed as input `name`, returned as output `output`, zeros at start."""

    name: str
    output: str
    shape: list[int]
    dtype: str = "float32"


@dataclass
class ModelCard:
    """A model's contract with the runtime (see DESIGN.md) plus its provenance and measured scores."""

    name: str
    task: str  # "denoise" or "echo"
    sample_rate: int
    hop: int
    window: int
    delay: int  # samples (model rate) by which the step graph's output lags its input, hop buffering aside
    step_graph: str  # file name, relative to the card
    audio_input: str
    audio_output: str
    states: list[StateSpec]
    sequence_graph: str | None = None  # same contract, any number of hops per call
    reference_input: str | None = None  # far-end signal, for echo cancellers
    reference_lead: int = 0  # samples (model rate) by which the aligned reference should precede its echo
    # states that hold the echo path at the reference's current alignment (a linear filter's): zeroed when the
    # alignment jumps, as weights for the old alignment would only have to be unlearnt
    realign_states: list[str] = field(default_factory=list)
    parameters: int = 0
    precision: str = "float32"  # of the graphs' weights: "float32", or "int8" (quell export --int8)
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    format: int = CARD_FORMAT
    path: Path | None = field(default=None, repr=False, compare=False)

    @property
    def algorithmic_latency(self) -> float:
        """Seconds from a sample entering to its enhanced version leaving, with whole-hop input buffering."""
        return (self.delay + self.hop) / self.sample_rate

    def graph_path(self, which: str = "step") -> Path:
        """Absolute path of the step or sequence graph."""
        name = self.step_graph if which == "step" else self.sequence_graph
        if name is None:
            raise ValueError(f"model {self.name!r} has no {which} graph")
        return (self.path.parent if self.path else Path(".")) / name

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        data["algorithmic_latency_ms"] = round(self.algorithmic_latency * 1000, 3)
        return json.dumps(data, indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_json())
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read a card; a file that is not a card of a format this runtime knows raises ValueError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            data.pop("algorithmic_latency_ms", None)
            if data.get("format") != CARD_FORMAT:
                raise ValueError(f"card format {data.get('format')!r}, this runtime reads {CARD_FORMAT}")
            data["states"] = [StateSpec(**s) for s in data["states"]]
            card = cls(**data)
            unknown = set(card.realign_states) - {s.name for s in card.states}
            if unknown:
                raise KeyError(f"realign_states names no state {', '.join(sorted(unknown))}")
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as error:
            raise ValueError(f"{path}: not a quell model card ({error})") from error
        card.path = path
        return card
