"""Shared fixtures: small models built by the tests themselves (nothing is downloaded)."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes tens of seconds (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def tiny_dtln(tmp_path_factory):
    """A small randomly initialised DTLN and its exported card (step + sequence graphs)."""
    torch = pytest.importorskip("torch")
    from quell.export.exporter import export_model
    from quell.models.dtln import DTLN, DTLNConfig

    torch.manual_seed(0)
    model = DTLN(DTLNConfig(hidden=32, encoder=64)).eval()
    card = export_model(model, tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    return model, card.path


@pytest.fixture(scope="session")
def tiny_dtln_card(tiny_dtln):
    return tiny_dtln[1]


@pytest.fixture(scope="session")
def delay_card(tmp_path_factory):
    """A graph that only delays its input (no torch needed): for the engine, latency and cost checks."""
    from tests.delay_model import write_delay_model

    return write_delay_model(tmp_path_factory.mktemp("delay"))
