"""`quell recover`: a training checkpoint from a shipped float32 graph holds exactly the exported weights.

The command runs in a child process (as a user runs it): imported into the pytest process, the recovery's
import chain once made a later live test's `quell live` ignore Ctrl-C in the full suite (not understood).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from quell.export.exporter import export_checkpoint
from quell.models.train import build_model

TINY = {  # a model's name in the tests: (the recipe's model, its sizes)
    "dtln": ("dtln", {"hidden": 16, "layers": 2, "encoder": 32}),
    "dtln_bands": ("dtln", {"hidden": 16, "layers": 2, "encoder": 32, "mask_bands": 8}),
    "dtln_hann": ("dtln", {"hidden": 16, "layers": 2, "encoder": 32, "analysis_window": "hann"}),
    "d3net_aec": ("d3net_aec", {"channels": 4, "growth": 4, "layers": 2, "blocks": 2, "downsample": 1,
                                "filter_partitions": 3}),
    "d3net_aec_detector": ("d3net_aec", {"channels": 4, "growth": 4, "layers": 2, "blocks": 1,
                                         "filter_partitions": 3, "presence_hidden": 5}),
}


def _quell(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quell.cli", *args], capture_output=True, text=True, timeout=300)


def _exported(kind: str, folder, init: dict | None = None) -> torch.nn.Module:
    """A tiny model with every weight non-zero, saved as a checkpoint and exported to folder/model.onnx."""
    recipe = {"model": TINY[kind][0], "model_args": TINY[kind][1]}
    torch.manual_seed(0)
    model = build_model(recipe)
    with torch.no_grad():  # biases start at zero, a detector's standardization at (0, 1): make them count
        for name, value in model.named_parameters():
            if name.endswith("bias"):
                value.normal_()
        if getattr(model, "presence", None) is not None:
            model.presence.mean.normal_()
            model.presence.std.uniform_(0.5, 2.0)
    torch.save({"model": model.state_dict(), "recipe": recipe,
                "state": {"step": 12, "epoch": 3, "best": 1.5, "init": init}}, folder / "run.pt")
    export_checkpoint(folder / "run.pt", folder / "model.onnx")
    return model


@pytest.mark.parametrize("kind", sorted(TINY))
def test_recovered_checkpoint_holds_the_exported_weights_and_history(kind, tmp_path):
    history = {"checkpoint": "runs/earlier/best.pt", "steps": 7}
    model = _exported(kind, tmp_path, history)

    result = _quell("recover", str(tmp_path / "model.json"), "-o", str(tmp_path / "recovered.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    recovered = torch.load(tmp_path / "recovered.pt", weights_only=False)
    expected = model.state_dict()
    assert set(recovered["model"]) == set(expected), set(recovered["model"]) ^ set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(recovered["model"][name], value, atol=0, rtol=0, msg=name)
    assert recovered["recipe"] == {"model": TINY[kind][0], "model_args": TINY[kind][1]}
    assert (recovered["state"]["step"], recovered["state"]["init"]) == (12, history)

    again = _quell("recover", str(tmp_path / "model.json"), "-o", str(tmp_path / "recovered.pt"))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr


def test_recover_refuses_a_graph_its_weights_do_not_reproduce(tmp_path):
    """A card whose recipe does not match its graph: one line, exit 2, no checkpoint written."""
    import json

    _exported("d3net_aec", tmp_path)
    card = json.loads((tmp_path / "model.json").read_text())
    card["training"]["recipe"]["model_args"]["filter_step"] = 0.2  # same weights, another linear filter
    (tmp_path / "model.json").write_text(json.dumps(card))

    result = _quell("recover", str(tmp_path / "model.json"), "-o", str(tmp_path / "recovered.pt"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: the recovered weights do not reproduce")
    assert not (tmp_path / "recovered.pt").exists()
