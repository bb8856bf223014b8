"""The folder walk `ichscan batch` screens: unreadable folders, folder links, our own
outputs inside the input, and output paths that must not be written over."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from helpers import run_ichscan
from ichscan.pipeline import BatchOptions, run_batch
from ichscan.sources.folder import Outputs, iter_folder
from ichscan.sources.manifest import ManifestSource
from ichscan.synth import generate



def rel(root: Path, entries) -> dict[str, str]:
    return {os.path.relpath(e.path, root): e.refusal for e in entries}


def test_unreadable_folder_gets_a_refusal_row(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "locked").mkdir()
    (root / "ok" / "a.dcm").write_bytes(b"x")
    (root / "locked" / "b.dcm").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path="."):  # root may read any folder: deny one as chmod 000 would
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert rel(root, iter_folder(root)) == {
        "ok/a.dcm": "",
        "locked": "cannot read folder: Permission denied",
    }


def test_folder_link_inside_the_input_is_not_screened_twice(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.dcm").write_bytes(b"x")
    (root / "alias").symlink_to(root / "sub")  # sorts before sub: would be walked first
    (root / ".archive" / "old").mkdir(parents=True)
    (root / ".archive" / "old" / "c.dcm").write_bytes(b"x")
    (root / "old").symlink_to(root / ".archive" / "old")  # a hidden target is reached only by its link
    (root / "broken.dcm").symlink_to(root / "gone.dcm")
    assert rel(root, iter_folder(root)) == {
        "sub/a.dcm": "",
        "old/c.dcm": "",
        "broken.dcm": "broken symbolic link (its target does not exist)",
    }


def test_outputs_inside_the_folder_are_left_out(tmp_path):
    root = tmp_path / "root"
    (root / "overlays").mkdir(parents=True)
    (root / "a.dcm").write_bytes(b"x")
    (root / "results.csv").write_text("path\n")
    (root / "overlays" / "x.png").write_bytes(b"x")
    outputs = Outputs([root / "results.csv"], [root / "overlays"])
    assert rel(root, iter_folder(root, outputs)) == {"a.dcm": ""}
    assert rel(root, iter_folder(root)) == {"a.dcm": "", "results.csv": "", "overlays/x.png": ""}


def test_batch_with_outputs_inside_its_folder_screens_only_the_images(tmp_path):
    """Run twice with every output inside the input folder: the second run must not
    screen the first run's CSVs, HTML, overlays, SRs or state."""
    root = tmp_path / "in"
    records = generate(root, studies=1, slices=3, seed=5, size=64)
    opts = BatchOptions(
        input_dir=root, out=root / "results.csv", overlays_for="all", workers=0, progress=False,
    )
    from ichscan.reporting import ResultsOutput

    opts.results = ResultsOutput(html=root / "report.html", dicom_out=root / "sr")
    for _ in range(2):
        summary = run_batch(opts)
        assert summary.files == len(records)
    with open(root / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(r.sop_instance_uid for r in records)
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("target", ["dicom", "fifo"])
def test_output_that_must_not_be_written_over_is_a_one_line_error(tmp_path, target):
    root = tmp_path / "in"
    generate(root, studies=1, slices=2, seed=6, size=64)
    if target == "dicom":
        victim = next(root.rglob("*.dcm"))
        before = victim.read_bytes()
        args = ["--out", str(victim)]
    else:
        victim = tmp_path / "pipe"
        os.mkfifo(victim)
        args = ["--out", str(tmp_path / "r.csv"), "--studies-out", str(victim)]
    proc = run_ichscan("batch", str(root), *args, "--workers", "0", "--no-progress")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    if target == "dicom":
        assert "is a DICOM file; refusing to overwrite it" in errors[0]
        assert victim.read_bytes() == before
    else:
        assert "not a regular file" in errors[0]
        assert not victim.is_file()  # still the pipe


def test_manifest_lists_paths_and_file_uris_once(tmp_path):
    (tmp_path / "scans").mkdir()
    for name in ("a.dcm", "b c.dcm", "out.csv"):
        (tmp_path / "scans" / name).write_bytes(b"x")
    manifest = tmp_path / "list.txt"
    manifest.write_text(
        "# one path or file:// URI a line\n"
        "scans/a.dcm\n"
        f"{(tmp_path / 'scans' / 'b c.dcm').as_uri()}\n"
        f"{tmp_path / 'scans' / 'a.dcm'}\n"
        "\n"
        "scans/out.csv\n"
        "http://example.org/x.dcm\n"
    )
    entries = list(ManifestSource(manifest).walk(Outputs([tmp_path / "scans" / "out.csv"])))
    assert [(e.path, bool(e.refusal)) for e in entries] == [
        (str(tmp_path / "scans" / "a.dcm"), False),
        (str(tmp_path / "scans" / "b c.dcm"), False),
        ("http://example.org/x.dcm", True),
    ]
    assert "unsupported URI scheme" in entries[2].refusal
