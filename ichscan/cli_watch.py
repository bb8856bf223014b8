"""``ichscan watch``: the Click command (registered on the ``ichscan`` group in :mod:`ichscan.cli`).

Also runnable alone, ``python -m ichscan.cli_watch FOLDER ...``, with the same options.
It does not import :mod:`ichscan.cli` at import time, so ``cli.py`` can import it at
its top without an import cycle.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ichscan.cli_options import model_options, output_options, results_options

log = logging.getLogger("ichscan")




@click.command("watch", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("folder", type=click.Path(path_type=Path))
@output_options("Per-slice results CSV (appended to across runs).")
@results_options()
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SQLite ledger: what was screened, so nothing is screened twice or lost.  [default: ichscan-state.sqlite beside --out]",
)
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
@click.option("--max-latency", type=click.FloatRange(0, 3600), default=1.0, help="Seconds a partial batch waits for more files before it goes to the model.")
@click.option("--rescan", "rescan_interval", type=click.FloatRange(0, 86400), default=60.0, help="Seconds between full rescans that catch missed events; 0: only at start.")
@click.option("--study-timeout", type=click.FloatRange(0, 86400), default=60.0, help="Seconds without a new instance after which a study's summary row is written.")
@model_options
@click.pass_context
def watch_command(
    ctx: click.Context,
    folder: Path,
    out: Path,
    studies_out: Path | None,
    state: Path | None,
    overlays_dir: Path | None,
    overlays_for: str,
    results,
    quarantine_dir: Path | None,
    poll: bool,
    poll_interval: float,
    settle: float,
    max_latency: float,
    rescan_interval: float,
    study_timeout: float,
    weights: Path | None,
    model_name: str | None,
    thresholds: dict[str, float] | None,
    device: str,
    batch_size: int | None,
    workers: int | None,
    threads: int | None,
) -> None:
    """Screen DICOM files as they land in FOLDER (recursively), each exactly once.

    A file is screened once its size and mtime stay unchanged for --settle seconds;
    names like *.part, *.tmp or .hidden wait until renamed. Files already in FOLDER
    are found at start. Results are appended to --out; the --state ledger makes sure
    that, across restarts and crashes, every file gets exactly one row. Stop with
    Ctrl-C or SIGTERM: the files in flight are finished first (exit status 0).
    """
    from ichscan.pipeline import RunError
    from ichscan.models import ModelError
    from ichscan.plugins import PluginError, get_plugin_manager
    from ichscan.pipeline import WatchOptions, run_watch

    obj = ctx.obj if isinstance(ctx.obj, dict) else None
    if obj is None:  # run alone (python -m ichscan.cli_watch): no group set up logging
        from ichscan.cli import _setup_logging

        _setup_logging(0, False)
    try:
        pm = get_plugin_manager(obj.get("plugins_dirs", ()) if obj else ())
    except PluginError as exc:
        raise click.ClickException(str(exc)) from None
    opts = WatchOptions(
        input_dir=folder,
        out=out,
        studies_out=studies_out,
        state=state,
        overlays_dir=overlays_dir,
        overlays_for=overlays_for,
        quarantine_dir=quarantine_dir,
        poll=poll,
        poll_interval=poll_interval,
        settle=settle,
        max_latency=max_latency,
        rescan_interval=rescan_interval,
        study_timeout=study_timeout,
        weights=weights,
        model_name=model_name,
        thresholds=thresholds,
        device=device,
        batch_size=batch_size,
        workers=workers,
        threads=threads,
        results=results,
    )
    try:
        summary = run_watch(opts, pm)
    except (RunError, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        # A second Ctrl-C: stop now; the ledger re-screens what was in flight next time.
        log.warning("interrupted; files in flight will be screened at the next start")
        ctx.exit(130)
    log.info(
        "stopped after %.0f s: screened %d files: %d ok (%d positive), %d skipped, %d error; %d study rows written%s -> %s",
        summary.seconds,
        summary.files,
        summary.ok,
        summary.positive,
        summary.skipped,
        summary.error,
        summary.studies_summarised,
        f"; {summary.quarantined} quarantined" if summary.quarantined else "",
        opts.out,
    )
    for name, count in summary.reporter_errors.items():
        log.error("reporter %s failed %d times; its output may be incomplete", name, count)


if __name__ == "__main__":  # pragma: no cover - python -m ichscan.cli_watch
    watch_command(prog_name="ichscan watch")
