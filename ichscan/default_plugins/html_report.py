"""Built-in reporter: one self-contained static HTML report (``--html report.html``).

The report lists the studies sorted by their ``any`` probability, with the per-label
study maxima, slice counts and thumbnails of the overlays of the most suspicious
positive slices. Everything is in one file (inline CSS, thumbnails as ``data:`` URIs),
so it opens from the file system with no server; overlay PNGs written by the run are
linked with paths relative to the report's folder.

Privacy: the report names studies by UID and slices by UID and instance number; file
paths appear only for files that could not be screened (they have no UIDs), relative
to the input folder. Nothing from the DICOM patient module is read or shown.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ichscan import __version__, hookimpl
from ichscan.durable import replacing
from ichscan.imaging import brain_window_image
from ichscan.labels import LABELS, SUBTYPES
from ichscan.state.ledger import printable
from ichscan.overlay import render_overlay
from ichscan.records import NO_STUDY_UID, Status
from ichscan.reporting import Reporter, RunConfig, RunSummary, SliceResult, StudySummary, StudyTable

log = logging.getLogger(__name__)

#: The key :class:`ichscan.reporting.StudyTable` files slices without a study UID under.
#: Longest side of a thumbnail in pixels.
THUMBNAIL_SIZE = 160
#: How many linked overlay PNGs the page's script probes on load: each probe reads a
#: whole PNG, so a report with thousands of links would otherwise open slowly.
OVERLAY_CHECK_LIMIT = 100


@dataclass
class Thumbnail:
    """A small JPEG of one positive slice's overlay, ready to embed."""

    p_any: float
    sop_instance_uid: str
    instance_number: int | None
    data_uri: str
    link: str  # href of the overlay PNG relative to the report, or "" when none was written


@dataclass
class NotScreened:
    """A file that got no probabilities (``skipped`` or ``error``), for the report's list."""

    status: str
    path: str
    reason: str


def diagnostic_warning(config: RunConfig) -> str | None:
    """The banner text for weights whose output must not guide care, or ``None``."""
    if not config.trained:
        return "Not for diagnostic use: this run used an UNTRAINED model; its probabilities are meaningless."
    if config.bundled_weights:
        return "Not for diagnostic use: this run used the bundled demo weights, trained on synthetic phantoms only."
    return None


def relative_href(target: str | os.PathLike[str], base_dir: Path) -> str:
    """A URL for ``target`` that resolves from a page in ``base_dir`` opened as a file.

    Relative when possible, so the report and its overlay folder can be moved
    together; an absolute ``file:`` URI when no relative path exists (another drive).
    """
    target_abs = Path(target).resolve()
    try:
        rel = os.path.relpath(target_abs, base_dir.resolve())
    except ValueError:
        return target_abs.as_uri()
    # Quoted from the file-system bytes: a name that is not UTF-8 keeps its bytes.
    return urllib.parse.quote(os.fsencode(Path(rel).as_posix()), safe="/")


def display_path(path: str, root: Path | None) -> str:
    """``path`` relative to the input folder when it lies below it, else unchanged."""
    if root is not None:
        for candidate, base in ((Path(path), root), (Path(path).resolve(), root.resolve())):
            try:
                return candidate.relative_to(base).as_posix()
            except ValueError:
                continue
    return path


def thumbnail_image(result: SliceResult) -> Image.Image | None:
    """The overlay of ``result`` (as ``--overlays`` draws it) shrunk to a thumbnail."""
    if result.display is not None:
        image = result.display
    elif result.pixels is not None:
        image = brain_window_image(result.pixels, result.slope, result.intercept)
    else:
        return None
    rendered = render_overlay(image, result)
    rendered.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.BILINEAR)
    return rendered


def jpeg_data_uri(image: Image.Image, quality: int = 80) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# Counts the images that failed to load (and probes linked overlay PNGs), writes the
# counts into data- attributes on <body> for tests and scripts, and shows a warning.
_CHECK_SCRIPT = """
(function () {
  "use strict";
  var body = document.body;
  function warn(text) {
    var box = document.getElementById("image-warning");
    box.textContent = text;
    box.hidden = false;
  }
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function (img) { return img.complete && img.naturalWidth === 0; });
    body.setAttribute("data-images", String(images.length));
    body.setAttribute("data-images-broken", String(broken.length));
    var links = Array.prototype.slice.call(document.querySelectorAll("a[data-overlay]"));
    var probed = links.slice(0, %(limit)d);
    var pending = probed.length, missing = 0;
    body.setAttribute("data-overlays", String(links.length));
    body.setAttribute("data-overlays-checked", String(probed.length));
    function done() {
      body.setAttribute("data-overlays-broken", String(missing));
      body.setAttribute("data-check", "done");
      var problems = [];
      if (broken.length) { problems.push(broken.length + " thumbnail(s) did not load"); }
      if (missing) { problems.push(missing + " linked overlay image(s) are missing (moved or deleted?)"); }
      if (problems.length) { warn("Warning: " + problems.join("; ") + "."); }
    }
    if (!pending) { done(); return; }
    probed.forEach(function (link) {
      var probe = new Image();
      probe.onload = function () { if (--pending === 0) { done(); } };
      probe.onerror = function () {
        missing += 1;
        link.classList.add("missing");
        if (--pending === 0) { done(); }
      };
      probe.src = link.href;
    });
  });
})();
""" % {"limit": OVERLAY_CHECK_LIMIT}
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_CHECK_SCRIPT.encode("utf-8")).digest()).decode("ascii")
# Only our own script may run, even if escaping were ever missed somewhere.
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data: file:; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
.banner { background: #b00020; color: #fff; font-weight: bold; padding: .6em 1em; margin: 0 0 1em; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: .5em 1em; }
.meta { border-collapse: collapse; margin-bottom: 1em; }
.meta th { text-align: left; padding: .1em 1em .1em 0; font-weight: 600; }
table.studies { border-collapse: collapse; width: 100%; }
table.studies th, table.studies td { border-bottom: 1px solid #ddd; padding: .3em .5em; vertical-align: top; }
table.studies th { background: #f4f4f4; position: sticky; top: 0; text-align: left; }
td.p { text-align: right; font-variant-numeric: tabular-nums; }
td.pos { background: #fbd5d5; color: #8a0000; font-weight: bold; }
tr.negative td.uid { color: #666; }
.uid { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
.thumbs { display: flex; flex-wrap: wrap; gap: 4px; min-width: 226px; }
.thumbs img { height: 72px; border: 1px solid #888; display: block; }
.thumbs a.missing img { outline: 3px dashed #e0b000; }
footer { margin-top: 2em; color: #666; font-size: 12px; }
"""


class HtmlReporter(Reporter):
    """Keeps ``--html`` current: a static, self-contained report of the run.

    Parameters
    ----------
    path
        The report file; rewritten atomically (temporary file + rename).
    config
        The run's settings (model, weights, thresholds, input folder).
    thumbnails_per_study
        Keep the overlays of at most this many positive slices per study (those with the
        highest ``any`` probability).
    max_thumbnail_studies
        Keep thumbnails for at most this many studies (those with the highest ``any``
        probability), so memory and the file stay bounded on long runs.
    max_not_screened
        List at most this many skipped or failed files; the rest are counted.

    Raises
    ------
    OSError
        When the report cannot be written: a first, empty report is written at once so
        that an unwritable path stops the run before it starts.
    """

    name = "html"
    #: Rewrite the report at most this often during a run (always at the end).
    write_interval_s = 5.0

    def __init__(
        self,
        path: Path,
        config: RunConfig,
        *,
        thumbnails_per_study: int = 6,
        max_thumbnail_studies: int = 1000,
        max_not_screened: int = 200,
    ):
        self.path = Path(path)
        self.config = config
        self.thumbnails_per_study = max(0, thumbnails_per_study)
        self.max_thumbnail_studies = max(0, max_thumbnail_studies)
        self.max_not_screened = max(0, max_not_screened)
        self.thumbnails: dict[str, list[Thumbnail]] = {}
        self.not_screened: list[NotScreened] = []
        self.counts = RunSummary()
        self.started = dt.datetime.now().astimezone()
        self.warning = diagnostic_warning(config)
        self._last_write = time.monotonic()
        self._dirty = False
        self._write_seconds = 0.0
        self.write(StudyTable(config.thresholds), None)

    # -- Reporter ------------------------------------------------------------------

    def on_results(self, results: list[SliceResult], studies: StudyTable) -> None:
        self.counts.count(results)
        for result in results:
            if result.status != Status.OK or result.probabilities is None:
                if len(self.not_screened) < self.max_not_screened:
                    self.not_screened.append(
                        # Odd file-name bytes are escaped once, when the page is rendered.
                        NotScreened(result.status, display_path(result.path, self.config.input_root), result.error)
                    )
            elif result.is_positive:
                self._keep_thumbnail(result)
        self._limit_thumbnail_studies(studies)
        self._dirty = True
        self._write_if_due(studies)

    def on_study_complete(self, uids: list[str], studies: StudyTable) -> None:
        self._dirty = True
        self._write_if_due(studies)

    def on_finish(self, summary: RunSummary, studies: StudyTable) -> None:
        self.write(studies, summary)

    # -- thumbnails -------------------------------------------------------------------

    def _keep_thumbnail(self, result: SliceResult) -> None:
        assert result.probabilities is not None
        if not self.thumbnails_per_study or not self.max_thumbnail_studies:
            return
        uid = result.study_instance_uid or NO_STUDY_UID
        kept = self.thumbnails.setdefault(uid, [])
        p_any = result.probabilities["any"]
        # Rendering costs milliseconds: skip slices that would not make the top k.
        if len(kept) >= self.thumbnails_per_study and p_any <= kept[-1].p_any:
            return
        image = thumbnail_image(result)
        if image is None:
            return
        link = ""
        if result.overlay:
            link = relative_href(result.overlay, self.path.parent)
        kept.append(Thumbnail(p_any, result.sop_instance_uid, result.instance_number, jpeg_data_uri(image), link))
        kept.sort(key=lambda t: -t.p_any)  # stable: ties keep arrival order
        del kept[self.thumbnails_per_study :]

    def _limit_thumbnail_studies(self, studies: StudyTable) -> None:
        excess = len(self.thumbnails) - self.max_thumbnail_studies
        if excess <= 0:
            return

        def p_any(uid: str) -> float:
            study = studies.studies.get(uid)
            return study.max_probabilities["any"] if study else 0.0

        for uid in sorted(self.thumbnails, key=p_any)[:excess]:
            del self.thumbnails[uid]

    # -- writing --------------------------------------------------------------------

    def _write_if_due(self, studies: StudyTable) -> None:
        now = time.monotonic()
        # A report of many studies takes a while to build: wait at least 20 times as long
        # as the last write took, so rewriting never costs more than ~5 % of the run.
        interval = max(self.write_interval_s, 20.0 * self._write_seconds)
        if self._dirty and now - self._last_write >= interval:
            self.write(studies, None)

    def write(self, studies: StudyTable, summary: RunSummary | None) -> None:
        """Rewrite the report atomically; ``summary`` is the final one, ``None`` mid-run."""
        start = time.monotonic()
        text = self.render(studies, summary)
        with replacing(self.path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        self._last_write, self._dirty = time.monotonic(), False
        self._write_seconds = self._last_write - start

    def render(self, studies: StudyTable, summary: RunSummary | None) -> str:
        """The whole page as text."""
        e = html.escape
        config = self.config
        thresholds = studies.thresholds or config.thresholds
        ordered = sorted(
            studies.studies.values(), key=lambda s: (-s.max_probabilities["any"], s.study_instance_uid)
        )
        counts = summary if summary is not None else self.counts
        now = dt.datetime.now().astimezone()
        state = "in progress"
        if summary is not None:
            state = "interrupted" if summary.interrupted else "complete"
        positive_studies = sum(1 for s in ordered if _is_positive(s, thresholds, "any"))

        out: list[str] = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{e(_CSP)}">',
            '<meta name="referrer" content="no-referrer">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
        ]
        if summary is None:
            # A run still going (ichscan watch): an open page picks up the next rewrite.
            out.append('<meta http-equiv="refresh" content="30">')
        out += [
            f"<title>ichscan report ({e(state)})</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            f'<body data-state="{e(state)}">',
        ]
        if self.warning:
            out.append(f'<div class="banner" role="alert">{e(self.warning)}</div>')
        out.append('<p id="image-warning" class="warning" role="alert" hidden></p>')
        out.append("<h1>ichscan: intracranial hemorrhage screening</h1>")
        meta = [
            ("Run", f"{state}; started {self.started:%Y-%m-%d %H:%M:%S %z}, report written {now:%Y-%m-%d %H:%M:%S %z}"),
            ("Model", config.model_name or "?"),
            ("Weights", config.weights or "?"),
            ("Thresholds", ", ".join(f"{label} {thresholds[label]:.3f}" for label in LABELS if label in thresholds)),
            (
                "Files",
                f"{counts.files} files: {counts.ok} ok, {counts.skipped} skipped, {counts.error} error; "
                f"{counts.positive} positive slices",
            ),
            ("Studies", f"{len(ordered)} studies, {positive_studies} positive"),
        ]
        if summary is not None:
            meta.append(("Time", f"{summary.seconds:.1f} s"))
            if summary.reporter_errors:
                failed = ", ".join(f"{name} ({n})" for name, n in sorted(summary.reporter_errors.items()))
                meta.append(("Reporter errors", failed))
        out.append('<table class="meta">')
        out += [f"<tr><th>{e(key)}</th><td>{e(value)}</td></tr>" for key, value in meta]
        out.append("</table>")

        out.append('<table class="studies">')
        header = ["#", "Study Instance UID", "any", *SUBTYPES, "Top finding", "Slices", "Positive slices", "Top positive slices"]
        out.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead>")
        out.append("<tbody>")
        for rank, study in enumerate(ordered, start=1):
            out.append(self._study_row(rank, study, thresholds))
        out.append("</tbody></table>")
        if not ordered:
            out.append("<p>No studies screened yet.</p>")
        if self.thumbnails and len(self.thumbnails) >= self.max_thumbnail_studies:
            out.append(f"<p>Thumbnails are kept for the {self.max_thumbnail_studies} studies with the highest p(any) only.</p>")

        not_screened = counts.skipped + counts.error
        if not_screened:
            out.append(f"<h2>Files not screened ({not_screened})</h2>")
            out.append('<table class="studies not-screened"><thead><tr><th>Status</th><th>File</th><th>Reason</th></tr></thead><tbody>')
            for item in self.not_screened:
                out.append(
                    f'<tr class="{e(item.status)}"><td>{e(item.status)}</td>'
                    f'<td class="path">{e(item.path)}</td><td>{e(item.reason)}</td></tr>'
                )
            out.append("</tbody></table>")
            if not_screened > len(self.not_screened):
                out.append(f"<p>{not_screened - len(self.not_screened)} more are listed in the results CSV only.</p>")

        out.append(
            f"<footer>ichscan {e(__version__)}. Screening aid output, not a diagnosis. "
            "Probabilities are per-study maxima over slices; highlighted values reach the label's threshold.</footer>"
        )
        out.append(f"<script>{_CHECK_SCRIPT}</script>")
        out.append("</body></html>")
        # Valid UTF-8 throughout: file-name bytes that are not UTF-8 (surrogates), in a
        # path, weights file or message, shown as backslash escapes (bad\xff.dcm).
        return printable("\n".join(out) + "\n")

    def _study_row(self, rank: int, study: StudySummary, thresholds: dict[str, float]) -> str:
        e = html.escape
        probs = study.max_probabilities
        positive = _is_positive(study, thresholds, "any")
        cells = [
            f"<td>{rank}</td>",
            f'<td class="uid">{e(study.study_instance_uid)}</td>',
        ]
        for label in ("any", *SUBTYPES):
            klass = "p pos" if _is_positive(study, thresholds, label) else "p"
            cells.append(f'<td class="{klass}" data-label="{label}">{probs[label]:.3f}</td>')
        top = f"{e(study.top_label)} ({study.top_probability:.3f})"
        cells.append(f'<td class="top">{top}</td>')
        cells.append(f'<td class="slices">{study.slices}</td>')
        cells.append(f'<td class="positive-slices">{study.positive_slices}</td>')
        cells.append(f'<td class="thumbs-cell">{self._thumbnails_html(study.study_instance_uid)}</td>')
        return (
            f'<tr class="study {"positive" if positive else "negative"}" '
            f'data-uid="{e(study.study_instance_uid)}" data-p-any="{probs["any"]:.6f}">' + "".join(cells) + "</tr>"
        )

    def _thumbnails_html(self, uid: str) -> str:
        e = html.escape
        thumbs = self.thumbnails.get(uid)
        if not thumbs:
            return ""
        parts = ['<div class="thumbs">']
        for thumb in thumbs:
            instance = "?" if thumb.instance_number is None else str(thumb.instance_number)
            title = f"instance {instance}, p(any) {thumb.p_any:.3f}, SOP Instance UID {thumb.sop_instance_uid}"
            img = f'<img src="{thumb.data_uri}" alt="{e(f"overlay of instance {instance}")}" title="{e(title)}">'
            if thumb.link:
                parts.append(f'<a href="{e(thumb.link)}" data-overlay="1">{img}</a>')
            else:
                parts.append(img)
        parts.append("</div>")
        return "".join(parts)


def _is_positive(study: StudySummary, thresholds: dict[str, float], label: str) -> bool:
    return label in thresholds and study.max_probabilities[label] >= thresholds[label]


@hookimpl
def ichscan_register_reporters(register, config: RunConfig):
    if config.html is not None:
        register(HtmlReporter(config.html, config))
