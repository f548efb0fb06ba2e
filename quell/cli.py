"""`quell ...`: parse, call the API, print. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from quell.streaming.files import FileError, enhance_files, plan_outputs


def _command_line(ctx: click.Context, skip: tuple[str, ...] = ()) -> str:
    """The command as it could be typed again: `quell <command>` and the options given (not the defaults)."""
    import shlex

    words = ["quell", ctx.info_name]
    for name, value in ctx.params.items():
        defaults = {p.name: p.default for p in ctx.command.params}
        if name in skip or value is None or value is False or value == defaults.get(name):
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


class _Group(click.Group):
    """Turns expected errors (bad input) into one line and exit status 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (FileError, ValueError, OSError) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="quell")
def main() -> None:
    """quell: real-time speech enhancement (noise suppression, echo cancellation)."""


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output file (for one input file) or folder.")
@click.option("-m", "--model", default="dtln", show_default=True, help="Shipped model name or a .json card.")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 256), help="Worker processes.")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist (inputs are never overwritten).")
@click.option("--subtype", default=None, help="Output sample format, e.g. PCM_16, PCM_24, FLOAT (default: keep).")
@click.option("--format", "suffix", type=click.Choice(["wav", "flac", "ogg"]), default=None,
              help="Output format for folders (default: keep each file's).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def denoise(inputs, output, model, jobs, overwrite, subtype, suffix, quiet) -> None:
    """Enhance audio files and folders (recursive; the tree is mirrored under OUTPUT)."""
    from quell.streaming.catalog import find_model

    find_model(model)  # an unknown model fails here, once, not once per file
    pairs = plan_outputs(list(inputs), output, f".{suffix}" if suffix else None)
    summary = enhance_files(pairs, model=model, jobs=jobs, overwrite=overwrite, subtype=subtype,
                            progress=not quiet, report=lambda line: click.echo(line, err=True))
    click.echo(summary.line())
    if summary.count("failed"):
        sys.exit(1)


@main.command()
def models() -> None:
    """List the shipped models."""
    from quell.streaming.catalog import list_models

    for card in list_models():
        click.echo(f"{card.name:12s} {card.task:8s} {card.sample_rate} Hz, hop {card.hop}, "
                   f"latency {card.algorithmic_latency * 1000:.0f} ms, {card.parameters:,} parameters")


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, help="Step graph path (.onnx); the sequence graph and card go beside.")
@click.option("--name", default=None, help="Model name in the card (default: the file name).")
@click.option("--int8", is_flag=True,
              help="8-bit weights (MatMul in blocks of 32, LSTM per tensor): faster per hop; parity checked by SNR.")
@click.option("--release-layout", is_flag=True,
              help="Write a DTLN as the authors' ONNX release lays it out (model_1.onnx, model_2.onnx) into the "
                   "folder -o instead: to time with `quell bench --against FOLDER`.")
def export(checkpoint, output, name, int8, release_layout) -> None:
    """Export a training checkpoint to ONNX step + sequence graphs and a model card (parity-checked)."""
    from quell.export.exporter import export_checkpoint, load_checkpoint

    if release_layout:
        from quell.export.release import export_release_graphs

        if int8:
            raise ValueError("--release-layout writes the float32 graphs the release has; drop --int8")
        if Path(output).exists() and not Path(output).is_dir():
            raise ValueError(f"{output} is a file: --release-layout writes a folder")
        paths = export_release_graphs(load_checkpoint(checkpoint)[0], output)
        click.echo("wrote " + ", ".join(str(p) for p in paths))
        return
    card = export_checkpoint(checkpoint, output, name, int8=int8)
    click.echo(f"wrote {Path(output)}, {card.sequence_graph} and {Path(output).with_suffix('.json').name}")
    if int8:
        click.echo(card.description.rsplit("; ", 1)[-1])


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (.pt).")
@click.option("--overwrite", is_flag=True, help="Replace the checkpoint if it exists.")
def recover(model, output, overwrite) -> None:
    """A training checkpoint from a shipped float32 model (name or .json card), to fine-tune it.

    The weights are read from the graph; refused unless their re-export reproduces its output.
    """
    from quell.export.recover import recover_checkpoint
    from quell.streaming.catalog import find_model

    if Path(output).exists() and not overwrite:
        raise ValueError(f"{output} exists (--overwrite replaces it)")
    card = find_model(model)
    error = recover_checkpoint(card.path, output)
    click.echo(f"{output}: weights of {card.path} (re-export max abs difference {error:.1e})")


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default=None, help="Run folder (checkpoints, log); default runs/<recipe folder>.")
@click.option("--max-minutes", type=float, default=None, help="Stop (resumably) after this long.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start a new run from this checkpoint's weights (fine-tuning); ignored when the run resumes.")
def train(recipe, out, max_minutes, init) -> None:
    """Train (or resume) the model of a recipe."""
    import logging

    from quell.models.train import run_folder
    from quell.models.train import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    best = run_training(recipe, run_folder(recipe, out), max_minutes, init)
    click.echo(f"best checkpoint: {best}")


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default=None, help="The run folder `quell train` will use; default runs/<recipe folder>.")
@click.option("--shard", default="1/1", show_default=True, help="K/N: this process fills every N-th output from "
              "the K-th; run N of them, one per core.")
def teach(recipe, out, shard) -> None:
    """Fill a distillation recipe's teacher cache (its `teacher_pool` outputs) ahead of `quell train`."""
    from quell.models.train import run_folder
    from quell.models.train import teach as run_teacher

    try:
        k, n = (int(part) for part in shard.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected K/N with 1 <= K <= N, got {shard!r}", param_hint="--shard") from None
    try:
        done = run_teacher(recipe, run_folder(recipe, out), k - 1, n)
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"taught {done} mixtures")


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder for the set.")
@click.option("-n", "--clips", default=100, show_default=True, type=click.IntRange(1), help="Number of clips.")
@click.option("--speech", multiple=True, type=click.Path(exists=True), help="Speech folder (repeatable).")
@click.option("--noise", multiple=True, type=click.Path(exists=True), help="Noise folder (repeatable).")
@click.option("--music", multiple=True, type=click.Path(exists=True), help="Music folder (repeatable).")
@click.option("--rir", multiple=True, type=click.Path(exists=True), help="Impulse-response folder (repeatable).")
@click.option("--dns-root", type=click.Path(exists=True, file_okay=False),
              help="A DNS-Challenge tree (clean/, noise/, impulse_responses/) instead of the folders above.")
@click.option("--seed", default=0, show_default=True, help="Seed: the same seed writes the same set.")
@click.option("--snr", nargs=2, type=float, default=None,
              help="SNR range, dB [-5 25; of the near end with --echo: 0 40].")
@click.option("--level", nargs=2, type=float, default=(-35.0, -15.0), show_default=True, help="Level, dBFS.")
@click.option("--reverb", default=0.3, show_default=True, type=click.FloatRange(0, 1), help="Reverberant share.")
@click.option("--seconds", default=None, type=click.FloatRange(0.5), help="Clip length [4; with --echo: 8].")
@click.option("--rir-bank", default=1, show_default=True,
              help="Simulated-room bank; training uses bank 0, so the default keeps validation rooms unseen.")
@click.option("--echo", is_flag=True,
              help="An echo set instead: mic/, far_end/, clean/ (the near end), echo/ and metadata.csv (scenarios).")
@click.option("--far-speech", multiple=True, type=click.Path(exists=True),
              help="Far-end speech folder for --echo (repeatable; default: the --speech folders).")
@click.option("--overwrite", is_flag=True, help="Write into a folder that is not empty.")
def synth(output, clips, speech, noise, music, rir, dns_root, seed, snr, level, reverb, seconds, rir_bank, echo,
          far_speech, overwrite) -> None:
    """Write a DNS-style noisy/clean/noise set (or, with --echo, an echo set) with a metadata CSV (reproducible)."""
    from dataclasses import replace

    from quell.dns.corpora import dns_layout, load_corpus
    from quell.dns.synth import (
        EchoConfig,
        EchoSynthesizer,
        SynthConfig,
        Synthesizer,
        write_dataset,
        write_echo_dataset,
    )

    if dns_root:
        layout = dns_layout(dns_root)
        speech = speech or ([layout["speech"]] if "speech" in layout else ())
        noise = noise or ([layout["noise"]] if "noise" in layout else ())
        rir = rir or ([layout["rir"]] if "rir" in layout else ())
    if not speech:
        raise click.UsageError("give --speech (or --dns-root)")
    if far_speech and not echo:
        raise click.UsageError("--far-speech is for echo sets: add --echo")
    given = {"level_dbfs": level, "reverb_prob": reverb, "rir_bank": rir_bank, "snr_db": snr,
             "segment_seconds": seconds}
    given = {name: value for name, value in given.items() if value is not None}  # the others keep their defaults
    rate = SynthConfig().sample_rate

    def corpus(folders, name, min_seconds=0.0):
        return load_corpus(list(folders), rate, name=name, min_seconds=min_seconds) if folders else None

    corpora = {"noise": corpus(noise, "noise"), "music": corpus(music, "music"), "rirs": corpus(rir, "rir")}
    near_speech = corpus(speech, "speech", min_seconds=1.0)
    if echo:
        seconds = given.pop("segment_seconds", EchoConfig.segment_seconds)
        config = EchoConfig(segment_seconds=seconds, near=replace(EchoConfig().near, **given))
        far = corpus(far_speech, "far-end speech", min_seconds=1.0) if far_speech else near_speech
        out = write_echo_dataset(output, EchoSynthesizer(config, near_speech, far, **corpora), clips, seed=seed,
                                 overwrite=overwrite)
        click.echo(f"wrote {clips} echo clips to {out} (mic/, far_end/, clean/, echo/, metadata.csv)")
        return
    synthesizer = Synthesizer(SynthConfig(**given), speech=near_speech, **corpora)
    out = write_dataset(output, synthesizer, clips, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {clips} clips to {out} (noisy/, clean/, noise/, metadata.csv)")


@main.command("eval")
@click.option("--noisy", required=True,
              help="Folder of noisy (or, with --far-end, mic) clips; a metadata.csv of `quell synth` adds conditions.")
@click.option("--clean", default=None, help="Folder of clean references, same names (without: DNSMOS only).")
@click.option("--far-end", default=None,
              help="Folder of what was played, same names: score echo cancellers (ERLE, AECMOS per scenario).")
@click.option("--enhanced", default=None, help="Folder of enhanced outputs to score, same names.")
@click.option("-m", "--model", default=None, help="Or a model to run: shipped name or a .json card.")
@click.option("--baselines", default=None,
              help="Peers to run, comma-separated: noisy, rnnoise, webrtc, speex, deepfilternet, dtln_release; with "
                   "--far-end: mic, webrtc, speex ('' for none) [noisy; with --far-end: mic].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Only the first N clips (by name).")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 256), help="Worker processes.")
@click.option("--no-dnsmos", is_flag=True, help="Skip DNSMOS (its slowest metric).")
@click.option("--update-card", is_flag=True,
              help="Record the model's scores (and the peers') in its model card, with this command line.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(noisy, clean, far_end, enhanced, model, baselines, out, limit, jobs, no_dnsmos, update_card,
             quiet) -> None:
    """Objective scores (PESQ, STOI, SI-SDR, DNSMOS; ERLE, AECMOS) of enhanced speech, peers side by side."""
    from tqdm import tqdm

    from quell.dns.evaluate import evaluate as run_evaluation

    names = None if baselines is None else [name.strip() for name in baselines.split(",") if name.strip()]
    bars = []  # made once scoring starts, so that an error before is one line alone

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="file", disable=quiet, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        evaluation = run_evaluation(noisy, clean, enhanced, model, names, limit, jobs, not no_dnsmos, progress,
                                    far_end=far_end)
    finally:
        for bar in bars:
            bar.close()
    written = evaluation.write(out)
    for line in evaluation.warnings:
        click.echo(f"warning: {line}", err=True)
    click.echo(f"wrote {', '.join(path.name for path in written)} to {out}")
    click.echo(evaluation.markdown())
    if update_card:
        from quell.dns.evaluate import record_scores

        if model is None:
            raise click.UsageError("--update-card needs --model")
        command = _command_line(click.get_current_context(), skip=("update_card", "quiet"))
        card = record_scores(model, evaluation, command)
        click.echo(f"scores recorded in {card.path}")


@main.command()
@click.option("-m", "--model", default="dtln", show_default=True, help="Shipped model name or a .json card.")
@click.option("--hops", default=10000, show_default=True, type=click.IntRange(100), help="Hops to time.")
@click.option("--seconds", default=60.0, show_default=True, help="Length of the generated test signal.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--against", multiple=True,
              help="Compare the step cost with this model (repeatable): interleaved rounds of --hops / 10 hops. "
                   "A folder with model_1.onnx and model_2.onnx is a DTLN in its authors' release layout, run as "
                   "their runtime runs it.")
@click.option("--rounds", default=16, show_default=True, type=click.IntRange(1), help="Rounds of --against.")
def bench(model, hops, seconds, as_json, against, rounds) -> None:
    """Time the model: per-hop cost, real-time factors, load time, peak memory (one thread)."""
    import json

    from quell.streaming.bench import benchmark, compare_steps, format_comparison, format_report

    if against:
        per_round = max(100, hops // 10)
        try:
            results = compare_steps([model, *against], rounds=rounds, hops=per_round)
        except ValueError as error:
            raise click.UsageError(str(error)) from None
        click.echo(json.dumps(results, indent=2) if as_json else format_comparison(results, per_round))
        return
    results = benchmark(model, hops=hops, seconds=seconds)
    click.echo(json.dumps(results, indent=2) if as_json else format_report(results))


@main.command()
@click.option("-m", "--model", default=None,
              help="Shipped model name or a .json card [default: dtln; with --aec: aec, the shipped echo model].")
@click.option("-i", "--input", "input_device", default=None,
              help="Input device: index or part of its name (`quell devices`); default: the system's.")
@click.option("-o", "--output", "output_device", default=None,
              help="Output device (default: the system's, unless only --record is given).")
@click.option("--record", type=click.Path(dir_okay=False), default=None,
              help="Also write what is played (or, without an output device, the enhanced input) to a WAV file.")
@click.option("--record-input", type=click.Path(dir_okay=False), default=None,
              help="Write the unprocessed input to a WAV file, on the same timeline as --record.")
@click.option("--overwrite", is_flag=True, help="Replace recordings that exist.")
@click.option("--virtual-mic", is_flag=True,
              help='Play into a virtual microphone named "quell" that other apps can record (PulseAudio/PipeWire).')
@click.option("--rate", type=click.IntRange(1), default=None, help="Device sample rate (default: 48000 if possible).")
@click.option("--channels", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Channels (each its own stream).")
@click.option("--block-ms", default=10.0, show_default=True, type=click.FloatRange(0.1, 1000),
              help="Device block size.")
@click.option("--buffer-ms", default=20.0, show_default=True, type=click.FloatRange(0, 2000),
              help="Head start of the output over the model, beyond one block: less is lower latency, more xruns.")
@click.option("--attenuation-limit", type=click.FloatRange(0), default=None,
              help="Suppression strength: remove at most this many dB of noise (default: no limit).")
@click.option("--bypass", is_flag=True, help="Start in bypass (the input passes through at the same latency).")
@click.option("--aec", is_flag=True,
              help="Cancel the echo of what the speakers play, heard through the monitor source of their sink "
                   "(PulseAudio/PipeWire: PULSE_SINK or the default sink); needs an echo model.")
@click.option("--device", "compute", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model runs (cuda needs onnxruntime-gpu).")
@click.option("--duration", type=click.FloatRange(0, min_open=True), default=None,
              help="Stop after this many seconds of audio (default: run until Ctrl-C, SIGTERM or q).")
@click.option("--json", "as_json", is_flag=True, help="Print the final stats as JSON.")
def live(model, input_device, output_device, record, record_input, overwrite, virtual_mic, rate, channels, block_ms,
         buffer_ms, attenuation_limit, bypass, aec, compute, duration, as_json) -> None:
    """Enhance a microphone in real time: to an output device, a WAV file, or a virtual microphone.

    On a terminal, b toggles bypass, a echo cancellation (with --aec), + and - step the suppression strength,
    q quits; SIGUSR1 toggles bypass. The status line shows the per-hop cost, the end-to-end latency and its
    parts, xruns, and with --aec whether it is on, the echo delay it found and gaps in the far end.
    """
    import dataclasses
    import json

    from quell.streaming.catalog import find_model, list_models
    from quell.streaming.live import LiveSession

    if model is None:
        if aec and "aec" not in [card.name for card in list_models()]:
            raise ValueError("no echo-cancellation model is installed (give one with -m CARD.json)")
        model = "aec" if aec else "dtln"
    find_model(model)  # an unknown model fails before any device is opened
    providers = None
    if compute == "cuda":
        import onnxruntime

        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ValueError(f"--device cuda needs onnxruntime-gpu (this onnxruntime has {', '.join(available)})")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = LiveSession(model, input_device, output_device, record, record_input, overwrite, rate, channels,
                          block_ms, buffer_ms, attenuation_limit, providers, virtual_mic, bypass, aec=aec)
    terminal = sys.stderr.isatty()

    def report(stats) -> None:
        if terminal:
            click.echo(f"\r{stats.line()}\033[K", err=True, nl=False)
        else:
            click.echo(stats.line(), err=True)

    try:
        stats = session.run(duration, report, report_every=0.5 if terminal else 10.0,
                            keys=sys.stdin.isatty())
    finally:
        if terminal:
            click.echo("", err=True)
    click.echo(json.dumps(dataclasses.asdict(stats) | {"latency_ms": stats.latency_ms, "xruns": stats.xruns})
               if as_json else stats.line())


@main.command()
def devices() -> None:
    """List the audio devices (< default input, > default output)."""
    from quell.streaming.live import list_devices

    lines = list_devices()
    click.echo("\n".join(lines) if lines else "no audio devices found")


@main.group()
def p808() -> None:
    """P.808 listening tests: build ACR/CCR/P.835 tests, serve them to raters, analyse the votes."""


@p808.command("build")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Test folder to write.")
@click.option("--method", type=click.Choice(["acr", "ccr", "p835"]), default="acr", show_default=True,
              help="ACR (P.808 quality), CCR (against the reference) or P.835 (SIG, BAK, OVRL).")
@click.option("-c", "--condition", "conditions", multiple=True, required=True,
              help="Folder of the clips of one condition: NAME=FOLDER or FOLDER (repeatable).")
@click.option("--reference", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of clean speech: gold, training and volume clips; for CCR also the reference of "
                   "every clip (same relative names).")
@click.option("--clips-per-session", default=10, show_default=True, type=click.IntRange(1),
              help="Rating clips per session (a gold and a trapping clip come on top).")
@click.option("--raters-per-session", default=5, show_default=True, type=click.IntRange(1),
              help="Raters `serve` gives each session to, i.e. votes per clip.")
@click.option("--seed", default=0, show_default=True, help="Seed: the same seed builds the same test.")
@click.option("--overwrite", is_flag=True, help="Replace a test folder that exists (never one holding votes).")
def p808_build(output, method, conditions, reference, clips_per_session, raters_per_session, seed,
               overwrite) -> None:
    """Build a listening test from folders of conditions: clips, sessions, toolkit CSVs, offline page."""
    from quell.dns.p808.build import build_test, parse_conditions

    test = build_test(output, method, parse_conditions(list(conditions)), reference, clips_per_session,
                      raters_per_session, seed, overwrite)
    rated = {item.rated_clip for session in test.sessions for item in session.items if item.role == "rating"}
    click.echo(f"wrote the {method.upper()} test {output}: {len(rated)} clips of {len(conditions)} conditions in "
               f"{len(test.sessions)} sessions of {len(test.sessions[0].items)} steps; "
               f"serve it with `quell p808 serve {output}` or open {Path(output) / 'test.html'}")


@p808.command("serve")
@click.argument("test_folder", type=click.Path(exists=True, file_okay=False))
@click.option("--db", default=None, type=click.Path(dir_okay=False), help="Votes database [TEST_FOLDER/votes.db].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for raters on other machines of the local network).")
@click.option("--port", default=8808, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free).")
def p808_serve(test_folder, db, host, port) -> None:
    """Run the test for raters in their browsers; every vote is stored in SQLite. Ctrl-C stops."""
    from quell.dns.p808.serve import open_server

    server = open_server(test_folder, db, host, port)
    click.echo(f"serving {test_folder} at {server.url} (votes in {server.store.path}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@p808.command("analyze")
@click.argument("test_folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--db", default=None, type=click.Path(dir_okay=False),
              help="Votes database [TEST_FOLDER/votes.db, unless --votes is given].")
@click.option("--votes", "vote_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV of votes, e.g. downloaded from the offline page (repeatable).")
@click.option("--outliers", is_flag=True, help="Drop votes with |z| >= 3.29 per clip (clips with over 5 votes).")
def p808_analyze(test_folder, out, db, vote_files, outliers) -> None:
    """Screen submissions by the P.808 rules; MOS, std, n and 95% CI per clip and condition; markdown + PNG."""
    from quell.dns.p808.analyze import analyze, read_votes_csv
    from quell.dns.p808.design import load_test
    from quell.dns.p808.store import read_votes

    test = load_test(test_folder)
    votes = [row for path in vote_files for row in read_votes_csv(path)]
    if db or not vote_files:
        votes += read_votes(db or Path(test_folder) / "votes.db")
    analysis = analyze(test, votes, outliers)
    written, no_plot = analysis.write(out)
    if no_plot:
        click.echo(f"warning: {no_plot}", err=True)
    click.echo(f"wrote {', '.join(path.name for path in written)} to {out}")
    click.echo(analysis.markdown())


if __name__ == "__main__":
    main()


@main.command()
@click.option("--mic", required=True, help="Microphone recording, or a folder of them (recursive).")
@click.option("--ref", "reference", required=True,
              help="What was played (the far end): a file, or a folder paired with --mic by relative path.")
@click.option("-o", "--output", required=True, help="Output file (for one mic file) or folder.")
@click.option("-m", "--model", default="aec", show_default=True, help="Echo-cancellation model name or .json card.")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist (inputs are never overwritten).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def aec(mic, reference, output, model, overwrite, quiet) -> None:
    """Cancel the echo of REF in MIC (and the noise): files, or folders paired by name."""
    from quell.streaming.catalog import find_model
    from quell.streaming.files import pair_references

    card = find_model(model)
    if not card.reference_input:
        raise ValueError(f"model {card.name!r} is not an echo canceller (it takes no reference)")
    pairs = plan_outputs([mic], output)
    references = pair_references(pairs, mic, reference)
    for (src, _), ref in zip(pairs, references, strict=True):
        if ref is None:
            click.echo(f"note: {src}: no reference of the same name, only denoised", err=True)
    summary = enhance_files(pairs, model=model, overwrite=overwrite, progress=not quiet, references=references,
                            report=lambda line: click.echo(line, err=True))
    click.echo(summary.line())
    if summary.count("failed"):
        sys.exit(1)
