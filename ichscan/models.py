"""Model registry (filled by ``ichscan_register_models``) and checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import nn

from ichscan.labels import LABELS, merge_thresholds
from ichscan.durable import replacing
from ichscan.preprocess import PreprocessSettings

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ichscan-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_MODEL = "simplecnn"
#: Demo weights shipped in the package (absent until trained ones are committed).
BUNDLED_WEIGHTS = Path(__file__).parent / "weights" / "simplecnn_demo.pt"
#: Every model's bundled demo weights, by model name: used when no ``--weights`` is given.
BUNDLED: dict[str, Path] = {
    DEFAULT_MODEL: BUNDLED_WEIGHTS,
    "ichnet": Path(__file__).parent / "weights" / "ichnet_demo.pt",
}


def bundled_weights(model_name: str | None) -> Path | None:
    """The demo weights shipped for ``model_name`` (the default model for None), if any."""
    path = BUNDLED.get(model_name or DEFAULT_MODEL)
    return path if path is not None and path.is_file() else None


def is_bundled(weights: str | Path) -> bool:
    """Whether ``weights`` is one of the demo weights shipped in the package."""
    try:
        target = Path(weights).resolve()
    except (OSError, ValueError):
        return False
    return any(target == path.resolve() for path in BUNDLED.values())
UNTRAINED_SEED = 20190923  # fixed, so the untrained stand-in is the same on every run


class ModelError(Exception):
    """A model or checkpoint could not be loaded; the message says why."""


def model_factories(pm: pluggy.PluginManager) -> dict[str, Callable[..., nn.Module]]:
    """All models registered through ``ichscan_register_models``, by name."""
    factories: dict[str, Callable[..., nn.Module]] = {}

    def register(name: str, factory: Callable[..., nn.Module]) -> None:
        if name in factories:
            raise ModelError(f"two plugins register a model named {name!r}")
        factories[name] = factory

    pm.hook.ichscan_register_models(register=register)
    return factories


def create_model(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> nn.Module:
    factories = model_factories(pm)
    if name not in factories:
        raise ModelError(f"unknown model {name!r}; registered: {', '.join(sorted(factories)) or 'none'}")
    return factories[name](**kwargs)


def has_series_head(model: nn.Module) -> bool:
    """Whether ``model`` refines its slices by whole series: a ``series_head = True``
    attribute and the methods ``embed(x) -> (N, D)`` and ``refine(embeddings (B, L, D),
    lengths) -> (slice logits (B, L, 6), series logits (B, 6))`` (see ``ichnet-series``)."""
    return bool(getattr(model, "series_head", False)) and callable(getattr(model, "refine", None)) and callable(getattr(model, "embed", None))


#: ``ichscan train`` settings of a model that states none (``train_defaults``), e.g. simplecnn.
TRAIN_DEFAULTS: dict[str, int | float] = {"epochs": 5, "lr": 1e-3, "batch_size": 32}


def train_defaults(pm: pluggy.PluginManager, name: str) -> dict[str, int | float]:
    """Training settings (``epochs``, ``lr``, ``batch_size``) for model ``name``.

    A model states its own in a ``train_defaults`` mapping on its factory (the class it
    registers), read without building the model; what it leaves out comes from
    :data:`TRAIN_DEFAULTS`.

    Raises
    ------
    ModelError
        For an unknown model, or ``train_defaults`` with an unknown key or a bad value.
    """
    factories = model_factories(pm)
    if name not in factories:
        raise ModelError(f"unknown model {name!r}; registered: {', '.join(sorted(factories)) or 'none'}")
    own = getattr(factories[name], "train_defaults", None) or {}
    unknown = set(own) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ModelError(f"model {name!r}: train_defaults has unknown keys {sorted(unknown)} (known: {', '.join(TRAIN_DEFAULTS)})")
    merged = {**TRAIN_DEFAULTS, **own}
    for key in ("epochs", "batch_size"):
        if not isinstance(merged[key], int) or isinstance(merged[key], bool) or merged[key] < 1:
            raise ModelError(f"model {name!r}: train_defaults {key} must be a whole number >= 1, not {merged[key]!r}")
    if not isinstance(merged["lr"], (int, float)) or not 0 < merged["lr"] <= 1:
        raise ModelError(f"model {name!r}: train_defaults lr must be in (0, 1], not {merged['lr']!r}")
    return merged


@dataclass
class LoadedModel:
    """A model ready for inference plus what it needs to be used correctly."""

    model: nn.Module
    name: str
    thresholds: dict[str, float]
    preprocessing: PreprocessSettings
    source: str  # checkpoint path, or "untrained (seed N)"
    trained: bool
    extra: dict[str, Any] = field(default_factory=dict)
    bundled: bool = False  # the demo weights shipped in the package

    def config_fields(self) -> dict[str, Any]:
        """The :class:`ichscan.reporting.RunConfig` fields these set."""
        return {"thresholds": self.thresholds, "model_name": self.name, "weights": self.source, "trained": self.trained}

    def notice(self) -> str | None:
        """What a user must be told about these weights, if anything."""
        if not self.trained:
            return (
                f"no trained weights: using an UNTRAINED {self.name} ({self.source}); its probabilities are "
                "meaningless. Pass --weights FILE from 'ichscan train'."
            )
        if self.bundled:
            return "using the bundled demo weights, trained on synthetic phantoms only: NOT for clinical use."
        return None


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    *,
    model_kwargs: dict[str, Any] | None = None,
    thresholds: dict[str, float] | None = None,
    preprocessing: PreprocessSettings = PreprocessSettings(),
    extra: dict[str, Any] | None = None,
    half: bool = False,
) -> None:
    """Save weights with everything ``ichscan batch --weights`` needs (atomically)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "labels": list(LABELS),
        "thresholds": merge_thresholds(thresholds),
        "preprocessing": preprocessing.to_dict(),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    with replacing(Path(path)) as tmp:
        torch.save(payload, tmp)


def export_half(source: str | Path, target: str | Path) -> None:
    """Re-save a checkpoint with float16 weights (half the size; loads back as float32)."""
    payload = read_checkpoint(source)
    payload["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    with replacing(Path(target)) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint file (``weights_only``: no code runs from it)."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"weights file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001
        # torch's messages run to several paragraphs; keep the first line.
        first = (str(exc).strip().splitlines() or [""])[0]
        if len(first) > 120:
            first = first[:120].rsplit(" ", 1)[0] + " ..."
        raise ModelError(f"cannot read weights {path}: not an ichscan checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not an ichscan checkpoint")
    if list(payload.get("labels", [])) != list(LABELS):
        raise ModelError(f"{path} has labels {payload.get('labels')}, expected {list(LABELS)}")
    return payload


def load_model(
    pm: pluggy.PluginManager,
    weights: str | Path | None = None,
    *,
    model_name: str | None = None,
    thresholds: dict[str, float] | None = None,
) -> LoadedModel:
    """Build the model from ``weights``, else the model's bundled demo weights
    (:data:`BUNDLED`), else an untrained one.

    Thresholds: ``thresholds`` (command line) over the checkpoint's over 0.5.
    """
    if weights is None:
        weights = bundled_weights(model_name)
    if weights is None:
        name = model_name or DEFAULT_MODEL
        torch.manual_seed(UNTRAINED_SEED)
        model = create_model(pm, name)
        loaded = LoadedModel(
            model=model,
            name=name,
            thresholds=merge_thresholds(thresholds),
            preprocessing=PreprocessSettings(),
            source=f"untrained (seed {UNTRAINED_SEED})",
            trained=False,
        )
    else:
        payload = read_checkpoint(weights)
        name = payload["model"]
        if model_name and model_name != name:
            raise ModelError(f"{weights} holds a {name!r} model, not {model_name!r}")
        model = create_model(pm, name, **payload.get("model_kwargs", {}))
        try:
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
        except RuntimeError as exc:
            raise ModelError(f"{weights} does not fit model {name!r}: {str(exc).splitlines()[0]}") from None
        loaded = LoadedModel(
            model=model,
            name=name,
            thresholds=merge_thresholds(payload.get("thresholds"), thresholds),
            preprocessing=PreprocessSettings.from_dict(payload.get("preprocessing")),
            source=str(weights),
            trained=True,
            extra=dict(payload.get("extra", {})),
            bundled=is_bundled(weights),
        )
    loaded.model.eval()
    return loaded
