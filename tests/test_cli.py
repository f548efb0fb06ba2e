"""`quell denoise` end to end: files and folders in, enhanced files out, and every kind of bad input.

The model is the tiny random DTLN of conftest, so these tests check the plumbing (tree, formats, lengths,
skipping, atomic writes, errors), not the enhancement.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import quell.streaming.files as files
from quell.cli import main

SUMMARY = re.compile(r"^(\d+) enhanced, (\d+) skipped, (\d+) failed; \d+\.\d{3} h of audio in \d+\.\d s "
                     r"\(\d+x real time\)$")


def noisy_tones(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Tones plus a little noise, different in every channel, in [frames, channels]."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    chans = [0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.02 * rng.standard_normal(t.size)
             for c in range(channels)]
    return np.stack(chans, 1).astype(np.float32)


def write(path: Path, seconds: float, rate: int, channels: int = 1, subtype: str | None = None, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, noisy_tones(seconds, rate, channels, seed), rate, subtype)
    return path


def denoise(card: Path, *args: str, quiet: bool = True):
    """Runs `quell denoise ARGS --model CARD` in-process; stdout and stderr apart."""
    extra = ["--model", str(card)] + (["--quiet"] if quiet else [])
    return CliRunner().invoke(main, ["denoise", *map(str, args), *extra])


def summary_counts(result) -> tuple[int, int, int]:
    match = SUMMARY.match(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout
    return tuple(map(int, match.groups()))


def assert_one_error(result, exit_code: int, *words: str) -> None:
    """Exactly one line on stderr, "error: ...", naming `words`; no traceback; the given exit status."""
    assert result.exit_code == exit_code, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]


def assert_no_partial(folder: Path) -> None:
    assert not list(folder.rglob("*.part")), list(folder.rglob("*.part"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A nested folder of wav/flac/ogg, mono and stereo, 16 and 44.1 kHz, plus a file that is not audio."""
    root = tmp_path_factory.mktemp("tree") / "in"
    write(root / "top.wav", 1.0, 16000, 1, "PCM_16", seed=1)
    write(root / "a" / "stereo44.flac", 0.7, 44100, 2, "PCM_24", seed=2)
    write(root / "a" / "float16.wav", 0.6, 16000, 2, "FLOAT", seed=3)
    write(root / "a" / "b" / "mono44.ogg", 0.5, 44100, 1, seed=4)
    write(root / "a" / "b" / "stereo16.ogg", 0.5, 16000, 2, seed=5)
    (root / "a" / "notes.txt").write_text("not audio, not an input")
    return root


@pytest.fixture(scope="module")
def enhanced_tree(tree, tiny_dtln_card, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enhanced") / "out"
    result = denoise(tiny_dtln_card, tree, "-o", out)
    assert result.exit_code == 0, result.output
    assert summary_counts(result) == (5, 0, 0)
    return out


def relative_audio(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def test_folder_tree_is_mirrored_with_rate_channels_length_and_subtype_kept(tree, enhanced_tree):
    inputs = [p for p in relative_audio(tree) if p.suffix != ".txt"]
    assert relative_audio(enhanced_tree) == inputs
    for name in inputs:
        src, dst = sf.info(tree / name), sf.info(enhanced_tree / name)
        assert (dst.format, dst.subtype, dst.samplerate, dst.channels, dst.frames) == \
            (src.format, src.subtype, src.samplerate, src.channels, src.frames), name
        assert np.isfinite(sf.read(enhanced_tree / name)[0]).all()
    assert_no_partial(enhanced_tree)


def test_each_channel_is_enhanced_on_its_own(tiny_dtln_card, tmp_path):
    stereo = noisy_tones(0.8, 44100, 2)
    sf.write(tmp_path / "stereo.wav", stereo, 44100, "FLOAT")
    sf.write(tmp_path / "left.wav", stereo[:, 0], 44100, "FLOAT")
    sf.write(tmp_path / "right.wav", stereo[:, 1], 44100, "FLOAT")
    assert denoise(tiny_dtln_card, tmp_path, "-o", tmp_path / "out").exit_code == 0
    both = sf.read(tmp_path / "out" / "stereo.wav")[0]
    for c, name in enumerate(["left.wav", "right.wav"]):
        np.testing.assert_allclose(both[:, c], sf.read(tmp_path / "out" / name)[0], atol=1e-6)
    assert np.abs(both[:, 0] - both[:, 1]).max() > 1e-2  # and the channels were not mixed


def test_jobs_2_gives_the_same_outputs_as_jobs_1(tree, enhanced_tree, tiny_dtln_card, tmp_path):
    result = denoise(tiny_dtln_card, tree, "-o", tmp_path / "out", "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert summary_counts(result) == (5, 0, 0)
    assert relative_audio(tmp_path / "out") == relative_audio(enhanced_tree)
    for name in relative_audio(enhanced_tree):
        np.testing.assert_allclose(sf.read(tmp_path / "out" / name)[0], sf.read(enhanced_tree / name)[0],
                                   atol=1e-5, err_msg=str(name))


def test_second_run_skips_finished_outputs_and_overwrite_redoes_them(tree, tiny_dtln_card, tmp_path):
    out = tmp_path / "out"
    assert denoise(tiny_dtln_card, tree, "-o", out).exit_code == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    os.utime(out / "top.wav", ns=(1, 1))  # an old mtime: a rewrite shows even within the clock's resolution
    stamps[out / "top.wav"] = 1
    again = denoise(tiny_dtln_card, tree, "-o", out)
    assert again.exit_code == 0 and summary_counts(again) == (0, 5, 0)
    assert "skipped" in again.stderr and "error" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.*")} == stamps
    redo = denoise(tiny_dtln_card, tree, "-o", out, "--overwrite")
    assert redo.exit_code == 0 and summary_counts(redo) == (5, 0, 0)
    assert (out / "top.wav").stat().st_mtime_ns != 1
    assert_no_partial(out)


def test_summary_line_has_counts_hours_wall_time_and_real_time_factor(tree, tiny_dtln_card, tmp_path):
    result = denoise(tiny_dtln_card, tree / "top.wav", "-o", tmp_path / "top.wav")
    line = result.stdout.strip()
    assert SUMMARY.match(line), line
    assert "1 enhanced, 0 skipped, 0 failed; 0.000 h of audio in" in line and "x real time" in line


def test_single_file_to_file_and_format_and_subtype_options(tree, tiny_dtln_card, tmp_path):
    result = denoise(tiny_dtln_card, tree / "a" / "stereo44.flac", "-o", tmp_path / "one.wav")
    assert result.exit_code == 0, result.output
    info = sf.info(tmp_path / "one.wav")
    assert (info.format, info.subtype, info.channels, info.samplerate, info.frames) == ("WAV", "PCM_24", 2, 44100,
                                                                                         round(0.7 * 44100))
    assert relative_audio(tmp_path) == [Path("one.wav")]

    result = denoise(tiny_dtln_card, tree, "-o", tmp_path / "flac", "--format", "flac", "--subtype", "PCM_24")
    assert result.exit_code == 0, result.output
    outputs = relative_audio(tmp_path / "flac")
    assert [p.with_suffix("") for p in outputs] == [p.with_suffix("") for p in relative_audio(tree)
                                                     if p.suffix != ".txt"]
    for name in outputs:
        info = sf.info(tmp_path / "flac" / name)
        assert (name.suffix, info.format, info.subtype) == (".flac", "FLAC", "PCM_24")


def test_chunked_processing_keeps_length_and_does_not_change_the_output(tiny_dtln_card, tmp_path, monkeypatch):
    write(tmp_path / "in" / "long.wav", 60.0, 16000, 1, "FLOAT")
    write(tmp_path / "in" / "stereo44.wav", 4.0, 44100, 2, "FLOAT")
    assert denoise(tiny_dtln_card, tmp_path / "in", "-o", tmp_path / "whole").exit_code == 0
    monkeypatch.setattr(files, "_BLOCK_SECONDS", 0.37)
    assert denoise(tiny_dtln_card, tmp_path / "in", "-o", tmp_path / "blocks").exit_code == 0
    for name in ("long.wav", "stereo44.wav"):
        whole, blocks = sf.read(tmp_path / "whole" / name)[0], sf.read(tmp_path / "blocks" / name)[0]
        assert whole.shape == sf.read(tmp_path / "in" / name)[0].shape
        np.testing.assert_allclose(blocks, whole, atol=1e-5, err_msg=name)


def test_odd_but_valid_files_are_processed_with_their_format_kept(tiny_dtln_card, tmp_path):
    cases = {  # name: (rate, channels, subtype)
        "r8k.wav": (8000, 1, "PCM_16"), "r192k.wav": (192000, 1, "PCM_24"), "six.wav": (16000, 6, "PCM_16"),
        "u8.wav": (16000, 1, "PCM_U8"), "p24.wav": (44100, 2, "PCM_24"), "float.wav": (48000, 1, "FLOAT"),
        "tiny.wav": (16000, 1, "PCM_16"),
    }
    for name, (rate, channels, subtype) in cases.items():
        seconds = 3 / rate if name == "tiny.wav" else 0.3  # three samples: shorter than one hop
        write(tmp_path / "in" / name, seconds, rate, channels, subtype)
    sf.write(tmp_path / "in" / "zeros.wav", np.zeros((8000, 2), np.float32), 16000, "PCM_16")
    result = denoise(tiny_dtln_card, tmp_path / "in", "-o", tmp_path / "out")
    assert result.exit_code == 0 and summary_counts(result) == (8, 0, 0), result.output
    for name in [*cases, "zeros.wav"]:
        src, dst = sf.info(tmp_path / "in" / name), sf.info(tmp_path / "out" / name)
        assert (dst.subtype, dst.samplerate, dst.channels, dst.frames) == \
            (src.subtype, src.samplerate, src.channels, src.frames), name
        assert np.isfinite(sf.read(tmp_path / "out" / name)[0]).all(), name
    assert np.abs(sf.read(tmp_path / "out" / "zeros.wav")[0]).max() < 1e-4  # silence in, silence out


# ---- bad input: one line, "error: ...", no traceback; nothing overwritten, nothing partial ---------------------

def test_missing_input(tiny_dtln_card, tmp_path):
    result = denoise(tiny_dtln_card, tmp_path / "nope.wav", "-o", tmp_path / "out.wav")
    assert_one_error(result, 2, "nope.wav", "no such file")
    assert relative_audio(tmp_path) == []


def test_folder_without_audio(tiny_dtln_card, tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "readme.txt").write_text("hello")
    result = denoise(tiny_dtln_card, tmp_path / "in", "-o", tmp_path / "out")
    assert_one_error(result, 2, "no audio files")
    assert not (tmp_path / "out").exists()


def test_unknown_model(tree, tmp_path):
    result = CliRunner().invoke(main, ["denoise", str(tree / "top.wav"), "-o", str(tmp_path / "o.wav"),
                                       "--model", "no-such-model"])
    assert_one_error(result, 2, "unknown model", "no-such-model")
    assert not (tmp_path / "o.wav").exists()


def _text(path: Path) -> None:
    path.write_text("this is text, not audio")


def _empty(path: Path) -> None:
    sf.write(path, np.zeros(0, np.float32), 16000)


def _float_with(bad: float, at: int):
    def make(path: Path) -> None:
        samples = noisy_tones(1.0, 16000)
        samples[at] = bad
        sf.write(path, samples, 16000, "FLOAT")
    return make


@pytest.mark.parametrize("make, words", [
    (_text, ["not a readable audio file"]),
    (_empty, ["empty"]),
    (_float_with(np.nan, 100), ["NaN or Inf"]),
    (_float_with(np.inf, 100), ["NaN or Inf"]),
    (_float_with(-np.inf, 15000), ["NaN or Inf"]),  # in the last block: a partial output to remove
], ids=["text", "empty", "nan", "inf", "late-inf"])
def test_a_file_that_cannot_be_processed_fails_cleanly(tiny_dtln_card, tmp_path, monkeypatch, make, words):
    monkeypatch.setattr(files, "_BLOCK_SECONDS", 0.25)
    src = tmp_path / "bad.wav"
    make(src)
    before = src.read_bytes()
    result = denoise(tiny_dtln_card, src, "-o", tmp_path / "out" / "bad.wav")
    assert_one_error(result, 1, "bad.wav", *words)
    assert summary_counts(result) == (0, 0, 1)
    assert src.read_bytes() == before
    assert list((tmp_path / "out").rglob("*")) == []  # no output, not even a temporary one


def test_corrupt_stream_fails_that_file_and_the_batch_goes_on(tree, tiny_dtln_card, tmp_path):
    flac = write(tmp_path / "in" / "good.flac", 3.0, 16000)
    data = bytearray(flac.read_bytes())
    data[len(data) // 2 :] = np.random.default_rng(0).integers(0, 256, len(data) - len(data) // 2, np.uint8).tobytes()
    (tmp_path / "in" / "corrupt.flac").write_bytes(data)  # a valid header, then garbage mid-stream
    result = denoise(tiny_dtln_card, tmp_path / "in", "-o", tmp_path / "out")
    assert_one_error(result, 1, "corrupt.flac")
    assert summary_counts(result) == (1, 0, 1)
    assert relative_audio(tmp_path / "out") == [Path("good.flac")]


def test_one_bad_file_in_a_batch_the_good_ones_are_still_written(tree, tiny_dtln_card, tmp_path):
    (tmp_path / "bad.wav").write_text("not audio")
    result = denoise(tiny_dtln_card, tree / "top.wav", tmp_path / "bad.wav", tree / "a", "-o", tmp_path / "out",
                     quiet=False)  # with the progress bar: the error line still goes to stderr
    assert result.exit_code == 1
    assert summary_counts(result) == (5, 0, 1)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "bad.wav" in errors[0] and "Traceback" not in result.stderr
    assert "error" not in result.stdout
    assert relative_audio(tmp_path / "out") == sorted(
        [Path("top.wav")] + [p for p in relative_audio(tree / "a") if p.suffix != ".txt"])


def test_output_whose_parent_is_a_file_cannot_be_written(tree, tiny_dtln_card, tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    result = denoise(tiny_dtln_card, tree / "top.wav", "-o", tmp_path / "afile" / "out.wav")
    assert_one_error(result, 1, "cannot write", "not a folder")
    result = denoise(tiny_dtln_card, tree / "a", "-o", tmp_path / "afile" / "deeper")
    assert result.exit_code == 1 and summary_counts(result) == (0, 0, 4)
    assert (tmp_path / "afile").read_text() == "a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_a_read_only_folder_cannot_be_written(tree, tiny_dtln_card, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(0o500)
    try:
        result = denoise(tiny_dtln_card, tree / "top.wav", "-o", locked / "out.wav")
    finally:
        locked.chmod(0o700)
    assert_one_error(result, 1, "cannot write")
    assert list(locked.iterdir()) == []


def test_input_is_never_overwritten(tree, tiny_dtln_card, tmp_path):
    src = write(tmp_path / "in" / "a.wav", 0.5, 16000)
    other = write(tmp_path / "in" / "sub" / "a.wav", 0.5, 16000, seed=1)
    before = {p: p.read_bytes() for p in (tmp_path / "in").rglob("*.wav")}
    for args in ([src, "-o", src], [src, "-o", src, "--overwrite"], [tmp_path / "in", "-o", tmp_path / "in"],
                 [src, other, "-o", other.parent, "--overwrite"]):  # in/a.wav -> in/sub/a.wav, another input
        assert_one_error(denoise(tiny_dtln_card, *args), 2, "would overwrite an input")
    assert {p: p.read_bytes() for p in (tmp_path / "in").rglob("*.wav")} == before
    assert_no_partial(tmp_path)


def test_two_inputs_for_one_output_are_refused(tiny_dtln_card, tmp_path):
    write(tmp_path / "x" / "take.wav", 0.3, 16000)
    write(tmp_path / "y" / "take.wav", 0.3, 16000, seed=1)
    result = denoise(tiny_dtln_card, tmp_path / "x" / "take.wav", tmp_path / "y" / "take.wav", "-o", tmp_path / "o")
    assert_one_error(result, 2, "take.wav", "both")
    write(tmp_path / "z" / "take.flac", 0.3, 16000)
    write(tmp_path / "z" / "take.wav", 0.3, 16000, seed=1)
    result = denoise(tiny_dtln_card, tmp_path / "z", "-o", tmp_path / "o", "--format", "ogg")
    assert_one_error(result, 2, "take.ogg", "both")
    assert not (tmp_path / "o").exists()


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tiny_dtln_card, tmp_path):
    write(tmp_path / "rec" / "a.wav", 0.3, 16000)
    write(tmp_path / "rec" / "day" / "b.wav", 0.3, 16000, seed=1)
    first = denoise(tiny_dtln_card, tmp_path / "rec", "-o", tmp_path / "rec" / "clean")
    assert first.exit_code == 0 and summary_counts(first) == (2, 0, 0)
    again = denoise(tiny_dtln_card, tmp_path / "rec", "-o", tmp_path / "rec" / "clean")
    assert again.exit_code == 0 and summary_counts(again) == (0, 2, 0)
    assert relative_audio(tmp_path / "rec" / "clean") == [Path("a.wav"), Path("day/b.wav")]
    up = denoise(tiny_dtln_card, tmp_path / "rec" / "day", "-o", tmp_path / "rec")  # an output folder above
    assert up.exit_code == 0 and summary_counts(up) == (1, 0, 0)
    assert (tmp_path / "rec" / "b.wav").is_file()


def test_real_process_exit_status_and_one_line_on_stderr(tree, tiny_dtln_card, tmp_path):
    (tmp_path / "bad.wav").write_text("not audio")
    command = [sys.executable, "-m", "quell.cli", "denoise", str(tree / "top.wav"), str(tmp_path / "bad.wav"),
               "-o", str(tmp_path / "out"), "--model", str(tiny_dtln_card), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "bad.wav" in done.stderr
    assert "Traceback" not in done.stderr
    assert SUMMARY.match(done.stdout.strip()) and done.stdout.startswith("1 enhanced, 0 skipped, 1 failed")
    assert relative_audio(tmp_path / "out") == [Path("top.wav")]
