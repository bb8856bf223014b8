"""Many uncompressed 512x512 phantom slices, fast: a few unique ones, copied with fresh UIDs.

    python benchmarks/make_phantoms.py OUT --files N [--unique 320] [--jobs J] [--reuse] [--link DIR:M ...]

:func:`ichscan.synth.generate` renders about 30 slices/s on one core, too slow for the
20,000-file GPU benchmark. This renders ``--unique`` slices (studies of 20, in parallel),
then writes ``N`` files as copies of them in which the Study, Series and SOP Instance UIDs
are replaced by fresh UIDs of the same length, byte for byte (so the copy stays a valid
file and every file is a distinct instance in a distinct study). Decoding cost does not
depend on the pixel values, so throughput figures are those of N unique files; the
model's outputs simply repeat.

Writes ``OUT/.complete`` at the end (the marker ``benchmarks/_common.phantoms`` checks),
so ``OUT = .bench/explicit512_<N>`` is reused by the benchmark scripts as their cache.
``--reuse`` keeps an ``OUT`` that is complete with N files. ``--link DIR:M`` also fills
``DIR`` (with its marker) with hard links to the first M files, unless it is complete.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SLICES = 20
#: Digits of the last UID component replaced by the copy number.
COPY_DIGITS = 8


def _render(job: tuple[Path, int, int]) -> None:
    from ichscan.synth import generate

    folder, studies, seed = job
    generate(folder, studies=studies, slices=SLICES, seed=seed, size=512, transfer_syntaxes=["ExplicitVRLittleEndian"])


def _templates(folder: Path) -> list[tuple[bytes, list[bytes]]]:
    """Each rendered file's bytes and the UIDs to replace in it (study, series, instance)."""
    import pydicom

    out = []
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
        for uid in uids:
            if len(uid.rsplit(".", 1)[-1]) <= COPY_DIGITS:
                raise SystemExit(f"{path}: UID {uid} has too short a last component to number copies")
        out.append((path.read_bytes(), [uid.encode() for uid in uids]))
    return out


_TEMPLATES: list[tuple[bytes, list[bytes]]] = []


def _write_copies(job: tuple[Path, int, int]) -> int:
    out, first, last = job
    per_copy = len(_TEMPLATES)
    for n in range(first, last):
        copy, index = divmod(n, per_copy)
        data, uids = _TEMPLATES[index]
        tag = f"{copy:0{COPY_DIGITS}d}".encode()
        for uid in uids:
            data = data.replace(uid, uid[:-COPY_DIGITS] + tag)
        folder = out / f"{copy:05d}"
        folder.mkdir(exist_ok=True)
        (folder / f"{index:04d}.dcm").write_bytes(data)
    return last - first


def make(out: Path, files: int, unique: int, jobs: int) -> float:
    """Write ``files`` phantoms under ``out``; returns the seconds it took."""
    global _TEMPLATES
    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    studies = max(1, -(-min(unique, files) // SLICES))
    ctx = multiprocessing.get_context("fork")  # no torch in this process: forking is safe
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        render_jobs = [(Path(tmp) / f"s{i}", 1, 1000 + i) for i in range(studies)]
        with ctx.Pool(min(jobs, studies)) as pool:
            pool.map(_render, render_jobs)
        _TEMPLATES = _templates(Path(tmp))
    step = max(1, -(-files // (jobs * 4)))
    copy_jobs = [(out, a, min(files, a + step)) for a in range(0, files, step)]
    with ctx.Pool(jobs) as pool:
        written = sum(pool.map(_write_copies, copy_jobs))
    assert written == files
    (out / ".complete").write_text("ok\n")
    return time.perf_counter() - start


def complete(folder: Path, files: int) -> bool:
    return (folder / ".complete").exists() and sum(1 for _ in folder.rglob("*.dcm")) == files


def link_subset(source: Path, dest: Path, count: int) -> None:
    """``dest`` holds hard links to the first ``count`` files of ``source`` (copies if linking fails)."""
    if dest.exists():
        shutil.rmtree(dest)
    files = sorted(p for p in source.rglob("*.dcm"))[:count]
    for path in files:
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
    (dest / ".complete").write_text("ok\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--files", type=int, required=True)
    parser.add_argument("--unique", type=int, default=320, help="slices rendered (default 320, 16 studies)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reuse", action="store_true", help="keep OUT if it is complete with N files")
    parser.add_argument("--link", action="append", default=[], metavar="DIR:M", help="also fill DIR with links to M files")
    args = parser.parse_args(argv)
    if args.files <= 0 or args.unique <= 0:
        parser.error("--files and --unique must be positive")
    links = []
    for spec in args.link:
        folder, _, count = spec.rpartition(":")
        if not folder or not count.isdigit() or not 0 < int(count) <= args.files:
            parser.error(f"--link {spec!r}: expected DIR:M with 0 < M <= {args.files}")
        links.append((Path(folder), int(count)))
    if args.reuse and complete(args.out, args.files):
        print(f"phantoms: reusing {args.files} files in {args.out}", flush=True)
    else:
        seconds = make(args.out, args.files, args.unique, max(1, args.jobs))
        print(f"phantoms: {args.files} files ({min(args.unique, args.files)} unique slices) in {args.out} in {seconds:.1f} s", flush=True)
    for folder, count in links:
        if not (args.reuse and complete(folder, count)):
            link_subset(args.out, folder, count)
            print(f"phantoms: {folder} links the first {count}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
