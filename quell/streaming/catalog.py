"""The shipped models (cards in `quell/assets/`) and lookup of a model by name or by card path."""

from __future__ import annotations

from pathlib import Path

from quell.streaming.card import ModelCard

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def list_models() -> list[ModelCard]:
    """Cards of every model shipped in the package, by name."""
    return sorted((ModelCard.load(p) for p in ASSETS.glob("*.json")), key=lambda card: card.name)


def find_model(model: str | Path | ModelCard) -> ModelCard:
    """A card from a shipped model's name, a card (.json) path, or a step graph (.onnx) path with its card."""
    if isinstance(model, ModelCard):
        return model
    path = Path(model)
    if path.suffix == ".onnx":
        path = path.with_suffix(".json")
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"no model card at {path}")
        return ModelCard.load(path)
    shipped = ASSETS / f"{model}.json"
    if shipped.is_file():
        return ModelCard.load(shipped)
    names = ", ".join(card.name for card in list_models()) or "none"
    raise ValueError(f"unknown model {str(model)!r} (shipped models: {names}; or give a .json card path)")
