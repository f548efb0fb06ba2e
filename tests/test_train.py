"""Training: a short run on tiny generated data, checkpoints and logs, and an exact resume."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile as sf
import yaml

torch = pytest.importorskip("torch")

from quell.export.exporter import export_checkpoint  # noqa: E402
from quell.models.train import ExampleSource, train  # noqa: E402

RATE = 16000


def _write_corpus(folder, n, seed, kind):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(2.5 * RATE)) / RATE
    for i in range(n):
        if kind == "speech":
            f0 = rng.uniform(100, 220)
            x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 12)) * np.clip(np.sin(2 * np.pi * 3 * t), 0, 1)
        else:
            x = rng.standard_normal(t.size)
        sf.write(folder / f"{kind}_{i}.wav", (0.1 * x / np.abs(x).max()).astype(np.float32), RATE)


@pytest.fixture()
def recipe(tmp_path):
    _write_corpus(tmp_path / "speech", 4, 0, "speech")
    _write_corpus(tmp_path / "noise", 3, 1, "noise")
    _write_corpus(tmp_path / "valid_speech", 2, 2, "speech")
    data = {
        "model": "dtln",
        "model_args": {"hidden": 16, "encoder": 32},
        "data": {"speech": ["speech"], "noise": ["noise"]},
        "valid": {"speech": ["valid_speech"], "noise": ["noise"]},
        "synth": {"segment_seconds": 1.0, "reverb_prob": 0.0},
        "train": {"batch_size": 2, "steps_per_epoch": 2, "max_epochs": 1, "workers": 0, "valid_clips": 2},
    }

    def write(max_epochs: int):
        data["train"]["max_epochs"] = max_epochs
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def test_two_steps_write_checkpoints_and_a_log(recipe, tmp_path):
    best = train(recipe(1), tmp_path / "run")
    assert best.name == "best.pt" and (tmp_path / "run" / "last.pt").is_file()
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,step,train_loss,si_sdr,si_sdr_i,pesq_wb")
    assert len(log) == 2 and log[1].startswith("1,2,")
    card = export_checkpoint(best, tmp_path / "model.onnx")
    assert card.training["steps"] == 2 and card.parameters > 0


def test_resume_continues_exactly_where_it_stopped(recipe, tmp_path):
    train(recipe(2), tmp_path / "straight")
    train(recipe(1), tmp_path / "resumed")
    train(recipe(2), tmp_path / "resumed")  # picks up last.pt at step 2
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert straight["state"]["step"] == resumed["state"]["step"] == 4
    for name, weight in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], weight, rtol=0, atol=1e-6)


def test_a_new_run_can_start_from_another_runs_weights(recipe, tmp_path):
    train(recipe(1), tmp_path / "first")
    first = torch.load(tmp_path / "first" / "last.pt", weights_only=False)
    path = recipe(1)
    data = yaml.safe_load(path.read_text())
    data["train"].update(lr=0.0, loss="snr_spectral")  # no step moves the weights: they stay the first run's
    path.write_text(yaml.safe_dump(data))
    train(path, tmp_path / "tuned", init=tmp_path / "first" / "last.pt")
    tuned = torch.load(tmp_path / "tuned" / "last.pt", weights_only=False)
    assert tuned["state"]["step"] == 2  # counted afresh
    assert tuned["state"]["init"]["steps"] == 2 and tuned["state"]["init"]["recipe"]["model"] == "dtln"
    card = export_checkpoint(tmp_path / "tuned" / "last.pt", tmp_path / "tuned.onnx")
    assert card.training["initialised_from"]["checkpoint"] == str(tmp_path / "first" / "last.pt")
    for name, weight in first["model"].items():
        torch.testing.assert_close(tuned["model"][name], weight, rtol=0, atol=0)
    fresh = torch.load(tmp_path / "first" / "last.pt", weights_only=False)["model"]
    train(path, tmp_path / "scratch")  # without init the weights are new ones
    scratch = torch.load(tmp_path / "scratch" / "last.pt", weights_only=False)["model"]
    assert any(not torch.equal(scratch[name], fresh[name]) for name in fresh)


def test_unusable_corpus_files_are_reported_and_skipped(recipe, tmp_path, caplog):
    (tmp_path / "speech" / "broken.wav").write_text("not audio")
    sf.write(tmp_path / "speech" / "short.wav", np.zeros(100, np.float32) + 0.1, RATE)
    train(recipe(1), tmp_path / "run")
    assert "skipped" in caplog.text.lower() and "broken.wav" in caplog.text


def test_the_echo_canceller_trains_on_echo_scenarios(tmp_path):
    _write_corpus(tmp_path / "speech", 3, 20, "speech")
    _write_corpus(tmp_path / "far", 3, 21, "speech")
    _write_corpus(tmp_path / "noise", 2, 22, "noise")
    recipe = {
        "model": "d3net_aec",
        "model_args": {"channels": 4, "growth": 4, "layers": 2, "blocks": 1, "downsample": 1,
                       "filter_partitions": 4},
        "data": {"speech": ["speech"], "far_speech": ["far"], "noise": ["noise"]},
        "valid": {"speech": ["speech"], "far_speech": ["far"]},
        "synth": {"segment_seconds": 1.0, "scenario_probs": [0.5, 0.0, 0.5],
                  "near": {"reverb_prob": 0.0, "n_sim_rirs": 2}},
        "train": {"batch_size": 2, "steps_per_epoch": 2, "max_epochs": 1, "workers": 0, "valid_clips": 4,
                  "loss": "echo_preserving", "valid_aecmos": True, "selection_metric": "aecmos"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    best = train(path, tmp_path / "run")
    with (tmp_path / "run" / "log.csv").open() as f:
        (row,) = csv.DictReader(f)
    assert float(row["erle"]) > 0 and 1.0 <= float(row["pesq_wb"]) <= 4.7
    for name in ("aecmos_echo", "aecmos_deg"):  # far-end single talk and double talk, both at 0.5
        assert 1.0 <= float(row[name]) <= 5.0
    assert float(row["aecmos"]) == pytest.approx((float(row["aecmos_echo"]) + float(row["aecmos_deg"])) / 2)
    card = export_checkpoint(best, tmp_path / "aec.onnx")
    assert card.task == "echo" and card.reference_input == "reference"


def test_dnsmos_can_pick_the_best_checkpoint_and_a_resumed_log_gains_its_columns(recipe, tmp_path):
    pytest.importorskip("speechmos")
    train(recipe(1), tmp_path / "run")  # first epoch without DNSMOS
    path = recipe(2)
    data = yaml.safe_load(path.read_text())
    data["train"].update(valid_dnsmos=True, selection_metric="dnsmos_ovrl")
    path.write_text(yaml.safe_dump(data))
    train(path, tmp_path / "run")
    with (tmp_path / "run" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0]["dnsmos_ovrl"] == "" and 1.0 <= float(rows[1]["dnsmos_ovrl"]) <= 5.0
    assert rows[0]["pesq_wb"] and rows[1]["pesq_wb"]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert best["state"]["best"] == pytest.approx(float(rows[1]["dnsmos_ovrl"]))
    assert best["state"]["selection_metric"] == "dnsmos_ovrl" and best["state"]["epoch"] == 2
    assert best["scheduler"]["best"] == pytest.approx(float(rows[1]["dnsmos_ovrl"]))  # no PESQ left in the plateau
    previous = torch.load(tmp_path / "run" / "best_pesq_wb.pt", weights_only=False)  # the first metric's best
    assert previous["state"]["epoch"] == 1


def test_validation_hears_the_voices_as_recorded_and_other_rooms(recipe, tmp_path):
    data = yaml.safe_load(recipe(1).read_text())
    synth = {**data["synth"], "speed_prob": 1.0, "speed_range": [0.8, 0.9], "reverb_prob": 1.0, "n_sim_rirs": 2}
    training = ExampleSource("denoise", data["data"], tmp_path, synth)
    validation = ExampleSource("denoise", data["valid"], tmp_path, synth, validation=True)
    trained, validated = training.synth.mixture(3).params, validation.synth.mixture(3).params
    assert 0.8 <= trained["speed"] <= 0.9 and validated["speed"] == 1.0
    assert training.synth.config.rir_bank == 0 and validation.synth.config.rir_bank == 1


def _taught(recipe, teacher: str, pool: int):
    path = recipe(1)
    data = yaml.safe_load(path.read_text())
    data["train"].update(teacher=teacher, teacher_pool=pool)
    path.write_text(yaml.safe_dump(data))
    return path, data


def test_a_teacher_s_outputs_are_the_targets_taught_once_and_cycled(recipe, tmp_path):
    from quell.models.train import TaughtSource, teach

    # "noisy" (the unprocessed input) as the teacher: its output is known exactly
    path, data = _taught(recipe, "noisy", 3)
    assert teach(path, tmp_path / "run", shard=0, shards=2) == 2  # seeds 1234 and 1236 of 1234..1236
    assert teach(path, tmp_path / "run", shard=1, shards=2) == 1
    assert teach(path, tmp_path / "run") == 0  # all cached
    cache = tmp_path / "run" / "teacher"
    assert sorted(p.name for p in cache.glob("*.npy")) == ["1234.npy", "1235.npy", "1236.npy"]
    source = TaughtSource(ExampleSource("denoise", data["data"], tmp_path, data["synth"]), "noisy", cache, 1234, 3)
    (noisy,), (taught, clean) = source.example(1235)
    np.testing.assert_allclose(taught, noisy, atol=1e-6)
    assert not np.allclose(clean, noisy, atol=1e-3)
    (again,), _ = source.example(1235 + 3)  # the pool cycles
    np.testing.assert_array_equal(again, noisy)
    np.save(cache / "1235.npy", np.zeros_like(noisy))  # a cached output is read, not taught again
    assert not source.example(1235)[1][0].any()
    train(path, tmp_path / "run")  # trains on the pool's 3 mixtures (2 steps of 2)
    assert len(list(cache.glob("*.npy"))) == 3
    assert (tmp_path / "run" / "log.csv").is_file()
    data["synth"]["snr_db"] = [0.0, 5.0]  # other mixtures: the cache must not pass for theirs
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="holds a teacher's outputs for other mixtures"):
        teach(path, tmp_path / "run")


def test_a_real_teacher_teaches_what_it_outputs(recipe, tmp_path):
    from quell.dns.baselines import BASELINES
    from quell.models.train import teach

    if BASELINES["deepfilternet"].available() is not None:
        pytest.skip(BASELINES["deepfilternet"].available())
    path, data = _taught(recipe, "deepfilternet", 1)
    assert teach(path, tmp_path / "run") == 1
    (noisy,), _ = ExampleSource("denoise", data["data"], tmp_path, data["synth"]).example(1234)
    taught = np.load(tmp_path / "run" / "teacher" / "1234.npy")
    expected = BASELINES["deepfilternet"]().enhance(noisy, RATE).audio
    np.testing.assert_allclose(taught, expected, atol=1e-5)
    assert not np.allclose(taught, noisy, atol=1e-3)  # the target is the teacher's, not the input


def test_teach_refuses_a_recipe_without_a_teacher_and_an_unknown_teacher(recipe, tmp_path):
    from quell.models.train import teach

    with pytest.raises(ValueError, match="no teacher"):
        teach(recipe(1), tmp_path / "run")
    path, _ = _taught(recipe, "nobody", 2)
    with pytest.raises(ValueError, match="unknown teacher 'nobody'"):
        teach(path, tmp_path / "run")


def test_quell_teach_reports_bad_input_in_one_line(recipe, tmp_path):
    from click.testing import CliRunner

    from quell.cli import main

    untaught = CliRunner().invoke(main, ["teach", str(recipe(1)), "--out", str(tmp_path / "run")])
    assert untaught.exit_code == 1 and "Error: the recipe names no teacher" in untaught.output
    path, _ = _taught(recipe, "noisy", 2)  # the same recipe file, now with a teacher
    bad_shard = CliRunner().invoke(main, ["teach", str(path), "--out", str(tmp_path / "run"), "--shard", "3/2"])
    assert bad_shard.exit_code != 0 and "expected K/N with 1 <= K <= N, got '3/2'" in bad_shard.output
    taught = CliRunner().invoke(main, ["teach", str(path), "--out", str(tmp_path / "run"), "--shard", "1/1"])
    assert taught.exit_code == 0 and "taught 2 mixtures" in taught.output
