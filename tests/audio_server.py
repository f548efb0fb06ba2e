"""A PulseAudio server of the tests' own, in a temporary runtime folder, for `quell live` (see test_live_server)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest


def skip_without_portaudio() -> None:
    """Skip unless sounddevice and the PortAudio library (apt libportaudio2) are both there."""
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError) as error:
        pytest.skip(f"needs sounddevice and PortAudio: {error}")


class PulseServer:
    """A PulseAudio daemon of our own: its runtime folder, its environment for clients, and pactl."""

    def __init__(self, folder: Path, sink: str = "format=float32le rate=48000 channels=1"):
        """`sink`: the null sinks' sample spec ("": the server's default, 16-bit stereo at 44.1 kHz)."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "client.conf").write_text("autospawn = no\n")  # a client must never start a server of its own
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "PIPEWIRE_"))}
        self.env = inherited | {"XDG_RUNTIME_DIR": str(folder), "HOME": str(folder),
                                "PULSE_CLIENTCONFIG": str(folder / "client.conf")}
        self.log = folder / "pulseaudio.log"
        self.process = subprocess.Popen(
            ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no", "--log-level=error",
             "-L", "module-native-protocol-unix auth-anonymous=1",
             "-L", f"module-null-sink sink_name=mic {sink}", "-L", f"module-null-sink sink_name=spk {sink}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=(log := self.log.open("w")))
        log.close()  # the server has its own copy
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], env=self.env, capture_output=True).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.skip(f"pulseaudio did not start: {self.log.read_text().strip()[-300:]}")
            time.sleep(0.05)
        self.pactl("set-default-source", "mic.monitor")
        self.pactl("set-default-sink", "spk")

    def pactl(self, *args: str) -> str:
        return subprocess.run(["pactl", *args], env=self.env, capture_output=True, text=True, check=True).stdout

    def names(self, kind: str) -> list[str]:
        """Names of the server's sinks, sources or modules."""
        return [line.split("\t")[1] for line in self.pactl("list", "short", kind).splitlines()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
