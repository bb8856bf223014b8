"""Built-in reporter: DICOM SR and key images per study, written and/or forwarded by C-STORE.

Active with ``--dicom-out DIR`` or ``--forward AE@HOST:PORT``; see :mod:`ichscan.state.outbox`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ichscan import hookimpl
from ichscan.logs import uid_fields
from ichscan.pipeline.options import OUTBOX_FOLDER_NAME
from ichscan.reporting import Reporter, RunConfig, RunSummary, SliceResult, StudyTable

log = logging.getLogger(__name__)

#: Where objects wait for delivery when --forward is given without --dicom-out.


def outbox_folder(config: RunConfig) -> Path:
    """--dicom-out, else the outbox folder beside the state file."""
    if config.dicom_out is not None:
        return Path(config.dicom_out)
    assert config.store is not None
    return config.store.path.parent / OUTBOX_FOLDER_NAME


class DicomResultsReporter(Reporter):
    """Hands completed studies to the :class:`~ichscan.state.outbox.Outbox`; runs the forwarder."""

    name = "dicom"

    def __init__(self, config: RunConfig):
        from ichscan.state.forwarder import Forwarder
        from ichscan.state.outbox import ModelInfo, Outbox, weights_version

        if config.store is None:
            raise ValueError("DICOM results need the open state file (RunConfig.store)")
        model = ModelInfo(
            name=config.model_name,
            version=weights_version(config.weights),
            demo=config.demo,
            thresholds=dict(config.thresholds),
        )
        self.config = config
        self.outbox = Outbox(
            config.store, outbox_folder(config), config.forward, model, saliency=config.saliency, sr_template=config.sr_template
        )
        self.forwarder = None
        unfinished = self.outbox.unfinished()
        if unfinished:
            log.info("finishing the DICOM results of %d studies from an earlier run", len(unfinished))
            try:
                self._complete(unfinished)
            except RuntimeError as exc:
                log.error("%s", exc)
        if config.forward:
            self.forwarder = Forwarder(config.store, config.forward, config.calling_ae)
            self.forwarder.start()
            left = self.forwarder.drain(0)
            if left:
                log.info("%d deliveries pending from an earlier run; sending them", left)

    def on_results(self, results: list[SliceResult], studies: StudyTable) -> None:
        self.outbox.record_results(results)

    def on_study_complete(self, uids: list[str], studies: StudyTable) -> None:
        self._complete(uids)

    def _complete(self, uids: list[str]) -> None:
        files, errors = self.outbox.complete_studies(uids)
        for error in errors:
            log.error("%s", error)
        for path in files:
            log.info("study %s: wrote %s", path.parent.name, path.name, extra=uid_fields(study=path.parent.name, sop=path.stem))
        if files and self.forwarder is not None:
            self.forwarder.wake.set()
        if errors:
            # Counted like a reporter failure, so the run's summary says output is missing.
            raise RuntimeError(f"{len(errors)} studies without DICOM results (retried on the next start)")

    def on_finish(self, summary: RunSummary, studies: StudyTable) -> None:
        # The store stays open: it is closed by whoever opened it (batch, watch).
        if self.forwarder is not None:
            left = self.forwarder.drain(self.config.forward_wait)
            self.forwarder.stop()
            self.forwarder.join(timeout=self.forwarder.timeout + 5)
            if left:
                log.warning(
                    "%d DICOM results not yet delivered to %s; they are kept in %s and sent by the next run",
                    left,
                    ", ".join(str(d) for d in self.outbox.destinations),
                    self.config.store.path,
                )


@hookimpl
def ichscan_register_reporters(register, config: RunConfig):
    if config.dicom_out is not None or config.forward:
        register(DicomResultsReporter(config))
