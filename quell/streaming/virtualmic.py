"""A virtual microphone on PulseAudio or PipeWire (through `pactl`): what quell plays, any app records.
Also the monitor source of a sink, which `quell live --aec` records to hear what the speakers play.

    with VirtualMicrophone("quell", rate=48000) as mic:
        ...                       # play into the sink `mic.sink`; apps pick the source "quell" as their microphone

Two server modules: a null sink that quell plays into, and a source named "quell" remapped from the sink's
monitor. The remap matters: many apps hide monitor sources from their microphone menus, never a real source.
Both modules are unloaded when the `with` block ends, however it ends; the caller turns signals into a normal
exit so that this happens on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import os
import shutil
import subprocess


class VirtualMicError(OSError):
    """The virtual microphone cannot be made, or the sound server asked (no pactl, no server, a name taken)."""


def _pactl(*args: str) -> str:
    if shutil.which("pactl") is None:
        raise VirtualMicError("--virtual-mic and --aec need PulseAudio or PipeWire's pactl (not found on PATH)")
    try:
        # LC_ALL=C: `pactl list` and `pactl info` label their fields in the user's language otherwise
        done = subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=10,
                              env=os.environ | {"LC_ALL": "C"})
    except subprocess.TimeoutExpired as error:
        raise VirtualMicError(f"pactl {args[0]} did not answer in 10 s") from error
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[0]
        raise VirtualMicError(f"pactl {args[0]} failed: {reason}")
    return done.stdout


def _fields(kind: str, field: str) -> dict[str, str]:
    """Name -> the value of `field` (e.g. "Owner Module") of every sink or source (`pactl list sinks|sources`)."""
    values, name = {}, None
    for line in _pactl("list", kind).splitlines():
        line = line.strip()
        if line.startswith("Name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith(f"{field}:") and name is not None:
            values[name] = line.split(":", 1)[1].strip()
    return values


def _default(kind: str) -> str | None:
    """The server's default "Sink" or "Source", or None when it has none."""
    for line in _pactl("info").splitlines():
        if line.startswith(f"Default {kind}:"):
            name = line.split(":", 1)[1].strip()
            return name if name and name != f"@DEFAULT_{kind.upper()}@" else None
    return None


def default_source() -> str | None:
    """The server's default source (the user's microphone), or None when it has none."""
    return _default("Source")


def monitor_source(sink: str | None = None) -> str | None:
    """The monitor source of `sink` (None: the server's default sink), which carries what the sink plays; None
    when there is no such sink or it has no monitor."""
    sink = sink or _default("Sink")
    monitor = _fields("sinks", "Monitor Source").get(sink) if sink else None
    return monitor if monitor and monitor != "n/a" else None


class VirtualMicrophone:
    """A source named `name` that plays back whatever is played into the null sink `sink` (see the module)."""

    def __init__(self, name: str = "quell", rate: int = 48000, channels: int = 1):
        self.name, self.rate, self.channels = name, rate, channels
        self.sink = f"{name}_output"
        self._modules: list[str] = []

    def __enter__(self) -> VirtualMicrophone:
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def create(self) -> None:
        """Load the null sink and the source; a name that is taken is an error (another quell running?)."""
        for kind, name in (("sources", self.name), ("sinks", self.sink)):
            owner = _fields(kind, "Owner Module").get(name)
            if owner is not None:
                raise VirtualMicError(f"a {kind[:-1]} named {name!r} exists already (another quell live "
                                      f"--virtual-mic? a stale one goes with: pactl unload-module {owner})")
        try:
            self._load("module-null-sink", f"sink_name={self.sink}", f"rate={self.rate}",
                       f"channels={self.channels}", f"sink_properties=device.description={self.sink}")
            self._load("module-remap-source", f"master={self.sink}.monitor", f"source_name={self.name}",
                       f"source_properties=device.description={self.name}")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Unload what `create` loaded (newest first); a server that is gone has nothing left to remove."""
        while self._modules:
            module = self._modules.pop()
            try:
                _pactl("unload-module", module)
            except VirtualMicError:
                pass

    def _load(self, module: str, *arguments: str) -> None:
        self._modules.append(_pactl("load-module", module, *arguments).strip())
