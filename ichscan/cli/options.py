"""Options shared by the commands, each defined once, and the plugin manager they share.

``batch``, ``watch`` and ``serve-scp`` take the same output, result, state and model
options (the live two also the latency and timeout options) through
:func:`screening_options`, which hands them to the command as one ``settings`` dict whose
keys are the fields of :class:`ichscan.pipeline.BatchOptions` and
:class:`ichscan.pipeline.WatchOptions`. A new shared option is added here once and
reaches every screening command, its ``--help`` and its options object.

This module imports nothing from the ``ichscan.cli`` package, so every command module
can import it without an import cycle.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ichscan.labels import parse_thresholds
from ichscan.reporting import NOTIFY_ON, SR_TEMPLATES

if TYPE_CHECKING:
    import pluggy

OVERLAYS_FOR = ("positive", "all", "none")
DEVICES = ("auto", "cpu", "cuda")
THRESHOLD_DEFAULT = "  [default: the checkpoint's, else 0.5]"
#: Every command's: -h as well as --help, and defaults in --help (also for a command run alone).
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "show_default": True}

#: Keyword arguments for ``BatchOptions``/``WatchOptions``, from :func:`screening_options`.
ScreeningSettings = dict[str, Any]


def parse_threshold_option(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float] | None:
    if value is None:
        return None
    try:
        return parse_thresholds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def threshold_option(help: str) -> click.Option:
    """``--threshold``, parsed into a label -> threshold dict (screening, predict, evaluate)."""
    return click.Option(
        ["--threshold", "thresholds"], metavar="THRESHOLDS", callback=parse_threshold_option, default=None, help=help + THRESHOLD_DEFAULT
    )


def device_option(help: str = "Where the model runs; auto takes CUDA when present.") -> click.Option:
    return click.Option(["--device"], type=click.Choice(DEVICES), default="auto", help=help)


SALIENCY_HELP = (
    "Draw a Grad-CAM heat map of the top finding onto the overlay and key image of each positive slice "
    "(one extra backward pass per positive slice)."
)


def saliency_option(help: str = SALIENCY_HELP) -> click.Option:
    """``--saliency`` (screening commands and ``predict``)."""
    return click.Option(["--saliency"], is_flag=True, default=False, help=help)


def with_options(*options: click.Option) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Attach ready-made options to a command function, listed in ``--help`` in this order
    (what ``@click.option`` does, for options built once and used by several commands)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            click.decorators._param_memo(f, option)  # the same call @click.option makes
        return f

    return decorate


def plugin_manager(ctx: click.Context) -> pluggy.PluginManager:
    """The run's plugin manager, built once per invocation from the group's --plugins-dir.

    Cached on the root context: the group consults it for plugin commands before the
    command runs, and loading a plugin file twice would give two copies of its module.
    A command invoked on its own (tests) has no group, so no plugin folders.
    """
    from ichscan.plugins import PluginError, get_plugin_manager

    root = ctx.find_root()
    obj = root.ensure_object(dict)
    if "plugin_manager" not in obj:
        try:
            obj["plugin_manager"] = get_plugin_manager(root.params.get("plugins_dirs") or ())
        except PluginError as exc:
            raise click.ClickException(str(exc)) from None
    return obj["plugin_manager"]


def _path_option(decls: list[str], help: str, *, folder: bool = False) -> click.Option:
    """An output path, a file (or with ``folder`` a folder), ``None`` when not given."""
    kind = click.Path(file_okay=False, path_type=Path) if folder else click.Path(dir_okay=False, path_type=Path)
    return click.Option(decls, type=kind, default=None, help=help)


def _output_options(out_help: str) -> list[click.Option]:
    return [
        click.Option(["--out"], type=click.Path(dir_okay=False, path_type=Path), default=Path("results.csv"), help=out_help),
        _path_option(["--studies-out"], "Per-study summary CSV.  [default: <out stem>_studies.csv beside --out]"),
        _path_option(["--overlays", "overlays_dir"], "Folder for overlay PNGs.  [default: overlays/ beside --out]", folder=True),
        click.Option(["--overlays-for"], type=click.Choice(OVERLAYS_FOR), default="positive", help="Which slices get an overlay PNG."),
    ]


def _destinations(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[Any, ...]:
    from ichscan.state.forwarder import parse_destination

    try:
        return tuple(dict.fromkeys(parse_destination(text) for text in value))  # a repeat is one destination
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def with_token(destinations: tuple[Any, ...], token_file: Path | None) -> tuple[Any, ...]:
    """The DICOMweb destinations of ``--forward`` with the bearer token of ``--forward-token-file``."""
    from ichscan.dicomweb import WebDestination, read_token

    web = [d for d in destinations if isinstance(d, WebDestination)]
    if token_file is None:
        return destinations
    if not web:
        raise click.BadParameter("is for DICOMweb destinations: give --forward http(s)://.../dicom-web", param_hint="--forward-token-file")
    try:
        token = read_token(token_file)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--forward-token-file") from None
    return tuple(WebDestination(d.url, token) if isinstance(d, WebDestination) else d for d in destinations)


def _http_urls(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[Any, ...]:
    from ichscan.state.messages import HttpDestination

    try:
        return tuple(dict.fromkeys(HttpDestination.parse(text) for text in value))  # a repeat is one destination
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def with_notify_credentials(
    destinations: tuple[Any, ...], secret_file: Path | None, token_file: Path | None, option: str = "--notify"
) -> tuple[Any, ...]:
    """The ``--notify`` URLs with the signing secret of ``--notify-secret-file`` and the bearer
    token of ``--notify-token-file`` (each read once; a bad file is a one-line error); with
    ``option="--fhir-forward"`` the same for ``--fhir-forward`` and ``--fhir-token-file``."""
    from dataclasses import replace

    from ichscan.dicomweb import read_token

    credentials: dict[str, Any] = {}
    prefix = option.split("-")[2]  # notify, fhir
    for path, name, what in ((secret_file, "secret", f"--{prefix}-secret-file"), (token_file, "token", f"--{prefix}-token-file")):
        if path is None:
            continue
        if not destinations:
            raise click.BadParameter(f"goes with {option}: give {option} http(s)://...", param_hint=what)
        try:
            text = read_token(path, name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=what) from None
        credentials[name] = text.encode("ascii") if name == "secret" else text
    return tuple(replace(d, **credentials) for d in destinations)


def _ae_title(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip() or len(value) > 16 or "\\" in value:
        raise click.BadParameter("1-16 characters, no backslash", ctx, param)
    return value.strip()


def _results_options(calling_ae: bool) -> list[click.Option]:
    options = [
        _path_option(
            ["--html"], "Write a static HTML report (studies by 'any' probability, overlay thumbnails; opens from disk, no patient names)."
        ),
        _path_option(
            ["--dicom-out"],
            "Write a DICOM SR per study and a Secondary Capture key image per positive study here: DIR/<StudyInstanceUID>/<SOPInstanceUID>.dcm.",
            folder=True,
        ),
        click.Option(
            ["--sr-template"],
            type=click.Choice(SR_TEMPLATES),
            default=SR_TEMPLATES[0],
            help="The SR's template: a TID 1500 Imaging Measurement Report (what viewers such as OHIF display), "
            "or ichscan's own Comprehensive SR tree (with per-slice probabilities).",
        ),
        click.Option(
            ["--forward"],
            metavar="AE@HOST:PORT|URL",
            multiple=True,
            callback=_destinations,
            help="Send the SR and key images by C-STORE to AE@HOST:PORT, or by STOW-RS to a DICOMweb base URL "
            "(http(s)://host:8042/dicom-web; no credentials in it) (repeatable). Retried with back-off; deliveries are "
            "kept in the state file, so a restart neither loses nor duplicates one.",
        ),
        click.Option(
            ["--forward-token-file"],
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="A file holding the bearer token sent to the DICOMweb destinations of --forward.  [default: no token]",
        ),
        click.Option(
            ["--forward-wait"],
            type=click.FloatRange(0, 86400),
            default=30.0,
            help="At the end of a run, seconds to wait for pending deliveries and notifications (the rest go with the next run).",
        ),
        click.Option(
            ["--notify"],
            metavar="URL",
            multiple=True,
            callback=_http_urls,
            help="POST a JSON event about study results to this http(s) URL (repeatable; a webhook). Recorded in the state "
            "file before it is sent, retried with back-off, the same event id on every try; no patient names in it.",
        ),
        click.Option(
            ["--notify-on"],
            type=click.Choice(NOTIFY_ON),
            default=NOTIFY_ON[0],
            help="positive: an event when a study becomes positive (its first result, or a revision of a negative one); "
            "all: an event for every new study result.",
        ),
        click.Option(
            ["--notify-secret-file"],
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="A file holding the secret that signs each --notify body: X-Ichscan-Signature: sha256=<HMAC-SHA256 hex>.  "
            "[default: unsigned]",
        ),
        click.Option(
            ["--notify-token-file"],
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="A file holding a bearer token sent (Authorization: Bearer) with each --notify request.  [default: no token]",
        ),
        _path_option(
            ["--fhir-out"],
            "Write a FHIR R4B transaction Bundle per completed study here (DiagnosticReport, an Observation per label, "
            "the Device): DIR/<StudyInstanceUID>.json, replaced when the study is revised; no patient names.",
            folder=True,
        ),
        click.Option(
            ["--fhir-forward"],
            metavar="URL",
            multiple=True,
            callback=_http_urls,
            help="POST each study's FHIR Bundle (a transaction) to this FHIR server base URL, e.g. http://fhir:8080/fhir "
            "(repeatable). Recorded in the state file first, retried with back-off; a revision is sent as an amendment.",
        ),
        click.Option(
            ["--fhir-token-file"],
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="A file holding a bearer token sent (Authorization: Bearer) to the --fhir-forward servers.  [default: no token]",
        ),
    ]
    if calling_ae:
        options.append(click.Option(["--calling-ae"], default="ICHSCAN", callback=_ae_title, help="Our AE title when forwarding."))
    return options


def _state_option(state_help: str) -> click.Option:
    return _path_option(["--state"], state_help + "  [default: ichscan-state.sqlite beside --out]")


def _model_options() -> list[click.Option]:
    return [
        click.Option(
            ["--weights"],
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Checkpoint from 'ichscan train'.  [default: the bundled weights]",
        ),
        click.Option(
            ["--model", "model_name"],
            default=None,
            help="Registered model name; with --weights it must be the checkpoint's model.  [default: simplecnn]",
        ),
        threshold_option("Decision threshold: '0.4' for all labels or 'any=0.3,subdural=0.4'. Overrides the checkpoint's."),
        device_option(),
        click.Option(
            ["--batch-size"],
            type=click.IntRange(1, 4096),
            default=None,
            help="Images per model batch.  [default: 32 on CPU; on a GPU 256, fewer if its free memory is short]",
        ),
        click.Option(
            ["--workers"],
            type=click.IntRange(0, 256),
            default=None,
            help="Decode worker processes; 0 decodes in the main process.  [default: one per core on CPU, all cores but one with a GPU]",
        ),
        click.Option(["--threads"], type=click.IntRange(1, 256), default=None, help="Model threads on the CPU.  [default: one per core]"),
        saliency_option(),
    ]


def _live_options() -> list[click.Option]:
    return [
        click.Option(
            ["--max-latency"],
            type=click.FloatRange(0, 3600),
            default=1.0,
            help="Seconds a partial batch waits for more images before it goes to the model.",
        ),
        click.Option(
            ["--study-timeout"],
            type=click.FloatRange(0, 86400),
            default=60.0,
            help="Seconds without a new instance after which a study's summary row is written.",
        ),
        click.Option(
            ["--series-timeout"],
            type=click.FloatRange(0, 86400),
            default=10.0,
            help="With a model that looks at neighbouring slices: seconds a series must be quiet before slices whose "
            "neighbours never came are screened anyway.",
        ),
    ]


def _rules_options() -> list[click.Option]:
    return [
        click.Option(
            ["--rules", "rules_file"],
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Selection rules (TOML) deciding which files are screened; the others get a skipped row naming the rule "
            "('ichscan rules show' prints the default to start from).  [default: the built-in rules for axial head CT]",
        ),
        click.Option(["--no-rules"], is_flag=True, default=False, help="No selection rules: screen every CT image."),
    ]


def selection_rules(rules_file: Path | None, no_rules: bool) -> Any:
    """The :class:`ichscan.rules.SelectionRules` of ``--rules``/``--no-rules`` (``None``: none);
    a bad file is a one-line usage error."""
    from ichscan.rules import DEFAULT_RULES, RulesError, load_rules

    if no_rules and rules_file is not None:
        raise click.UsageError("--rules and --no-rules exclude each other")
    if no_rules:
        return None
    if rules_file is None:
        return DEFAULT_RULES
    try:
        return load_rules(rules_file)
    except RulesError as exc:
        raise click.BadParameter(str(exc), param_hint="--rules") from None


def _metrics_options() -> list[click.Option]:
    return [
        click.Option(
            ["--metrics-port"],
            type=click.IntRange(0, 65535),
            default=None,
            help="Serve Prometheus metrics at /metrics, and /healthz and /readyz, on this HTTP port (0: a free one, logged).  [default: off]",
        ),
        click.Option(
            ["--metrics-bind"],
            default="127.0.0.1",
            help="Address the metrics port listens on (0.0.0.0 for every interface; the endpoints have no authentication).",
        ),
    ]


def screening_options(
    *, out_help: str, state_help: str, calling_ae: bool = True, live: bool = False, metrics: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options every screening command shares, passed to it as one ``settings`` argument.

    Output (--out, --studies-out, --overlays, --overlays-for), results (--html,
    --dicom-out, --sr-template, --forward, --forward-token-file, --forward-wait, --notify,
    --notify-on, --notify-secret-file, --notify-token-file, --fhir-out, --fhir-forward,
    --fhir-token-file and, unless ``calling_ae`` is False,
    --calling-ae: ``serve-scp`` sends as its own --ae-title), --state, the model
    (--weights, --model, --threshold, --device, --batch-size, --workers, --threads,
    --saliency), the selection rules (--rules, --no-rules: ``settings["rules"]``) and,
    with ``live``, --max-latency, --study-timeout and --series-timeout; with ``metrics``,
    --metrics-port and --metrics-bind.

    ``settings`` maps the options object's field names to the values; the result options
    arrive together as ``settings["results"]``, an :class:`ichscan.reporting.ResultsOutput`.
    """
    results = _results_options(calling_ae)
    rules = _rules_options()
    options = [*_output_options(out_help), *results, _state_option(state_help), *_model_options(), *rules]
    if live:
        options.extend(_live_options())
    if metrics:
        options.extend(_metrics_options())
    result_names = {option.name for option in results}
    names = {option.name for option in options} - {option.name for option in rules}

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from ichscan.reporting import ResultsOutput

            settings: ScreeningSettings = {name: kwargs.pop(name) for name in names - result_names}
            token_file = kwargs.pop("forward_token_file")
            notify_files = kwargs.pop("notify_secret_file"), kwargs.pop("notify_token_file")
            fhir_token_file = kwargs.pop("fhir_token_file")
            files = {"forward_token_file", "notify_secret_file", "notify_token_file", "fhir_token_file"}
            chosen = {name: kwargs.pop(name) for name in result_names - files}
            chosen["forward"] = with_token(chosen["forward"], token_file)
            chosen["notify"] = with_notify_credentials(chosen["notify"], *notify_files)
            chosen["fhir_forward"] = with_notify_credentials(chosen["fhir_forward"], None, fhir_token_file, "--fhir-forward")
            settings["results"] = ResultsOutput(**chosen)
            settings["rules"] = selection_rules(kwargs.pop("rules_file"), kwargs.pop("no_rules"))
            return f(*args, settings=settings, **kwargs)

        return with_options(*options)(wrapper)

    return decorate
