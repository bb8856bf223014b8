"""Tests for ichscan.dicom: safe decoding of real, compressed and hostile files.

Real files come from pydicom's bundled test files and the pydicom-data package (listed
from disk by conftest.py, never downloaded); hostile files are written here into tmp_path.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from conftest import bundled_id, list_bundled_dicom_files
from helpers import CT_SMALL, TEST_FILES, save
from ichscan import dicom
from ichscan.dicom import ERROR, OK, SKIPPED, DecodedSlice, DecodeLimits, decode_instance, rsna_12bit_fix


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, for test UIDs

MB = 1024 * 1024

#: Bundled files that are broken on purpose (or need a decoder we do not ship): they must
#: end in ``error`` with a reason that contains the given text, not in a crash.
KNOWN_BROKEN = {
    "JPEG-lossy.dcm": "cannot decode pixel data",  # pydicom: needs GDCM
    "JPEG2000-embedded-sequence-delimiter.dcm": "cannot decode pixel data",  # every plugin fails
    "MR_truncated.dcm": "truncated",
    "bad_sequence.dcm": "invalid SOPInstanceUID",  # a hex digest where a UID belongs
    "rtplan_truncated.dcm": "truncated",  # not an image, but cut short: unreadable, not skipped
}

#: Transfer syntaxes whose decoded values may legitimately differ between decoders.
LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}

#: Every image transfer syntax we look for, and whether real files must cover it.
IMAGE_SYNTAXES = {
    ImplicitVRLittleEndian: True,
    ExplicitVRLittleEndian: True,
    ExplicitVRBigEndian: True,
    DeflatedExplicitVRLittleEndian: True,
    RLELossless: True,
    JPEGBaseline8Bit: True,
    JPEGExtended12Bit: False,
    JPEGLossless: False,
    JPEGLosslessSV1: True,
    JPEGLSLossless: True,
    JPEGLSNearLossless: False,
    JPEG2000Lossless: True,
    JPEG2000: True,
    HTJ2KLossless: False,
    HTJ2KLosslessRPCL: False,
    HTJ2K: False,
}
ALL_IMAGE_SYNTAXES = list(IMAGE_SYNTAXES)
REQUIRED_SYNTAXES = {ts for ts, required in IMAGE_SYNTAXES.items() if required}


# --------------------------------------------------------------------------- helpers


def assert_contract(r: DecodedSlice) -> None:
    """What every DecodedSlice promises, whatever the input."""
    assert r.status in (OK, SKIPPED, ERROR)
    if r.status == OK:
        assert r.pixels is not None and r.pixels.ndim == 2 and r.pixels.dtype.kind in "iu"
        assert r.error == ""
    else:
        assert r.pixels is None
        assert r.error.strip(), f"{r.status} without a reason"
        assert "\n" not in r.error and "\r" not in r.error
    for uid in (r.sop_instance_uid, r.study_instance_uid, r.series_instance_uid):
        assert uid == "" or dicom.is_valid_uid(uid)


@cache
def decoded_any(path: Path) -> DecodedSlice:
    """decode_instance(any_modality=True), once per file per session."""
    return decode_instance(path, any_modality=True)


@cache
def transfer_syntax(path: Path) -> UID:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    meta = getattr(ds, "file_meta", None)
    return UID((meta.get("TransferSyntaxUID") if meta is not None else None) or ImplicitVRLittleEndian)


def is_single_frame_greyscale(path: Path) -> bool:
    """Header-only check with pydicom (independent of ichscan): an image we must decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, defer_size=1024, force=True)
        except Exception:  # noqa: BLE001 - not DICOM at all
            return False
        if "PixelData" not in ds or "DirectoryRecordSequence" in ds:
            return False
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
            samples = int(ds.get("SamplesPerPixel") or 1)
            bits = int(ds.get("BitsAllocated") or 0)
        except (TypeError, ValueError):
            return False
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    return frames == 1 and samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2") and bits in (8, 16, 32)


@cache
def bundled_greyscale_files() -> tuple[Path, ...]:
    return tuple(p for p in list_bundled_dicom_files() if is_single_frame_greyscale(p))


@cache
def pydicom_pixels(path: Path) -> tuple[np.ndarray, float, float]:
    """pydicom's own pixel_array, slope and intercept for a file (the reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on odd but readable files
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    pixels.flags.writeable = False
    return pixels, float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def check_against_pydicom(path: Path, r: DecodedSlice, ts: UID) -> None:
    """Decoded values equal pydicom's own pixel_array (closely, for lossy syntaxes)."""
    expected, slope, intercept = pydicom_pixels(path)
    if r.rsna_fixed:
        expected = rsna_12bit_fix(expected)
    assert r.pixels.shape == expected.shape
    if ts in LOSSY:
        span = max(1.0, float(expected.max()) - float(expected.min()))
        assert np.abs(r.pixels.astype(np.float64) - expected).mean() <= 0.01 * span
    else:
        assert np.array_equal(r.pixels, expected), f"{path.name}: pixels differ from pydicom's ({ts.name})"
    if not r.rsna_fixed:
        np.testing.assert_allclose(r.hu(), expected * slope + intercept, rtol=1e-6, atol=1e-3)


def new_uid() -> str:
    return pydicom.uid.generate_uid(prefix=UID_ROOT)


def ct_dataset(
    stored: np.ndarray,
    *,
    ts: str = ExplicitVRLittleEndian,
    sop_class: str = CT_IMAGE,
    modality: str = "CT",
    bits_stored: int | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    **attrs: object,
) -> Dataset:
    """A minimal single-frame greyscale image data set (CT by default) with file meta."""
    stored = np.ascontiguousarray(stored)
    ds = with_file_meta(sop_class, ts, attrs.get("SOPInstanceUID", new_uid()))
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    little = UID(ts).is_little_endian
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<" if little else ">")).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def with_file_meta(sop_class: str, ts: str = ExplicitVRLittleEndian, sop_instance: str | None = None) -> Dataset:
    """An empty data set with the file meta of one instance (a new SOPInstanceUID unless given)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance or new_uid()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def meta_bytes(sop_class: str, ts: str, sop_instance: str | None = None) -> bytes:
    """Preamble, 'DICM' and a valid file meta group, written by pydicom."""
    buf = io.BytesIO()
    write_file_meta_info(buf, with_file_meta(sop_class, ts, sop_instance).file_meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue()


def hu_phantom(shape: tuple[int, int] = (64, 64), low: int = -1000, high: int = 3095, seed: int = 0) -> np.ndarray:
    """A deterministic HU image covering [low, high], both ends included."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(low, high + 1, size=shape, dtype=np.int32)
    hu.flat[:6] = [low, high, -1, 0, 3000, -999]
    return hu


def maxrss_growth_mb(path: Path) -> tuple[dict, float]:
    """Decode ``path`` in a fresh interpreter; return its result and the peak-RSS growth (MB).

    A fresh process: ru_maxrss is a high-water mark, so a big earlier test in this
    process could hide a blow-up.
    """
    code = textwrap.dedent(
        """
        import json, resource, sys
        from ichscan.dicom import decode_instance
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = decode_instance(sys.argv[1])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"status": r.status, "error": r.error, "growth_kb": after - before}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out, out["growth_kb"] / 1024  # Linux: ru_maxrss is in KiB


# --------------------------------------------------------------------------- 1. bundled files


def test_bundled_files_are_found(bundled_dicom_files):
    names = {p.name for p in bundled_dicom_files}
    assert "CT_small.dcm" in names
    assert len(bundled_dicom_files) > 100  # pydicom's test files (+ pydicom-data)


@pytest.mark.parametrize("any_modality", [False, True], ids=["ct-only", "any-modality"])
def test_every_bundled_file_gives_a_result(bundled_dicom_file, any_modality):
    r = decode_instance(bundled_dicom_file, any_modality=any_modality)
    assert_contract(r)
    if not any_modality and r.status == OK:
        assert pydicom.dcmread(bundled_dicom_file, stop_before_pixels=True).get("Modality", "CT") == "CT"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "greyscale_file" in metafunc.fixturenames:
        files = bundled_greyscale_files()
        ids = [f"{transfer_syntax(p).keyword or transfer_syntax(p)}-{bundled_id(p)}" for p in files]
        metafunc.parametrize("greyscale_file", files, ids=ids)


def test_bundled_single_frame_greyscale_image(greyscale_file):
    """With any_modality, every single-frame greyscale image decodes, equal to pydicom's."""
    path = greyscale_file
    r = decoded_any(path)
    assert_contract(r)
    if path.name in KNOWN_BROKEN:
        assert r.status == ERROR and KNOWN_BROKEN[path.name] in r.error, (r.status, r.error)
        return
    ts = transfer_syntax(path)
    assert r.status == OK, f"{ts.name}: {r.error}"
    check_against_pydicom(path, r, ts)


@pytest.mark.parametrize("name", sorted(KNOWN_BROKEN))
def test_known_broken_bundled_files_are_errors(name, bundled_dicom_files):
    matches = [p for p in bundled_dicom_files if p.name == name]
    if not matches:
        pytest.skip(f"{name} is not bundled with this pydicom")
    for path in matches:
        r = decoded_any(path)
        assert_contract(r)
        assert r.status == ERROR and KNOWN_BROKEN[name] in r.error, (r.status, r.error)


@pytest.fixture(scope="module")
def synthetic_by_syntax(tmp_path_factory) -> dict[UID, list[Path]]:
    """Greyscale files for syntaxes no bundled file has: JPEG baseline, encoded with Pillow."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("synthetic")
    yy, xx = np.mgrid[0:64, 0:64]
    image = ((xx * 3 + yy * 2) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, "JPEG", quality=95)
    ds = ct_dataset(image, ts=JPEGBaseline8Bit, intercept=-1024.0)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return {UID(JPEGBaseline8Bit): [save(ds, folder / "jpeg_baseline_ct.dcm")]}


@pytest.mark.parametrize("ts", ALL_IMAGE_SYNTAXES, ids=lambda ts: ts.keyword)
def test_transfer_syntax_is_decoded(ts, synthetic_by_syntax):
    bundled = [p for p in bundled_greyscale_files() if p.name not in KNOWN_BROKEN and transfer_syntax(p) == ts]
    synthetic = synthetic_by_syntax.get(ts, [])
    if not bundled + synthetic:
        if ts in REQUIRED_SYNTAXES:
            pytest.fail(f"no single-frame greyscale file in {ts.name} to test")
        pytest.skip(f"no single-frame greyscale {ts.name} file bundled here")
    for path in bundled + synthetic:
        r = decoded_any(path)
        assert r.status == OK, f"{path.name}: {r.error}"
        check_against_pydicom(path, r, ts)


def test_synthetic_jpeg_baseline_matches_pillow(synthetic_by_syntax):
    """Lossy: compare with an independent decoder (Pillow) rather than with pydicom only."""
    from PIL import Image

    (path,) = synthetic_by_syntax[UID(JPEGBaseline8Bit)]
    r = decode_instance(path)  # a CT: the screening path, not any_modality
    assert r.status == OK, r.error
    frame = next(pydicom.encaps.generate_fragmented_frames(pydicom.dcmread(path).PixelData))
    reference = np.asarray(Image.open(io.BytesIO(b"".join(frame))))
    assert np.abs(r.pixels.astype(int) - reference.astype(int)).max() <= 2


def test_required_transfer_syntaxes_are_covered(synthetic_by_syntax, capsys):
    covered: dict[UID, list[str]] = {}
    for path in bundled_greyscale_files():
        if path.name not in KNOWN_BROKEN and decoded_any(path).status == OK:
            covered.setdefault(transfer_syntax(path), []).append(path.name)
    for ts, paths in synthetic_by_syntax.items():
        if all(decoded_any(p).status == OK for p in paths):
            covered.setdefault(ts, []).extend(f"{p.name} (synthetic)" for p in paths)
    with capsys.disabled():
        print("\ntransfer syntaxes decoded:", ", ".join(sorted(ts.keyword for ts in covered)))
    missing = {ts.keyword for ts in REQUIRED_SYNTAXES - set(covered)}
    assert not missing, f"transfer syntaxes not covered: {sorted(missing)}"


# --------------------------------------------------------------------------- synthetic CT in several syntaxes


@pytest.mark.parametrize(
    "ts",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEG2000Lossless,
    ],
    ids=lambda ts: ts.keyword,
)
def test_ct_round_trip_in_transfer_syntax(ts, tmp_path):
    """A CT written by pydicom in each syntax reads back to the exact HU (screening path)."""
    hu = hu_phantom(low=-1024, high=3071)
    stored = (hu + 1024).astype(np.uint16)
    ds = ct_dataset(stored, bits_stored=12, intercept=-1024.0)
    if UID(ts).is_compressed:
        ds.compress(ts, stored, generate_instance_uid=False)
    else:
        ds = ct_dataset(stored, ts=ts, bits_stored=12, intercept=-1024.0)
    path = save(ds, tmp_path / "ct.dcm")
    r = decode_instance(path)
    assert r.status == OK, r.error
    assert not r.rsna_fixed
    assert np.array_equal(r.hu(), hu)
    assert np.array_equal(r.pixels, pydicom.dcmread(path).pixel_array)
    assert r.sop_instance_uid == ds.SOPInstanceUID and r.study_instance_uid == ds.StudyInstanceUID


# --------------------------------------------------------------------------- 2. HU conversion


def test_ct_small_hu_matches_pydicom():
    ds = pydicom.dcmread(CT_SMALL)
    r = decode_instance(CT_SMALL)
    assert r.status == OK, r.error
    assert (r.slope, r.intercept) == (float(ds.RescaleSlope), float(ds.RescaleIntercept))
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert r.hu().dtype == np.float32
    assert np.array_equal(r.hu(), expected)
    assert r.sop_instance_uid == ds.SOPInstanceUID
    assert r.study_instance_uid == ds.StudyInstanceUID
    assert r.series_instance_uid == ds.SeriesInstanceUID
    assert r.sop_class_uid == CT_IMAGE
    assert r.instance_number == int(ds.InstanceNumber)


def test_hu_with_slope_2_and_intercept_minus_1024(tmp_path):
    stored = hu_phantom(low=-100, high=2000, seed=1).astype(np.int16)
    path = save(ct_dataset(stored, slope=2.0, intercept=-1024.0), tmp_path / "slope2.dcm")
    r = decode_instance(path)
    assert r.status == OK, r.error
    assert (r.slope, r.intercept, r.rsna_fixed) == (2.0, -1024.0, False)
    assert np.array_equal(r.pixels, stored)
    assert np.array_equal(r.hu(), stored.astype(np.float64) * 2 - 1024)


def test_invalid_rescale_is_an_error(tmp_path):
    path = save(ct_dataset(np.zeros((8, 8), np.int16), slope=0.0), tmp_path / "slope0.dcm")
    r = decode_instance(path)
    assert r.status == ERROR and "rescale" in r.error


# --------------------------------------------------------------------------- 3. RSNA 12-bit fix


def test_rsna_12bit_wraparound_is_fixed(tmp_path):
    hu = hu_phantom(low=-1000, high=3095, seed=2)
    stored = np.mod(hu, 4096).astype(np.uint16)  # what the affected RSNA images hold
    path = save(ct_dataset(stored, bits_stored=12, intercept=0.0), tmp_path / "rsna.dcm")
    r = decode_instance(path)
    assert r.status == OK, r.error
    assert r.rsna_fixed is True
    assert r.intercept == -1000.0
    assert np.array_equal(r.hu(), hu)


def test_rsna_fix_function_inverts_the_wraparound():
    hu = np.arange(-1000, 3096)
    fixed = rsna_12bit_fix(np.mod(hu, 4096).astype(np.uint16))
    assert np.array_equal(fixed.astype(np.int64) - 1000, hu)


def test_normally_stored_ct_is_not_altered(tmp_path):
    hu = hu_phantom(low=-1000, high=3071, seed=2)
    stored = (hu + 1024).astype(np.uint16)  # 12-bit unsigned with intercept -1024: the usual way
    path = save(ct_dataset(stored, bits_stored=12, intercept=-1024.0), tmp_path / "normal12.dcm")
    r = decode_instance(path)
    assert r.status == OK, r.error
    assert r.rsna_fixed is False and r.intercept == -1024.0
    assert np.array_equal(r.pixels, stored)
    assert np.array_equal(r.hu(), hu)

    signed = hu_phantom(low=-1000, high=3095, seed=2).astype(np.int16)
    path = save(ct_dataset(signed, intercept=0.0), tmp_path / "signed16.dcm")
    r = decode_instance(path)
    assert r.status == OK and r.rsna_fixed is False
    assert np.array_equal(r.hu(), signed)


def test_rsna_fix_is_for_ct_only(tmp_path):
    """An MR with 12-bit unsigned values and no intercept is decoded as stored."""
    stored = np.random.default_rng(3).integers(0, 4096, (64, 64)).astype(np.uint16)
    stored.flat[:2] = [3500, 4095]  # values the CT fix would wrap
    ds = ct_dataset(stored, sop_class=MR_IMAGE, modality="MR", bits_stored=12)
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    path = save(ds, tmp_path / "mr12.dcm")
    r = decode_instance(path, any_modality=True)
    assert r.status == OK, r.error
    assert r.rsna_fixed is False
    assert np.array_equal(r.pixels, stored)


# --------------------------------------------------------------------------- 4. bad inputs


@dataclass(frozen=True)
class Expect:
    status: str
    reason: str  # text the one-line reason must contain (case-insensitive)


def deflate_bomb(path: Path, inflated_bytes: int = 300 * MB) -> None:
    """Deflated Explicit VR LE file whose data set inflates to ``inflated_bytes`` of mostly zeros.

    Built without ever holding the inflated data: after a full flush the deflate state is
    reset, so one compressed MiB of zeros can simply be repeated.
    """
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = new_uid()
    ds.Modality = "CT"
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    body = buf.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes)
    first = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = first.compress(body) + first.flush(zlib.Z_FULL_FLUSH)
    zeros = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = zeros.compress(b"\x00" * MB) + zeros.flush(zlib.Z_FULL_FLUSH)
    path.write_bytes(
        meta_bytes(CT_IMAGE, DeflatedExplicitVRLittleEndian, ds.SOPInstanceUID)
        + deflated
        + block * (inflated_bytes // MB)
        + b"\x03\x00"  # final empty fixed-Huffman block
    )


def build_bad_files(folder: Path) -> dict[str, Expect]:
    """Hostile and unscreenable inputs, each with the status and reason it must get."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when it writes the invalid UIDs
        return _build_bad_files(folder)


def _build_bad_files(folder: Path) -> dict[str, Expect]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, Expect] = {}
    small = hu_phantom((64, 64), low=-1024, high=2000, seed=4).astype(np.int16)

    (folder / "empty.dcm").write_bytes(b"")
    expect["empty.dcm"] = Expect(ERROR, "empty")

    (folder / "notes.txt").write_text("This is not a DICOM file.\nIt has two lines.\n")
    expect["notes.txt"] = Expect(ERROR, "not a DICOM")

    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(folder / "picture.png")
    expect["picture.png"] = Expect(ERROR, "not a DICOM")

    noise = bytearray(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    noise[0:2] = b"\xff\xff"  # never looks like a bare group 0002/0008 data set
    (folder / "random.bin").write_bytes(bytes(noise))
    expect["random.bin"] = Expect(ERROR, "not a DICOM")

    raw = save(ct_dataset(small), folder / "whole.tmp").read_bytes()
    (folder / "whole.tmp").unlink()
    (folder / "truncated.dcm").write_bytes(raw[: len(raw) - small.nbytes // 2])
    expect["truncated.dcm"] = Expect(ERROR, "truncated")

    # The file meta is written by pydicom; garbage follows where the data set belongs.
    garbage = np.random.default_rng(6).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    (folder / "garbage_after_header.dcm").write_bytes(meta_bytes(CT_IMAGE, ExplicitVRLittleEndian) + garbage)
    expect["garbage_after_header.dcm"] = Expect(ERROR, "")

    dicomdir = with_file_meta(MEDIA_STORAGE_DIRECTORY)
    dicomdir.FileSetID = "TESTSET"
    dicomdir.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.FileSetConsistencyFlag = 0
    dicomdir.DirectoryRecordSequence = []
    save(dicomdir, folder / "DICOMDIR")
    expect["DICOMDIR"] = Expect(SKIPPED, "DICOMDIR")

    frames = np.stack([small] * 3)
    multi = ct_dataset(small, sop_class=ENHANCED_CT_IMAGE, NumberOfFrames=3)
    multi.PixelData = frames.tobytes()
    save(multi, folder / "multiframe_ct.dcm")
    expect["multiframe_ct.dcm"] = Expect(SKIPPED, "multi-frame")

    rgb_pixels = np.zeros((64, 64, 3), np.uint8)
    rgb = ct_dataset(rgb_pixels[..., 0], SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    rgb.PixelData = rgb_pixels.tobytes()
    del rgb.RescaleSlope, rgb.RescaleIntercept, rgb.RescaleType
    save(rgb, folder / "rgb_ct.dcm")
    expect["rgb_ct.dcm"] = Expect(SKIPPED, "colour")

    save(ct_dataset(small, sop_class=MR_IMAGE, modality="MR"), folder / "mr.dcm")
    expect["mr.dcm"] = Expect(SKIPPED, "not CT")

    sr = with_file_meta(BASIC_TEXT_SR)
    sr.SOPClassUID, sr.SOPInstanceUID = BASIC_TEXT_SR, sr.file_meta.MediaStorageSOPInstanceUID
    sr.StudyInstanceUID, sr.SeriesInstanceUID = new_uid(), new_uid()
    sr.Modality, sr.ValueType, sr.TextValue = "SR", "TEXT", "No pixel data here."
    save(sr, folder / "report_sr.dcm")
    expect["report_sr.dcm"] = Expect(SKIPPED, "no pixel data")

    # PixelData declares 0xFFFFFFF0 bytes; the file holds 8 KB.
    raw = save(ct_dataset(small), folder / "huge_length.dcm").read_bytes()
    header = struct.pack("<HH2sH", 0x7FE0, 0x0010, b"OW", 0)
    at = raw.rindex(header) + len(header)
    (folder / "huge_length.dcm").write_bytes(raw[:at] + struct.pack("<I", 0xFFFFFFF0) + raw[at + 4 :])
    expect["huge_length.dcm"] = Expect(ERROR, "truncated")

    save(ct_dataset(small, Rows=65535, Columns=65535), folder / "huge_dims.dcm")
    expect["huge_dims.dcm"] = Expect(ERROR, "pixel limit")

    save(ct_dataset(small, Rows=65535, Columns=65535, PixelData=b""), folder / "huge_dims_no_data.dcm")
    expect["huge_dims_no_data.dcm"] = Expect(ERROR, "pixel limit")

    deflate_bomb(folder / "deflate_bomb.dcm")
    expect["deflate_bomb.dcm"] = Expect(ERROR, "inflates to over")

    save(ct_dataset(small, SOPInstanceUID="../x"), folder / "uid_traversal_sop.dcm")
    expect["uid_traversal_sop.dcm"] = Expect(ERROR, "invalid SOPInstanceUID")

    save(ct_dataset(small, StudyInstanceUID="../x"), folder / "uid_traversal_study.dcm")
    expect["uid_traversal_study.dcm"] = Expect(ERROR, "invalid StudyInstanceUID")

    save(ct_dataset(small, SOPInstanceUID="1." + "2" * 68), folder / "uid_70_chars.dcm")
    expect["uid_70_chars.dcm"] = Expect(ERROR, "invalid SOPInstanceUID")

    return expect


BAD_NAMES = [
    "empty.dcm",
    "notes.txt",
    "picture.png",
    "random.bin",
    "truncated.dcm",
    "garbage_after_header.dcm",
    "DICOMDIR",
    "multiframe_ct.dcm",
    "rgb_ct.dcm",
    "mr.dcm",
    "report_sr.dcm",
    "huge_length.dcm",
    "huge_dims.dcm",
    "huge_dims_no_data.dcm",
    "deflate_bomb.dcm",
    "uid_traversal_sop.dcm",
    "uid_traversal_study.dcm",
    "uid_70_chars.dcm",
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> tuple[Path, dict[str, Expect]]:
    folder = tmp_path_factory.mktemp("bad") / "inputs"
    expect = build_bad_files(folder)
    assert sorted(expect) == sorted(BAD_NAMES)
    return folder, expect


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input(name, bad_files):
    folder, expect = bad_files
    path = folder / name
    before = sorted(p.name for p in folder.parent.iterdir())
    r = decode_instance(path)
    assert_contract(r)
    assert r.status == expect[name].status, r.error
    assert expect[name].reason.lower() in r.error.lower(), r.error
    assert len(r.error) <= 300
    assert sorted(p.name for p in folder.parent.iterdir()) == before  # nothing created beside it


def test_sizes_of_hostile_files_stay_small(bad_files):
    folder, _ = bad_files
    assert (folder / "huge_length.dcm").stat().st_size < 64 * 1024
    assert (folder / "huge_dims.dcm").stat().st_size < 64 * 1024
    assert (folder / "deflate_bomb.dcm").stat().st_size < 1 * MB


def test_uid_refusals_name_the_uid_and_create_nothing(bad_files, tmp_path, monkeypatch):
    folder, _ = bad_files
    monkeypatch.chdir(tmp_path)  # a '../x' used as a path would land beside tmp_path
    for name in ("uid_traversal_sop.dcm", "uid_traversal_study.dcm"):
        r = decode_instance(folder / name)
        assert r.status == ERROR and "'../x'" in r.error
        assert "/" not in r.sop_instance_uid + r.study_instance_uid + r.series_instance_uid
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "x").exists()
    assert not dicom.is_valid_uid("../x") and not dicom.is_valid_uid("1." + "2" * 68)
    assert dicom.is_valid_uid("1.2.840.10008.1.2") and dicom.is_valid_uid("1." + "2" * 62)


def test_deflate_bomb_memory_stays_flat(bad_files):
    folder, _ = bad_files
    out, growth_mb = maxrss_growth_mb(folder / "deflate_bomb.dcm")
    assert out["status"] == ERROR and "deflate" in out["error"], out
    assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB"


def test_huge_declared_pixel_length_memory_stays_flat(bad_files):
    folder, _ = bad_files
    out, growth_mb = maxrss_growth_mb(folder / "huge_length.dcm")
    assert out["status"] == ERROR, out
    assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB"


def test_legitimate_deflated_file_under_the_cap(tmp_path):
    hu = hu_phantom(low=-1024, high=2000, seed=7)
    path = save(ct_dataset(hu.astype(np.int16), ts=DeflatedExplicitVRLittleEndian, intercept=0.0), tmp_path / "d.dcm")
    assert decode_instance(path).status == OK
    # The same file with a cap below its inflated size is refused.
    r = decode_instance(path, DecodeLimits(max_inflated_bytes=4096))
    assert r.status == ERROR and "inflates to over 4096 bytes" in r.error


def test_corrupt_deflate_stream_is_an_error(tmp_path):
    path = tmp_path / "corrupt_deflate.dcm"
    path.write_bytes(meta_bytes(CT_IMAGE, DeflatedExplicitVRLittleEndian) + b"\xff" * 512)
    r = decode_instance(path)
    assert_contract(r)
    assert r.status == ERROR and "deflate" in r.error, r.error


def test_missing_path_is_an_error(tmp_path):
    r = decode_instance(tmp_path / "does-not-exist.dcm")
    assert_contract(r)
    assert r.status == ERROR and "cannot read" in r.error


def test_directory_path_is_an_error(tmp_path):
    r = decode_instance(tmp_path)
    assert_contract(r)
    assert r.status == ERROR and "not a regular file" in r.error


def test_file_over_the_size_limit_is_refused_unread():
    r = decode_instance(CT_SMALL, DecodeLimits(max_file_bytes=1000))
    assert r.status == ERROR and "over the 1000 byte limit" in r.error


def test_file_that_grows_after_stat_is_refused(tmp_path, monkeypatch):
    """The size is checked before reading and again on what was read."""
    path = tmp_path / "growing.dcm"
    path.write_bytes(CT_SMALL.read_bytes())
    real_stat = os.stat

    def stat_before_growth(p, *args, **kwargs):
        st = real_stat(p, *args, **kwargs)
        if os.fspath(p) == str(path):  # report the size it had "before it grew"
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 500, *st[7:10]))
        return st

    monkeypatch.setattr(dicom.os, "stat", stat_before_growth)
    r = decode_instance(path, DecodeLimits(max_file_bytes=1000))
    assert r.status == ERROR and "over the 1000 byte limit" in r.error


def test_truncation_anywhere_never_crashes_or_passes(tmp_path):
    """CT_small cut at many offsets: always a result, never ``ok`` with a short image."""
    raw = CT_SMALL.read_bytes()
    pixel_header = raw.rindex(struct.pack("<HH2sH", 0x7FE0, 0x0010, b"OW", 0))
    pixel_end = pixel_header + 12 + 128 * 128 * 2
    path = tmp_path / "cut.dcm"
    cuts = sorted(set(range(0, len(raw), 211)) | set(range(pixel_header - 2, pixel_header + 16)))
    for cut in cuts:
        path.write_bytes(raw[:cut])
        r = decode_instance(path)
        assert_contract(r)
        if cut < pixel_end:
            assert r.status != OK, f"cut at {cut} decoded as ok"
        if pixel_header + 12 < cut < pixel_end:
            assert r.status == ERROR and "truncated" in r.error, (cut, r.error)


def test_garbage_after_header_does_not_crash_for_many_seeds(tmp_path):
    head = meta_bytes(CT_IMAGE, ExplicitVRLittleEndian)
    path = tmp_path / "garbage.dcm"
    for seed in range(40):
        path.write_bytes(head + np.random.default_rng(seed).integers(0, 256, 1024, dtype=np.uint8).tobytes())
        r = decode_instance(path)
        assert_contract(r)
        assert r.status == ERROR, (seed, r.status, r.error)


def test_no_pixel_data_limits_in_compressed_files(tmp_path):
    """Rows x Columns over the limit is refused before decoding, compressed or not."""
    ds = pydicom.dcmread(TEST_FILES / "MR_small_RLE.dcm")
    ds.Rows = ds.Columns = 65535
    path = save(ds, tmp_path / "huge_rle.dcm")
    r = decode_instance(path, any_modality=True)
    assert r.status == ERROR and "pixel limit" in r.error


# --------------------------------------------------------------------------- 5. batch level


@pytest.mark.slow
def test_batch_over_bad_files(bad_files, tmp_path, monkeypatch):
    """One CSV row per file, the right statuses, the CSV columns, formula cells defused."""
    from ichscan.pipeline import BatchOptions, run_batch
    from ichscan.default_plugins.csv_report import RESULT_COLUMNS

    source, expect = bad_files
    # A relative input folder whose name starts with '=': every path cell starts with '='.
    monkeypatch.chdir(tmp_path)
    folder = Path("=cases")
    folder.mkdir()
    expected = {name: e.status for name, e in expect.items()}
    for name in expect:
        (folder / name).write_bytes((source / name).read_bytes())
    (folder / "CT_small.dcm").write_bytes(CT_SMALL.read_bytes())
    (folder / "=cmd.dcm").write_bytes(CT_SMALL.read_bytes())
    (folder / "-rf.dcm").write_bytes(b"")
    (folder / "@SUM(A1).dcm").write_text("text")
    expected.update({"CT_small.dcm": OK, "=cmd.dcm": OK, "-rf.dcm": ERROR, "@SUM(A1).dcm": ERROR})
    (folder / ".hidden.dcm").write_bytes(CT_SMALL.read_bytes())  # hidden: no row
    os.symlink("missing-target.dcm", folder / "dangling.dcm")  # a path that does not exist
    expected["dangling.dcm"] = ERROR

    out = tmp_path / "r.csv"
    summary = run_batch(
        BatchOptions(input_dir=folder, out=out, overlays_for="none", progress=False, workers=1, device="cpu")
    )
    with open(out, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == tuple(RESULT_COLUMNS)
        rows = list(reader)
    for row in rows:
        assert set(row) == set(RESULT_COLUMNS) and None not in row.values()

    by_name = {}
    for row in rows:
        assert row["path"].startswith("'=cases"), row["path"]  # neutralised
        by_name[row["path"][1:].split("/", 1)[1]] = row
    assert len(rows) == len(by_name) == len(expected)  # exactly one row per file
    assert sorted(by_name) == sorted(expected)
    assert ".hidden.dcm" not in by_name
    assert {name: row["status"] for name, row in by_name.items()} == expected
    for name, row in by_name.items():
        if row["status"] == OK:
            assert row["error"] == "" and row["p_any"] != ""
        else:
            assert row["error"] and row["p_any"] == ""
            assert not row["error"].startswith(("=", "+", "-", "@"))
    for name, e in expect.items():
        # The selection rules (on by default) name themselves first: an SR fails `modality`.
        reason = "rule modality: Modality SR is not CT" if name == "report_sr.dcm" else e.reason
        assert reason.lower() in by_name[name]["error"].lower()
    assert by_name["=cmd.dcm"]["sop_instance_uid"] == by_name["CT_small.dcm"]["sop_instance_uid"]
    counts = {status: list(expected.values()).count(status) for status in (OK, SKIPPED, ERROR)}
    assert (summary.files, summary.ok, summary.skipped, summary.error) == (
        len(expected),
        counts[OK],
        counts[SKIPPED],
        counts[ERROR],
    )


# A probe that needs nothing from this module: the worker must not import the tests
# (they import ichscan.batch, which imports torch). eval is a picklable builtin.
TORCH_PROBE = "'torch' in __import__('sys').modules"


def test_fresh_decode_worker_does_not_import_torch():
    from ichscan.pipeline.decode import DecodePool

    with DecodePool(1) as pool:
        assert pool._pool().submit(eval, TORCH_PROBE, {}).result(timeout=60) is False


def test_decode_worker_does_not_import_torch_after_decoding():
    from ichscan.pipeline.decode import DecodePool

    with DecodePool(1) as pool:
        (result,) = list(pool.decode([str(CT_SMALL)]))
        assert result.status == OK
        assert pool._pool().submit(eval, TORCH_PROBE, {}).result(timeout=60) is False


# --------------------------------------------------------------------------- 6. fuzz findings


def bad_rle_file(path: Path) -> Path:
    """A CT slice whose RLE segment overruns: pylibjpeg-rle (Rust) panics on it.

    The panic reaches Python as ``pyo3_runtime.PanicException``, a BaseException that a
    worker cannot pickle back. Built from pydicom's bundled MR_small_RLE.dcm (64x64).
    """
    ds = pydicom.dcmread(TEST_FILES / "MR_small_RLE.dcm")
    ds.Modality = "CT"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.save_as(path)
    data = bytearray(path.read_bytes())
    pixel_data = data.rfind(b"\xe0\x7f\x10\x00")
    data[pixel_data + 200 : pixel_data + 264] = b"\x81" * 64  # RLE repeat runs past the segment's end
    path.write_bytes(bytes(data))
    return path


def test_rust_decoder_panic_is_an_error_row(tmp_path):
    pytest.importorskip("rle")  # pylibjpeg-rle
    r = decode_instance(bad_rle_file(tmp_path / "bad_rle.dcm"))
    assert_contract(r)
    assert r.status == ERROR
    assert "pixel decoder failed" in r.error and "PanicException" in r.error, r.error
    assert r.sop_instance_uid  # the identity read before decoding is kept


def test_decoder_base_exception_is_an_error_row_but_ctrl_c_is_not(tmp_path, monkeypatch):
    class Panic(BaseException):
        pass

    def panics(*args, **kwargs):
        raise Panic("the decoder panicked")

    monkeypatch.setattr(dicom, "_decode_into", panics)
    r = decode_instance(CT_SMALL)
    assert_contract(r)
    assert r.status == ERROR and r.error == "decoder failure: Panic: the decoder panicked"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dicom, "_decode_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        decode_instance(CT_SMALL)


def test_failed_resize_costs_only_its_file(tmp_path, monkeypatch):
    import ichscan.imaging as imaging

    real = imaging.resize_stored
    calls = []

    def resize_fails_once(pixels, size):
        calls.append(size)
        if len(calls) == 2:
            raise MemoryError
        return real(pixels, size)

    monkeypatch.setattr(imaging, "resize_stored", resize_fails_once)
    out = dicom.decode_many([str(CT_SMALL)] * 3, resize_to=32)
    assert [r.status for r in out] == [OK, ERROR, OK]
    assert out[1].error == "cannot prepare the decoded image: out of memory" and out[1].pixels is None
    assert out[0].pixels.shape == (32, 32)


@pytest.mark.parametrize("cut", [132, 133, 136, 139, 140, 143, 144, 150, 200])
def test_file_cut_inside_the_file_meta_is_a_truncation_error(cut, tmp_path):
    raw = save(ct_dataset(np.zeros((8, 8), np.int16)), tmp_path / "whole.dcm").read_bytes()
    path = tmp_path / f"cut_{cut}.dcm"
    path.write_bytes(raw[:cut])
    r = decode_instance(path)
    assert_contract(r)
    assert r.status == ERROR, r.error
    assert "truncated" in r.error and "no data set" in r.error, r.error
    assert "unpack" not in r.error


def test_meta_only_file_is_an_error(tmp_path):
    path = tmp_path / "meta_only.dcm"
    path.write_bytes(meta_bytes(CT_IMAGE, ExplicitVRLittleEndian))
    r = decode_instance(path)
    assert_contract(r)
    assert r.status == ERROR and "no data set after the file meta information" in r.error, r.error


def test_unknown_transfer_syntax_is_named(tmp_path):
    ds = ct_dataset(np.zeros((8, 8), np.int16))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    path = tmp_path / "ts_unknown.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
    r = decode_instance(path)
    assert_contract(r)
    assert r.status == ERROR
    assert "unknown transfer syntax 1.2.3.4" in r.error, r.error


@pytest.mark.parametrize(
    ("slope", "intercept"),
    [("1e38", "0"), ("1e39", "0"), ("20000", "-1024"), ("-1e5", "0"), ("1", "1e6"), ("1", "-3e38")],
)
def test_implausible_rescale_is_an_error(slope, intercept, tmp_path):
    ds = ct_dataset(hu_phantom((16, 16), seed=3).astype(np.int16))
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    path = save(ds, tmp_path / "rescale.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning fails the test
        r = decode_instance(path)
        out = dicom.decode_many([str(path)], resize_to=8, display=True)
    assert_contract(r)
    assert r.status == ERROR and "implausible rescale" in r.error and "10000" in r.error, r.error
    assert out[0].status == ERROR and out[0].display is None


def test_plausible_rescale_still_decodes(tmp_path):
    ds = ct_dataset(hu_phantom((16, 16), seed=3).astype(np.int16))
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-8192"
    r = decode_instance(save(ds, tmp_path / "rescale.dcm"))
    assert r.status == OK and (r.slope, r.intercept) == (0.5, -8192.0), r.error


@pytest.mark.parametrize("slope", [1e38, float("inf"), float("nan"), -1e39])
def test_brain_window_of_absurd_rescale_warns_nothing(slope):
    from ichscan.imaging import brain_window_image

    pixels = np.array([[0, 1, 1000], [-5, 30000, 7]], np.int16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = brain_window_image(pixels, slope, -1024.0)
    assert image.dtype == np.uint8 and image.shape == pixels.shape
