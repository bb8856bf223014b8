"""ichscan: screen head CT DICOM images for intracranial hemorrhage.

The surface a plugin author or a script needs, from one place::

    from ichscan import hookimpl, Reporter, RunConfig, SliceResult, run_batch, BatchOptions

Importing the package is cheap: torch and the plugin machinery load only when one of
these names is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations (``@hookimpl def ichscan_...``).
hookimpl = pluggy.HookimplMarker("ichscan")

from ichscan.labels import LABELS, SUBTYPES  # noqa: E402
from ichscan.lazy import lazy_attributes  # noqa: E402

#: Re-exported names and the module each lives in (imported on first use).
_LAZY = {
    # results, as reporters see them
    "Instance": "ichscan.records",
    "Prediction": "ichscan.records",
    "SliceResult": "ichscan.records",
    "Status": "ichscan.records",
    "StoredImage": "ichscan.records",
    # reporters and the run they report on
    "Reporter": "ichscan.reporting",
    "RunConfig": "ichscan.reporting",
    "RunMode": "ichscan.reporting",
    "RunSummary": "ichscan.reporting",
    "StudySummary": "ichscan.reporting",
    "StudyTable": "ichscan.reporting",
    # sources
    "Entry": "ichscan.sources.base",
    "Source": "ichscan.sources.base",
    # running
    "BatchOptions": "ichscan.pipeline",
    "RunError": "ichscan.pipeline",
    "WatchOptions": "ichscan.pipeline",
    "run_batch": "ichscan.pipeline",
    "run_source": "ichscan.pipeline",
    "run_watch": "ichscan.pipeline",
}

__all__ = ["LABELS", "SUBTYPES", "__version__", "hookimpl", "predict_image", *_LAZY]

if TYPE_CHECKING:
    from ichscan.pipeline import BatchOptions, RunError, WatchOptions, run_batch, run_source, run_watch
    from ichscan.records import Instance, Prediction, SliceResult, Status, StoredImage
    from ichscan.reporting import Reporter, RunConfig, RunMode, RunSummary, StudySummary, StudyTable
    from ichscan.sources.base import Entry, Source


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def predict_image(path, weights=None, show=False):
    """Screen one DICOM file; see :func:`ichscan.api.predict_image`."""
    from ichscan.api import predict_image as _predict_image

    return _predict_image(path, weights=weights, show=show)
