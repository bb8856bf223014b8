"""ichscan: screen head CT DICOM images for intracranial hemorrhage.

Importing the package is cheap: torch and the plugin machinery load only when used.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations (``@hookimpl def ichscan_...``).
hookimpl = pluggy.HookimplMarker("ichscan")

from ichscan.labels import LABELS, SUBTYPES  # noqa: E402

__all__ = ["LABELS", "SUBTYPES", "__version__", "hookimpl", "predict_image"]


def predict_image(path, weights=None, show=False):
    """Screen one DICOM file; see :func:`ichscan.api.predict_image`."""
    from ichscan.api import predict_image as _predict_image

    return _predict_image(path, weights=weights, show=show)
