"""``ichscan pull URL``: screen the CT studies of a DICOMweb server (QIDO-RS, WADO-RS)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ichscan.cli.options import CONTEXT_SETTINGS, ScreeningSettings, plugin_manager, screening_options

log = logging.getLogger("ichscan")


@click.command("pull", context_settings=CONTEXT_SETTINGS)
@click.argument("url")
@click.option("--study-date", default=None, metavar="FROM-TO", help="Only studies with a StudyDate in this range (YYYYMMDD-YYYYMMDD; either end may be left out).")
@click.option("--accession", default=None, help="Only the study with this AccessionNumber.")
@click.option("--study-uid", default=None, help="Only the study with this StudyInstanceUID.")
@click.option(
    "--since",
    default=None,
    metavar="YYYYMMDD[HHMMSS]|last",
    help="Only studies at or after this StudyDate/StudyTime; 'last': where the previous --since run on this state file "
    "ended (all studies the first time). Such a run, without other filters, records where it ended.",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A file holding the bearer token for the server at URL.  [default: no token]",
)
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("ichscan-store"),
    help="Where fetched instances are kept: STORE/<Study>/<Series>/<SOP>.dcm.",
)
@screening_options(
    out_help="Per-slice results CSV (appended to across runs).",
    state_help="SQLite ledger: what was screened (so a second pull screens nothing twice), the --since watermark, and the deliveries of --forward.",
)
@click.pass_context
def pull_command(
    ctx: click.Context,
    url: str,
    study_date: str | None,
    accession: str | None,
    study_uid: str | None,
    since: str | None,
    token_file: Path | None,
    store: Path,
    settings: ScreeningSettings,
) -> None:
    """Screen the CT studies of the DICOMweb server at URL (e.g. http://host:8042/dicom-web).

    QIDO-RS lists the studies whose ModalitiesInStudy includes CT (narrowed by the
    filters); WADO-RS fetches the CT series' instances not screened yet into --store
    (durably, then screened). Results go to the CSVs and, with the options
    --dicom-out and --forward, as an SR and key image per study, sent by C-STORE or
    STOW-RS. Exit status 0 once
    the results are delivered or --forward-wait has passed; 1 when a study could not be
    fetched (the next run tries it again).
    """
    from ichscan.dicomweb import read_token
    from ichscan.models import ModelError
    from ichscan.pipeline import PullOptions, RunError, run_pull
    from ichscan.sources.dicomweb import PullQuery

    query = PullQuery(study_date=study_date, accession=accession, study_uid=study_uid, since=since)
    try:
        query.check()
        token = read_token(token_file) if token_file is not None else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    opts = PullOptions(url=url, query=query, store=store, token=token, **settings)
    try:
        result = run_pull(opts, plugin_manager(ctx))
    except (RunError, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    summary, stats = result.summary, result.stats
    log.info(
        "screened %d instances: %d ok (%d positive), %d skipped, %d error -> %s",
        summary.files,
        summary.ok,
        summary.positive,
        summary.skipped,
        summary.error,
        opts.out,
    )
    for name, count in summary.reporter_errors.items():
        log.error("reporter %s failed %d times; its output may be incomplete", name, count)
    if summary.interrupted:
        ctx.exit(130)
    if stats.failed:
        raise click.ClickException(f"{len(stats.failed)} studies could not be fetched (the next run tries them again): {stats.failed[0]}")
