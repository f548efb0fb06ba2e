"""StreamingModel: drives any exported step graph from its model card and owns its states.

One hop costs one `run_with_iobinding` and allocates nothing: the audio hop, the enhanced hop and two sets of
state tensors live in preallocated numpy arrays bound to the session once. Two bindings alternate (states A in
-> B out, then B in -> A out), so no state is copied between hops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from quell.streaming.card import ModelCard

_BLOCK_HOPS = 512  # hops per sequence-graph call when processing long signals


def make_session(path: Path, threads: int = 1, providers: list[str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session tuned for small sequential graphs (one thread unless told otherwise)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


class StreamingModel:
    """One stream (one channel) through a model: `step` one hop at a time or `process` many hops at once.

    Both keep the same states, so they can be mixed; the output is the model's stream output, delayed by
    `card.delay` samples with respect to the input.
    """

    def __init__(
        self, card: ModelCard | str | Path, threads: int = 1, providers: list[str] | None = None,
        sessions: dict[str, ort.InferenceSession] | None = None,
    ):
        self.card = card if isinstance(card, ModelCard) else ModelCard.load(card)
        if sessions is None:
            sessions = {"step": make_session(self.card.graph_path("step"), threads, providers)}
            if self.card.sequence_graph:
                sessions["sequence"] = make_session(self.card.graph_path("sequence"), threads, providers)
        self.sessions = sessions
        hop = self.card.hop
        self._audio = np.zeros((1, hop), np.float32)
        self._enhanced = np.zeros((1, hop), np.float32)
        self._reference = np.zeros((1, hop), np.float32) if self.card.reference_input else None
        self._states = [[np.zeros(s.shape, s.dtype) for s in self.card.states] for _ in range(2)]
        self._bindings = [self._bind(self._states[i], self._states[1 - i]) for i in range(2)]
        self._turn = 0

    def _bind(self, states_in: list[np.ndarray], states_out: list[np.ndarray]) -> ort.IOBinding:
        binding = self.sessions["step"].io_binding()
        ortvalue = ort.OrtValue.ortvalue_from_numpy  # shares the numpy array's memory on CPU
        binding.bind_ortvalue_input(self.card.audio_input, ortvalue(self._audio))
        if self._reference is not None:
            binding.bind_ortvalue_input(self.card.reference_input, ortvalue(self._reference))
        binding.bind_ortvalue_output(self.card.audio_output, ortvalue(self._enhanced))
        for spec, state_in, state_out in zip(self.card.states, states_in, states_out, strict=True):
            binding.bind_ortvalue_input(spec.name, ortvalue(state_in))
            binding.bind_ortvalue_output(spec.output, ortvalue(state_out))
        return binding

    @property
    def states(self) -> list[np.ndarray]:
        """The current state tensors (views: copy them to keep them)."""
        return self._states[self._turn]

    def zero_states(self, names: list[str]) -> None:
        """Zero the named states (the others go on): what the next hop starts from."""
        wanted = set(names)
        for spec, state in zip(self.card.states, self._states[self._turn], strict=True):
            if spec.name in wanted:
                state.fill(0.0)

    def reset(self) -> None:
        """Back to silence: every state zero."""
        for states in self._states:
            for state in states:
                state.fill(0.0)
        self._turn = 0

    def step(self, audio: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
        """Enhance one hop. Returns a view of an internal buffer, valid until the next call."""
        self._audio[0] = audio
        if self._reference is not None:
            self._reference[0] = 0.0 if reference is None else reference
        self.sessions["step"].run_with_iobinding(self._bindings[self._turn])
        self._turn = 1 - self._turn
        return self._enhanced[0]

    def process(self, audio: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
        """Enhance a whole number of hops; uses the sequence graph when there is one (same result as `step`)."""
        hop = self.card.hop
        if audio.size % hop:
            raise ValueError(f"process() takes a multiple of the hop ({hop} samples), got {audio.size}")
        pieces = [np.zeros(0, np.float32)]
        for start in range(0, audio.size, _BLOCK_HOPS * hop):
            stop = min(start + _BLOCK_HOPS * hop, audio.size)
            ref = None if reference is None else reference[start:stop]
            if "sequence" in self.sessions and stop - start >= 2 * hop:  # the sequence graph takes two hops or more
                pieces.append(self._sequence(audio[start:stop], ref))
            else:
                for i in range(0, stop - start, hop):
                    step_ref = None if ref is None else ref[i : i + hop]
                    pieces.append(self.step(audio[start + i : start + i + hop], step_ref).copy())
        return np.concatenate(pieces)

    def _sequence(self, audio: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
        """Many hops in one call of the sequence graph, the states carried in and out."""
        session = self.sessions["sequence"]
        feeds = {self.card.audio_input: np.ascontiguousarray(audio, np.float32)[None]}
        if self.card.reference_input:
            ref = np.zeros(audio.size, np.float32) if reference is None else reference
            feeds[self.card.reference_input] = np.ascontiguousarray(ref, np.float32)[None]
        states = self._states[self._turn]
        feeds.update({spec.name: state for spec, state in zip(self.card.states, states, strict=True)})
        outputs = dict(zip((o.name for o in session.get_outputs()), session.run(None, feeds), strict=True))
        for spec, state in zip(self.card.states, states, strict=True):
            state[...] = outputs[spec.output]
        return outputs[self.card.audio_output][0]
