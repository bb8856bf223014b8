"""Hook specifications for ichscan plugins (pluggy project name ``ichscan``).

Implement any of these in a module with ``@ichscan.hookimpl`` and install it under the
entry-point group ``ichscan``, or drop the ``.py`` file into a ``--plugins-dir``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    import numpy as np
    import torch

    from ichscan.events import StudyResult
    from ichscan.preprocess import PreprocessSettings
    from ichscan.reporting import Reporter, RunConfig
    from ichscan.sources.base import Source

hookspec = pluggy.HookspecMarker("ichscan")


@hookspec
def ichscan_register_models(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register model architectures by name.

    Call ``register(name, factory)`` once per model; ``factory(**kwargs)`` returns a
    ``torch.nn.Module`` mapping an ``(N, C, S, S)`` float batch to ``(N, 6)`` logits in
    the label order of :data:`ichscan.LABELS`. Names must be unique across plugins.
    A module with an integer attribute ``slice_context = k`` gets each slice with ``k``
    neighbours per side of its series: ``C = (2k + 1) * windows`` (see
    ``ichscan_preprocess``); absent means 0, single slices.
    The built-in ``simplecnn`` is registered this way.

    :param register: callback taking the model name and its factory.
    """


@hookspec(firstresult=True)
def ichscan_preprocess(
    pixels: Sequence[np.ndarray | torch.Tensor],
    slopes: Sequence[float],
    intercepts: Sequence[float],
    settings: PreprocessSettings,
    device: torch.device,
    channels_last: bool,
    context: int,
) -> torch.Tensor | None:
    """Turn a batch of stored pixel arrays into the model's input tensor.

    Used for inference and for training alike. Stops at the first non-None result;
    the built-in windowing (three CT windows, 224 x 224) runs last, so a plugin that
    returns a tensor replaces it and one that returns None leaves it in place.

    For a model with ``slice_context = k`` (``context``) the batch holds ``N`` slices
    with their ``2k + 1`` neighbours each, slice after slice, neighbours in position
    order (lowest first, the slice itself in the middle): ``len(pixels) == N * (2k+1)``.
    Return either one image per array, ``(N * (2k+1), C, S, S)`` (the pipeline then
    stacks each slice's neighbours into channels: channel ``j * C + c`` is window ``c``
    of neighbour ``j``), or that ``(N, (2k+1) * C, S, S)`` tensor directly.

    :param pixels: 2-D arrays of stored values, one per image (sizes may differ; on
        the CPU the decode workers have already resized them to ``settings.size``).
    :param slopes: RescaleSlope per image (``HU = pixels * slope + intercept``).
    :param intercepts: RescaleIntercept per image (after the RSNA 12-bit fix).
    :param settings: windows and output size saved with the model's checkpoint.
    :param device: where the result must live.
    :param channels_last: whether the caller wants channels-last memory format.
    :param context: the model's ``slice_context`` ``k`` (0: one array per slice).
    :return: a float32 tensor on ``device`` shaped as above, or None to pass.
    """


@hookspec
def ichscan_register_reporters(register: Callable[[Reporter], None], config: RunConfig) -> None:
    """Add reporters to a screening run.

    A reporter (subclass of :class:`ichscan.reporting.Reporter`) sees every batch of
    results with ``on_results`` and the end of the run with ``on_finish``. An exception
    in one reporter is logged and does not stop the others. Called for every hook
    implementation (not first-result).

    :param register: callback taking a reporter instance.
    :param config: the run's settings: output paths, thresholds, model, options.
    """


@hookspec
def ichscan_register_sources(register: Callable[[str, Callable[[str], Source]], None]) -> None:
    """Register sources of instances by name.

    Call ``register(name, factory)`` once per source; ``factory(location)`` returns an
    object following :class:`ichscan.sources.base.Source` (a folder walk, a watched
    folder, a queue, a DICOMweb endpoint...). ``ichscan screen NAME LOCATION`` and
    :func:`ichscan.pipeline.run_source` run it through the same pipeline as the
    built-in commands. The built-ins ``folder`` (finite) and ``watch`` (live) are
    registered this way. Names must be unique across plugins.

    :param register: callback taking the source name and its factory.
    """


@hookspec
def ichscan_register_commands(cli: click.Group) -> None:
    """Add commands to the ``ichscan`` command line.

    Called at most once per invocation, when ``ichscan`` lists its commands (``--help``)
    or is asked for one that is not built in, after all plugins (entry points,
    ``--plugins-dir``, subject to ``ICHSCAN_LOAD_PLUGINS``) are loaded. Add commands to
    the Click group it gets with ``@cli.command()`` (or ``cli.add_command``,
    ``@cli.group()``); they become ``ichscan`` commands. A name a built-in command already
    has is ignored with a warning. Called for every hook implementation (not first-result).

    :param cli: the Click group to add commands to.
    """


@hookspec
def ichscan_study_result(result: StudyResult, config: RunConfig) -> None:
    """A study is complete: act on its result (notify, file it, raise a worklist priority).

    Called once per completed study: in ``batch`` at the end of the run, in ``watch`` and
    ``serve-scp`` when the study has been quiet for ``--study-timeout`` seconds, and
    again when late instances revise it (the same study, new values). After a crash the
    same study may be completed again with the same values: make repeats harmless (the
    built-in notifiers keep a durable record and send each distinct result once). Called
    for every hook implementation; one that raises is logged and the others still run.
    The DICOM results the run made for the study are in ``result.dicom_results``.

    :param result: the study's probabilities, top finding, accession number, best slice,
        overlay and DICOM results (see :class:`ichscan.events.StudyResult`).
    :param config: the run's settings (``config.store`` is the open state file).
    """
