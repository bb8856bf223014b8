"""The six RSNA 2019 labels, per-label thresholds and the challenge metric weights."""

from __future__ import annotations

from collections.abc import Mapping

#: Label order used everywhere: model outputs, CSV columns, checkpoints, RSNA CSV.
LABELS: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
#: The five hemorrhage subtypes (every label but ``any``).
SUBTYPES: tuple[str, ...] = LABELS[:-1]
#: RSNA 2019 weighted log loss: ``any`` counts twice, each subtype once.
METRIC_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)
DEFAULT_THRESHOLD = 0.5


def default_thresholds() -> dict[str, float]:
    """Return a fresh ``label -> 0.5`` mapping."""
    return {label: DEFAULT_THRESHOLD for label in LABELS}


def parse_thresholds(spec: str) -> dict[str, float]:
    """Parse a ``--threshold`` value.

    ``"0.4"`` sets every label; ``"any=0.3,subdural=0.4"`` sets only the named ones.

    Raises
    ------
    ValueError
        For an unknown label, a value that is not a number, or one outside [0, 1].
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty threshold")
    if "=" not in spec:
        value = _probability(spec, "threshold")
        return {label: value for label in LABELS}
    result: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            raise ValueError(f"empty item in threshold {spec!r} (a stray comma?)")
        name, sep, value_text = part.partition("=")
        name = name.strip()
        if not sep or name not in LABELS:
            raise ValueError(
                f"unknown label {name!r} in threshold {part.strip()!r}; labels are: {', '.join(LABELS)}"
            )
        result[name] = _probability(value_text, f"threshold for {name}")
    return result


def merge_thresholds(*layers: Mapping[str, float] | None) -> dict[str, float]:
    """Merge threshold layers; later layers win (default < checkpoint < command line)."""
    merged = default_thresholds()
    for layer in layers:
        if layer:
            for label, value in layer.items():
                if label not in merged:
                    raise ValueError(f"unknown label {label!r} in thresholds")
                merged[label] = float(value)
    return merged


def _probability(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} {text.strip()!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} {value} is outside [0, 1]")
    return value
