"""Build the fuzzers' seed corpora into a folder (not checked in: several MB, rebuilt at will).

``python benchmarks/fuzz/seeds.py OUT`` writes ``OUT/<harness>/`` for every harness:

- ``decode``: pydicom's test files and pydicom-data's (both listed by
  ``pydicom.data.get_testdata_files()``, never downloaded), up to 64 KiB each, plus 64 x 64
  phantoms from ``ichscan.synth.generate`` in each transfer syntax it writes;
- ``cstore``: the same files as the C-STORE handler gets them: one byte choosing the
  presentation context's transfer syntax, then the data set as sent (no file meta);
- ``stow``: STOW-RS bodies built with the tests' ``multipart`` helper (one part, two parts,
  chunked, a fuzzed Content-Type), after the harness's one-byte mode;
- ``rules``: ``ichscan rules show`` and variants;
- ``labels``: the ``stage_2_train.csv`` of a small phantom set, and variants.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pydicom
import pydicom.data

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import RELATED, multipart  # noqa: E402 - the tests' STOW-RS body builder
from _common import CHUNKED, CONTENT_TYPE, STUDY_URL, accepted_syntaxes  # noqa: E402 - the harnesses' input layouts

from ichscan.synth import TRANSFER_SYNTAXES, generate  # noqa: E402

MAX_SEED = 64 * 1024


def put(folder: Path, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


def dicom_seeds(work: Path) -> list[bytes]:
    files = [Path(p) for p in pydicom.data.get_testdata_files() if os.path.isfile(p) and os.path.getsize(p) <= MAX_SEED]
    phantoms = work / "phantoms"
    for index, syntax in enumerate(TRANSFER_SYNTAXES):
        generate(phantoms / str(index), studies=1, slices=2, seed=index, size=64, transfer_syntaxes=[syntax])
    files += sorted(phantoms.rglob("*.dcm"))
    return [p.read_bytes() for p in files]


def cstore_seed(data: bytes, syntaxes: list[str]) -> bytes | None:
    """``data`` (a DICOM file) as a C-STORE carries it: transfer syntax index + data set."""
    fp = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.filereader.read_preamble(fp, False)
            meta = pydicom.filereader._read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - not a file with file meta: no C-STORE seed
        return None
    syntax = str(meta.get("TransferSyntaxUID", ""))
    if syntax not in syntaxes:
        return None
    return bytes([syntaxes.index(syntax)]) + data[fp.tell() :]


def chunked(body: bytes, size: int = 4096) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def stow_seeds(work: Path) -> list[bytes]:
    phantoms = work / "stow"
    generate(phantoms, studies=1, slices=2, seed=7, size=64, transfer_syntaxes=["ExplicitVRLittleEndian"])
    one, two = sorted(p.read_bytes() for p in phantoms.rglob("*.dcm"))
    study = str(pydicom.dcmread(io.BytesIO(one)).StudyInstanceUID).encode()
    return [
        bytes([0]) + multipart(one),
        bytes([0]) + multipart(one, two),
        bytes([0]) + multipart(b"not dicom"),
        bytes([0]) + multipart(one, part_type="application/octet-stream"),
        bytes([CHUNKED]) + chunked(multipart(one, two)),
        bytes([CONTENT_TYPE]) + RELATED.encode() + b"\n" + multipart(one),
        bytes([CONTENT_TYPE]) + b'multipart/related; type="application/dicom"; boundary="ICHSCANBOUNDARY"; start=x\n' + multipart(two),
        bytes([STUDY_URL]) + study + b"\n" + multipart(one),
    ]


def rules_seeds() -> list[bytes]:
    shown = subprocess.run([sys.executable, "-m", "ichscan", "rules", "show"], check=True, capture_output=True).stdout
    return [
        shown,
        b"",
        b"[largest-series]\nenabled = true\n",
        b"[modality]\nmodalities = ['CT', 'PT']\n[derived]\nenabled = false\n",
        b"[body-part]\nfields = ['SeriesDescription']\nhead = 'kopf|head'\nrequire_head = true\n"
        b"[slice-thickness]\nmin_mm = 0.5\nmax_mm = 10\n[orientation]\nmax_degrees = 20.5\n",
        b'[image-type]\nexclude = ["LOCALIZER", "SCOUT"]\n[body-part]\nother = "(?<![a-z])chest\\\\b"\n',
    ]


def labels_seeds(work: Path) -> list[bytes]:
    generate(work / "rsna", studies=1, slices=3, seed=3, size=64, layout="rsna")
    csv = (work / "rsna" / "stage_2_train.csv").read_bytes()
    lines = csv.splitlines(keepends=True)
    return [
        csv,
        b"\xef\xbb\xbf" + csv.replace(b"\n", b"\r\n"),  # a BOM and CRLF, as Excel writes it
        csv + b"".join(lines[1:3]),  # duplicate rows
        lines[0] + b'"ID_abc_any",1\n"ID_abc_epidural",0\n',
    ]


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = dicom_seeds(work)
        syntaxes = accepted_syntaxes()
        for data in files:
            put(out / "decode", data)
            seed = cstore_seed(data, syntaxes)
            if seed is not None:
                put(out / "cstore", seed)
        for data in stow_seeds(work):
            put(out / "stow", data)
        for data in labels_seeds(work):
            put(out / "labels", data)
    for data in rules_seeds():
        put(out / "rules", data)
    for harness in sorted(os.listdir(out)):
        print(f"{harness}: {len(os.listdir(out / harness))} seeds")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: seeds.py OUT_DIR")
    main(Path(sys.argv[1]))
