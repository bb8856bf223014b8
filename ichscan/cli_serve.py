"""``ichscan serve-scp``: the Click command (registered on the ``ichscan`` group in :mod:`ichscan.cli`)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ichscan.cli_options import DEVICES, OVERLAYS_FOR, parse_threshold_option, results_options

log = logging.getLogger("ichscan")


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


@click.command("serve-scp", context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--port", type=click.IntRange(0, 65535), default=11112, help="TCP port to listen on.")
@click.option("--ae-title", default="ICHSCAN", help="Our AE title; associations calling another one are rejected.")
@click.option("--bind", default="127.0.0.1", help="Address to listen on (0.0.0.0 for all interfaces).")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), default=Path("ichscan-store"), help="Where received instances are stored: STORE/<Study>/<Series>/<SOP>.dcm.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results.csv"), help="Per-slice results CSV (appended to across runs).")
@click.option("--studies-out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Per-study summary CSV.  [default: <out stem>_studies.csv beside --out]")
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Ledger (SQLite).  [default: ichscan-state.sqlite beside --out]")
@click.option("--overlays", "overlays_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder for overlay PNGs.  [default: overlays/ beside --out]")
@click.option("--overlays-for", type=click.Choice(OVERLAYS_FOR), default="positive", help="Which slices get an overlay PNG.")
@results_options(calling_ae=False)
@click.option("--allow-calling", callback=_ae_titles, default=None, help="Comma-separated calling AE titles allowed to connect.  [default: any]")
@click.option("--accept-all-storage", is_flag=True, help="Accept every storage SOP class, not only CT Image Storage (others are stored and get a skipped row).")
@click.option("--max-associations", type=click.IntRange(1, 1000), default=10, help="Simultaneous associations; more are rejected.")
@click.option("--max-pdu", type=click.IntRange(4096, 2**24), default=65536, help="Largest PDU we receive, in bytes.")
@click.option("--idle-timeout", type=click.FloatRange(1, 3600), default=60.0, help="Seconds of silence after which a peer's association is dropped.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Server certificate (PEM): accept TLS associations only.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Private key of --tls-cert (PEM).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="CA certificate (PEM): require client certificates it signed.")
@click.option("--study-timeout", type=click.FloatRange(0, 86400), default=60.0, help="Seconds without a new instance after which a study's summary row is written.")
@click.option("--drain-timeout", type=click.FloatRange(0, 3600), default=30.0, help="On SIGINT/SIGTERM, seconds open associations get to finish.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Checkpoint from 'ichscan train'.  [default: the bundled weights]")
@click.option("--threshold", "thresholds", metavar="THRESHOLDS", callback=parse_threshold_option, default=None, help="Decision thresholds, as for 'batch': '0.4' or 'any=0.3,subdural=0.4'.  [default: the checkpoint's, else 0.5]")
@click.option("--device", type=click.Choice(DEVICES), default="auto", help="Where the model runs; auto takes CUDA when present.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per full model batch.  [default: 32 on CPU; on a GPU 256, fewer if its free memory is short]")
@click.option("--max-latency", type=click.FloatRange(0, 3600), default=1.0, help="Seconds a partial batch waits for more instances.")
@click.option("--workers", type=click.IntRange(0, 256), default=None, help="Decode worker processes (0: decode in the main process).  [default: one per core on CPU, all but one with a GPU]")
@click.pass_context
def serve_command(ctx, port, ae_title, bind, store, out, studies_out, state, overlays_dir, overlays_for, results, allow_calling, accept_all_storage,
                  max_associations, max_pdu, idle_timeout, tls_cert, tls_key, tls_ca, study_timeout, drain_timeout, weights, thresholds,
                  device, batch_size, max_latency, workers):
    """Receive CT images by DICOM C-STORE and screen them.

    Each instance is written to --store durably (temporary file, fsync, rename, fsync of
    the folder) before Success is returned; a write failure answers 0xA700 and leaves
    nothing behind. Screening runs apart from the network handler, in batches across
    associations, with the same ledger as 'ichscan watch': after a crash and restart every
    instance that got Success is screened exactly once. Answers C-ECHO. A duplicate
    SOPInstanceUID keeps the first copy (answered Success, one result row). Stop with
    Ctrl-C or SIGTERM: no new associations, open ones get --drain-timeout seconds, what
    was received is screened, exit status 0.
    """
    from ichscan.pipeline import RunError
    from ichscan.models import ModelError
    from ichscan.plugins import PluginError, get_plugin_manager
    from ichscan.pipeline import ServeOptions, run_serve
    from ichscan.sources.scp import ScpOptions
    from ichscan.pipeline import WatchOptions

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_ca is not None and tls_cert is None:
        raise click.UsageError("--tls-ca needs --tls-cert and --tls-key")
    if not ae_title.strip() or len(ae_title) > 16:
        raise click.BadParameter("1 to 16 characters, not only spaces", param_hint="--ae-title")
    obj = ctx.obj if isinstance(ctx.obj, dict) else {}
    try:
        pm = get_plugin_manager(obj.get("plugins_dirs", ()))
    except PluginError as exc:
        raise click.ClickException(str(exc)) from None
    scp = ScpOptions(
        port=port,
        ae_title=ae_title,
        bind=bind,
        store=store,
        allow_calling=allow_calling,
        accept_all_storage=accept_all_storage,
        max_associations=max_associations,
        max_pdu=max_pdu,
        idle_timeout=idle_timeout,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
    )
    watch = WatchOptions(
        input_dir=store,
        out=out,
        studies_out=studies_out,
        state=state,
        overlays_dir=overlays_dir,
        overlays_for=overlays_for,
        study_timeout=study_timeout,
        max_latency=max_latency,
        weights=weights,
        thresholds=thresholds,
        device=device,
        batch_size=batch_size,
        workers=workers,
        results=results,
    )
    # Results go out under our own AE title.
    results.calling_ae = ae_title.strip()
    try:
        summary = run_serve(ServeOptions(scp=scp, watch=watch, drain_timeout=drain_timeout), pm)
    except (RunError, ModelError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    log.info("screened %d instances: %d ok (%d positive), %d skipped, %d error", summary.files, summary.ok, summary.positive, summary.skipped, summary.error)
