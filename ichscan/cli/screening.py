"""The screening commands: ``batch``, ``watch`` and ``serve-scp``.

Each parses its own options plus the shared ones (:func:`ichscan.cli.options.screening_options`),
builds the options object, calls one run function from :mod:`ichscan.pipeline` and turns
the errors a run can meet into one-line messages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ichscan.cli.options import CONTEXT_SETTINGS, ScreeningSettings, plugin_manager, screening_options

if TYPE_CHECKING:
    from ichscan.reporting import RunSummary

log = logging.getLogger("ichscan")

RESULTS_CSV = "Per-slice results CSV."
LIVE_RESULTS_CSV = "Per-slice results CSV (appended to across runs)."
LEDGER = "SQLite ledger: what was screened, so nothing is screened twice or lost; also the deliveries of --forward."


def _run_errors() -> tuple[type[Exception], ...]:
    """The errors a run reports as a one-line message (imported late: torch is behind them)."""
    from ichscan.models import ModelError
    from ichscan.pipeline import RunError

    return (RunError, ModelError, ValueError)


def _status_counts(summary: RunSummary) -> str:
    """The rows by status, as every screening command's closing log line gives them."""
    return f"{summary.ok} ok ({summary.positive} positive), {summary.skipped} skipped, {summary.error} error"


def _log_reporter_errors(reporter_errors: dict[str, int]) -> None:
    for name, count in reporter_errors.items():
        log.error("reporter %s failed %d times; its output may be incomplete", name, count)


@click.command("batch", context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path), required=False)
@screening_options(
    out_help=RESULTS_CSV,
    state_help="SQLite file recording what was screened (for --resume) and DICOM results and their deliveries (with --dicom-out/--forward).",
)
@click.option(
    "--resume/--no-resume",
    default=False,
    help="Skip files the state file (--state) records as screened with the same path, size and mtime; without it a "
    "re-run screens everything again and rewrites the outputs.",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Screen the files this file lists (one path or file:// URI a line) instead of walking FOLDER.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where to screen: this machine, or a Ray cluster (pip install 'ichscan[ray]').",
)
@click.option(
    "--address",
    default=None,
    help="With --engine ray: the cluster to join ('auto': the one this node belongs to; ray://HOST:10001).  "
    "[default: start a local Ray]",
)
@click.option("--progress/--no-progress", default=True, help="Progress bar (on a terminal) or periodic log lines.")
@click.pass_context
def batch_command(
    ctx: click.Context,
    folder: Path | None,
    settings: ScreeningSettings,
    resume: bool,
    manifest: Path | None,
    engine: str,
    address: str | None,
    progress: bool,
) -> None:
    """Screen every DICOM file under FOLDER (recursively), or those --manifest lists, into a results CSV.

    Every file gets exactly one row with status ok (screened), skipped (readable DICOM
    that is not a single-frame greyscale CT image) or error (unreadable, refused,
    failed), with a one-line reason. Hidden files are skipped; symbolic links that
    leave FOLDER are not followed. Exit status 0 when the run completed, error rows
    included. --engine ray runs the same steps on a Ray cluster into the same outputs.
    """
    from ichscan.pipeline import BatchOptions, run_batch

    opts = BatchOptions(
        input_dir=folder, manifest=manifest, resume=resume, engine=engine, address=address, progress=progress, **settings
    )
    try:
        summary = run_batch(opts, plugin_manager(ctx))
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None
    rate = summary.files / summary.seconds if summary.seconds > 0 else 0.0
    log.info("screened %d files in %.1f s (%.1f files/s): %s -> %s", summary.files, summary.seconds, rate, _status_counts(summary), opts.out)
    _log_reporter_errors(summary.reporter_errors)
    if summary.interrupted:
        click.echo(f"ichscan: interrupted after {summary.files} files; their rows are in {opts.out}", err=True)
        ctx.exit(130)
    if "csv" in summary.reporter_errors:  # the results file itself is incomplete: a script must notice
        raise click.ClickException(f"some rows could not be written to {opts.out} (see the errors above)")


@click.command("watch", context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(path_type=Path))
@screening_options(out_help=LIVE_RESULTS_CSV, state_help=LEDGER, live=True, metrics=True)
@click.option(
    "--quarantine",
    "quarantine_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Move files that get an error row into this folder (keeping their subfolders).  [default: leave them]",
)
@click.option("--poll", is_flag=True, help="Poll the folder instead of inotify events (network filesystems: NFS, SMB).")
@click.option("--poll-interval", type=click.FloatRange(0.1, 3600), default=1.0, help="Seconds between polls with --poll.")
@click.option("--settle", type=click.FloatRange(0, 3600), default=2.0, help="Seconds a file's size and mtime must stay unchanged before it is screened.")
@click.option("--rescan", "rescan_interval", type=click.FloatRange(0, 86400), default=60.0, help="Seconds between full rescans that catch missed events; 0: only at start.")
@click.pass_context
def watch_command(ctx: click.Context, folder: Path, settings: ScreeningSettings, **watching: Any) -> None:
    """Screen DICOM files as they land in FOLDER (recursively), each exactly once.

    A file is screened once its size and mtime stay unchanged for --settle seconds;
    names like *.part, *.tmp or .hidden wait until renamed. Files already in FOLDER
    are found at start. Results are appended to --out; the --state ledger makes sure
    that, across restarts and crashes, every file gets exactly one row. Stop with
    Ctrl-C or SIGTERM: the files in flight are finished first (exit status 0).
    """
    from ichscan.pipeline import WatchOptions, run_watch

    # The options above are named after the WatchOptions fields they set.
    opts = WatchOptions(input_dir=folder, **watching, **settings)
    try:
        summary = run_watch(opts, plugin_manager(ctx))
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        # A second Ctrl-C: stop now; the ledger re-screens what was in flight next time.
        log.warning("interrupted; files in flight will be screened at the next start")
        ctx.exit(130)
    log.info(
        "stopped after %.0f s: screened %d files: %s; %d study rows written%s -> %s",
        summary.seconds,
        summary.files,
        _status_counts(summary),
        summary.studies_summarised,
        f"; {summary.quarantined} quarantined" if summary.quarantined else "",
        opts.out,
    )
    _log_reporter_errors(summary.reporter_errors)


@click.command("screen", context_settings=CONTEXT_SETTINGS)
@click.argument("source")
@click.argument("location")
@screening_options(out_help=RESULTS_CSV, state_help=LEDGER, live=True)
@click.pass_context
def screen_command(ctx: click.Context, source: str, location: str, settings: ScreeningSettings) -> None:
    """Screen what the source named SOURCE finds at LOCATION.

    Sources are registered by plugins (hook ichscan_register_sources); the built-ins are
    'folder' (like batch) and 'watch' (like watch, with default settle and rescan
    times). 'ichscan plugins' lists the plugins loaded. A finite source ends by itself;
    a live one runs until Ctrl-C or SIGTERM. The pipeline, outputs and options are those
    of batch and watch.
    """
    from ichscan.pipeline import WatchOptions, run_source

    opts = WatchOptions(input_dir=Path(location), progress=False, **settings)
    try:
        summary = run_source(source, location, opts, plugin_manager(ctx))
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None
    log.info("screened %d files: %s -> %s", summary.files, _status_counts(summary), opts.out)
    _log_reporter_errors(summary.reporter_errors)
    if summary.interrupted:
        ctx.exit(130)


def _ae_titles(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    titles = tuple(t.strip() for t in value.split(",") if t.strip())
    if not titles:
        raise click.BadParameter(f"{value!r} names no AE title", ctx, param)
    for title in titles:
        if len(title) > 16 or "\\" in title:
            raise click.BadParameter(f"{title!r} is not an AE title (at most 16 characters, no backslash)", ctx, param)
    return titles


@click.command("serve-scp", context_settings=CONTEXT_SETTINGS)
@click.option("--port", type=click.IntRange(0, 65535), default=11112, help="TCP port to listen on.")
@click.option("--ae-title", default="ICHSCAN", help="Our AE title; associations calling another one are rejected.")
@click.option("--bind", default="127.0.0.1", help="Address to listen on (0.0.0.0 for all interfaces).")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), default=Path("ichscan-store"), help="Where received instances are stored: STORE/<Study>/<Series>/<SOP>.dcm.")
@screening_options(out_help=LIVE_RESULTS_CSV, state_help=LEDGER, calling_ae=False, live=True, metrics=True)
@click.option("--allow-calling", callback=_ae_titles, default=None, help="Comma-separated calling AE titles allowed to connect.  [default: any]")
@click.option("--accept-all-storage", is_flag=True, help="Accept every storage SOP class, not only CT Image Storage (others are stored and get a skipped row).")
@click.option("--max-associations", type=click.IntRange(1, 1000), default=10, help="Simultaneous associations; more are rejected.")
@click.option("--max-pdu", type=click.IntRange(4096, 2**24), default=65536, help="Largest PDU we receive, in bytes.")
@click.option("--idle-timeout", type=click.FloatRange(1, 3600), default=60.0, help="Seconds of silence after which a peer's association is dropped; also the most a PDU may take to arrive whole (plus 1 s per 64 KiB).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Server certificate (PEM): accept TLS associations only.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Private key of --tls-cert (PEM).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="CA certificate (PEM): require client certificates it signed.")
@click.option("--drain-timeout", type=click.FloatRange(0, 3600), default=30.0, help="On SIGINT/SIGTERM, seconds open associations get to finish.")
@click.option("--dimse/--no-dimse", default=True, help="Listen for C-STORE on --port; --no-dimse: DICOMweb only (needs --dicomweb-port).")
@click.option("--dicomweb-port", type=click.IntRange(0, 65535), default=None, help="Also receive by DICOMweb STOW-RS on this HTTP port (same --bind, store, ledger and TLS).  [default: off]")
@click.option("--dicomweb-base", default="/dicom-web", show_default=True, help="URL path under which STOW-RS is served: POST BASE/studies[/{StudyInstanceUID}].")
@click.option("--dicomweb-token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Bearer tokens allowed to store, one a line; a request without one of them gets 401.  [default: no authentication]")
@click.option("--dicomweb-max-request", type=click.IntRange(1024, 2**40), default=2 * 1024**3, show_default=True, help="Largest STOW-RS request body, in bytes (each part: 256 MiB, the decoder's file size cap).")
@click.pass_context
def serve_command(
    ctx: click.Context,
    settings: ScreeningSettings,
    drain_timeout: float,
    dimse: bool,
    dicomweb_port: int | None,
    dicomweb_base: str,
    dicomweb_token_file: Path | None,
    dicomweb_max_request: int,
    **listening: Any,
) -> None:
    """Receive CT images by DICOM C-STORE (and DICOMweb STOW-RS) and screen them.

    Each instance is written to --store durably (temporary file, fsync, rename, fsync of
    the folder) before Success is returned; a write failure answers 0xA700 and leaves
    nothing behind. Screening runs apart from the network handler, in batches across
    associations, with the same ledger as 'ichscan watch': after a crash and restart every
    instance that got Success is screened exactly once. Answers C-ECHO. A duplicate
    SOPInstanceUID keeps the first copy (answered Success, one result row). Stop with
    Ctrl-C or SIGTERM: no new associations, open ones get --drain-timeout seconds, what
    was received is screened, exit status 0.

    With --dicomweb-port, STOW-RS requests (multipart/related; type="application/dicom")
    are stored the same way, each instance durably before the response, which names each
    instance stored or failed (HTTP 200, 202 some failed, 409 all failed).
    """
    from ichscan.pipeline import ServeOptions, WatchOptions, run_serve
    from ichscan.sources.scp import ScpOptions
    from ichscan.sources.stow import StowOptions

    # The options above, but for the shared ones and --drain-timeout, are named after ScpOptions' fields.
    scp = ScpOptions(**listening)
    if (scp.tls_cert is None) != (scp.tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if scp.tls_ca is not None and scp.tls_cert is None:
        raise click.UsageError("--tls-ca needs --tls-cert and --tls-key")
    if not scp.ae_title.strip() or len(scp.ae_title) > 16:
        raise click.BadParameter("1 to 16 characters, not only spaces", param_hint="--ae-title")
    pm = plugin_manager(ctx)
    # Results go out under our own AE title.
    settings["results"].calling_ae = scp.ae_title.strip()
    watch = WatchOptions(input_dir=scp.store, **settings)
    if not dimse and dicomweb_port is None:
        raise click.UsageError("--no-dimse needs --dicomweb-port")
    if dicomweb_token_file is not None and dicomweb_port is None:
        raise click.UsageError("--dicomweb-token-file needs --dicomweb-port")
    stow = None
    if dicomweb_port is not None:
        stow = StowOptions(
            port=dicomweb_port,
            bind=scp.bind,
            base=dicomweb_base,
            token_file=dicomweb_token_file,
            max_request_bytes=dicomweb_max_request,
            idle_timeout=scp.idle_timeout,
            accept_all_storage=scp.accept_all_storage,
        )
    try:
        summary = run_serve(ServeOptions(scp=scp, watch=watch, drain_timeout=drain_timeout, stow=stow, dimse=dimse), pm)
    except _run_errors() as exc:
        raise click.ClickException(str(exc)) from None
    log.info("screened %d instances: %s", summary.files, _status_counts(summary))
