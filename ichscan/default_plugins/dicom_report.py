"""Built-in reporter: DICOM SR and key images per study, written and/or forwarded by C-STORE.

Active with ``--dicom-out DIR`` or ``--forward AE@HOST:PORT``; see :mod:`ichscan.outbox`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ichscan import hookimpl
from ichscan.reporting import Reporter, RunConfig, RunSummary, SliceResult, StudyTable

log = logging.getLogger(__name__)

#: Where objects wait for delivery when --forward is given without --dicom-out.
OUTBOX_FOLDER_NAME = "ichscan-outbox"


def is_demo(config: RunConfig) -> bool:
    """Untrained or bundled demo weights: the SR says "not for diagnostic use"."""
    from ichscan.models import BUNDLED_WEIGHTS

    if not config.trained:
        return True
    try:
        return Path(config.weights).resolve() == Path(BUNDLED_WEIGHTS).resolve()
    except (OSError, ValueError):
        return False


def outbox_folder(config: RunConfig) -> Path:
    if config.dicom_out is not None:
        return Path(config.dicom_out)
    assert config.state is not None
    return Path(config.state).parent / OUTBOX_FOLDER_NAME


class DicomResultsReporter(Reporter):
    """Hands completed studies to the :class:`~ichscan.outbox.Outbox`; runs the forwarder."""

    name = "dicom"

    def __init__(self, config: RunConfig):
        from ichscan.outbox import Forwarder, ModelInfo, Outbox, weights_version

        if config.state is None:
            raise ValueError("DICOM results need a state file (RunConfig.state)")
        model = ModelInfo(
            name=config.model_name,
            version=weights_version(config.weights),
            demo=is_demo(config),
            thresholds=dict(config.thresholds),
        )
        self.config = config
        # ichscan watch holds the state file's lock through its ledger; batch takes it here.
        lock = not config.options.get("watch")
        self.outbox = Outbox(Path(config.state), outbox_folder(config), config.forward, model, lock=lock)
        self.forwarder = None
        if config.forward:
            self.forwarder = Forwarder(Path(config.state), config.forward, config.calling_ae)
            self.forwarder.start()
            left = self.forwarder.drain(0)
            if left:
                log.info("%d deliveries pending from an earlier run; sending them", left)

    def on_results(self, results: list[SliceResult], studies: StudyTable) -> None:
        self.outbox.record_results(results)

    def on_study_complete(self, uids: list[str], studies: StudyTable) -> None:
        made = 0
        for uid in uids:
            try:
                files = self.outbox.complete_study(uid)
            except Exception as exc:  # noqa: BLE001 - one study's objects must not stop the others
                log.error("study %s: cannot make its DICOM results: %s: %s", uid, type(exc).__name__, exc)
                continue
            if files:
                made += len(files)
                log.info("study %s: wrote %s", uid, ", ".join(p.name for p in files))
        if made and self.forwarder is not None:
            self.forwarder.wake.set()

    def on_finish(self, summary: RunSummary, studies: StudyTable) -> None:
        try:
            if self.forwarder is not None:
                left = self.forwarder.drain(self.config.forward_wait)
                self.forwarder.stop()
                self.forwarder.join(timeout=self.forwarder.timeout + 5)
                if left:
                    log.warning(
                        "%d DICOM results not yet delivered to %s; they are kept in %s and sent by the next run",
                        left,
                        ", ".join(str(d) for d in self.config.forward),
                        self.config.state,
                    )
        finally:
            self.outbox.close()


@hookimpl
def ichscan_register_reporters(register, config: RunConfig):
    if config.dicom_out is not None or config.forward:
        register(DicomResultsReporter(config))
