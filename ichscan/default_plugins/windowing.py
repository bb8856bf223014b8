"""Built-in preprocessing: three CT windows as channels (see :mod:`ichscan.preprocess`)."""

from __future__ import annotations

from ichscan import hookimpl


@hookimpl(trylast=True)
def ichscan_preprocess(pixels, slopes, intercepts, settings, device, channels_last):
    from ichscan.preprocess import preprocess

    return preprocess(pixels, slopes, intercepts, settings, device, channels_last=channels_last)
