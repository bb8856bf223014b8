"""Safe DICOM decoding: one file in, one :class:`DecodedSlice` out, never an exception.

This module runs in the decode worker processes, so it must not import torch (a CUDA
build of torch costs seconds per process). It hands over the stored pixel values with
their rescale (after the RSNA 12-bit fix); Hounsfield units are ``pixels * slope +
intercept``, computed batched by :mod:`ichscan.preprocess` on whatever device runs the
model.

Everything read here is untrusted: sizes are checked before anything large is
allocated, deflated data sets are inflated under a cap, and UIDs must be plain
dotted-decimal strings before they are reported or used in a path.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

log = logging.getLogger(__name__)

from ichscan.records import DecodedSlice, Instance, Status, StoredImage  # noqa: E402 - after numpy/pydicom
from ichscan.imaging import rsna_12bit_fix  # noqa: E402,F401 - re-exported: the RSNA fix is part of reading

if TYPE_CHECKING:
    from ichscan.rules import SelectionRules
OK, SKIPPED, ERROR = Status.OK, Status.SKIPPED, Status.ERROR

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
#: Manufacturer of the objects ichscan writes (SR, key images): never screened again.
ICHSCAN_MANUFACTURER = "ichscan"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Never turned into a row: the user or the interpreter is stopping the process.
FATAL_EXCEPTIONS = (KeyboardInterrupt, SystemExit, GeneratorExit)
#: Rescale values beyond these are refused: a CT slope is about 1 (0.5-2 seen in practice)
#: and an intercept within a few thousand HU; past them Hounsfield units are meaningless
#: (and a slope near 1e38 overflows float32 to inf).
MAX_RESCALE_SLOPE = 1e4
MAX_RESCALE_INTERCEPT = 1e5


@dataclass(frozen=True)
class DecodeLimits:
    """Caps applied before anything large is allocated.

    Parameters
    ----------
    max_file_bytes
        Files larger than this are refused unread (a CT slice is about 0.5 MB).
    max_pixels
        Largest ``Rows * Columns`` decoded (default 4096 x 4096).
    max_inflated_bytes
        Largest size a Deflated Explicit VR Little Endian data set may inflate to.
    """

    max_file_bytes: int = 256 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_inflated_bytes: int = 256 * 1024 * 1024


DEFAULT_LIMITS = DecodeLimits()


class Refused(Exception):
    """Input that is refused with status ``error``; the message is the row's reason."""


class NotScreenable(Exception):
    """Readable DICOM that is not a single-frame greyscale CT image (status ``skipped``)."""


def is_valid_uid(value: object) -> bool:
    """True for a dotted-decimal UID of at most 64 characters (safe in a path)."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_RE.match(value))


def decode_instance(
    path: str | os.PathLike[str],
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    any_modality: bool = False,
    rules: SelectionRules | None = None,
) -> DecodedSlice:
    """Read one file and return its :class:`DecodedSlice`; never raises.

    Parameters
    ----------
    path
        File to read.
    limits
        Size caps (see :class:`DecodeLimits`).
    any_modality
        Decode greyscale single-frame images of any modality, not only CT (for tools
        and tests that exercise the decoders; screening always requires CT).
    rules
        Selection rules (:mod:`ichscan.rules`): a file failing one is ``skipped`` with its reason.

    Returns
    -------
    DecodedSlice
        ``ok`` with pixels, ``skipped`` with a reason (readable DICOM that is not a
        single-frame greyscale CT image), or ``error`` with a reason.
    """
    result = DecodedSlice(Instance(os.fspath(path)))
    try:
        with warnings.catch_warnings():
            # pydicom warns on many recoverable oddities; they are not our user's business
            # unless they end in a refusal, which carries its own reason.
            warnings.simplefilter("ignore")
            _decode_into(result, limits, any_modality, rules)
    except Refused as exc:
        result.fail(_one_line(str(exc)))
    except NotScreenable as exc:
        result.fail(_one_line(str(exc)), SKIPPED)
    except MemoryError:
        result.fail("out of memory while decoding")
    except Exception as exc:  # noqa: BLE001 - every input must end in a row, never a traceback
        result.fail(_one_line(f"{type(exc).__name__}: {exc}"))
    except FATAL_EXCEPTIONS:
        raise
    except BaseException as exc:  # noqa: BLE001 - e.g. a Rust decoder's pyo3 PanicException
        result.fail(_one_line(f"decoder failure: {type(exc).__name__}: {exc}"))
    return result


def _decode_into(result: DecodedSlice, limits: DecodeLimits, any_modality: bool, rules: SelectionRules | None = None) -> None:
    data = _read_file(result.path, limits)
    ds = _parse(data, limits)
    _read_identity(ds, result.instance)
    if why := is_ours_or_directory(ds) or (rules.failure(ds) if rules is not None else None):
        raise NotScreenable(why)
    _check_screenable(ds, limits, any_modality)
    pixels = _decode_pixels(ds, limits)
    slope, intercept = _rescale(ds)
    rsna_fixed = False
    bits_stored = int(ds.get("BitsStored", 16) or 16)
    if (
        bits_stored == 12
        and int(ds.get("PixelRepresentation", 0) or 0) == 0
        and intercept > -100
        and _is_ct(ds)  # a CT-only correction: with any_modality, MR/CR values must stay as stored
    ):
        pixels = rsna_12bit_fix(pixels)
        intercept = -1000.0
        rsna_fixed = True
    result.image = StoredImage(pixels, slope, intercept, rsna_fixed=rsna_fixed)
    result.status, result.error = OK, ""


def read_header_instance(path: str | os.PathLike[str], limits: DecodeLimits = DEFAULT_LIMITS) -> Instance | None:
    """Identity and geometry from a file's header (:func:`read_header`)."""
    return (read_header(path, limits) or (None, None))[0]


def read_header(path: str | os.PathLike[str], limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[Instance, pydicom.Dataset] | None:
    """``(Instance, data set)`` of a file's header, pixels unread; ``None`` if unreadable (the decoder says why)."""
    instance = Instance(os.fspath(path))
    try:
        if os.path.getsize(path) > limits.max_file_bytes:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            _read_identity(ds, instance)
    except FATAL_EXCEPTIONS:
        raise
    except BaseException:  # noqa: BLE001 - any failure here is found again, and reported, by the decoder
        return None
    return instance, ds


def decode_many(
    paths: list[str],
    limits: DecodeLimits = DEFAULT_LIMITS,
    resize_to: int | None = None,
    display: bool = False,
    crop: bool = False,
    rules: SelectionRules | None = None,
) -> list[DecodedSlice]:
    """Decode several files (the unit of work sent to a decode worker); ``rules`` as for :func:`decode_instance`.

    Parameters
    ----------
    resize_to
        Resize the stored values of ``ok`` slices to this square size (float32) here,
        in the worker, instead of in the model process (the CPU path).
    display
        Also keep the full-resolution brain-window image (for overlays).
    crop
        With ``resize_to``: frame the head first (:func:`ichscan.imaging.frame_stored`),
        the frame recorded in ``StoredImage.frame``.

    Notes
    -----
    It lives here, not in the engine, so that unpickling it in a worker imports only
    torch-free modules.
    """
    from ichscan.imaging import brain_window_image, frame_stored, resize_stored

    results = [decode_instance(path, limits, rules=rules) for path in paths]
    for result in results:
        image = result.image
        if image is None:
            continue
        try:
            if display:
                image.display = brain_window_image(image.pixels, image.slope, image.intercept)
            if resize_to and crop:
                rows, cols = image.pixels.shape
                image.pixels, (top, left, side) = frame_stored(image.pixels, image.slope, image.intercept, resize_to)
                image.frame = (top, left, side, rows, cols)
            elif resize_to:
                image.pixels = resize_stored(image.pixels, resize_to)
        except FATAL_EXCEPTIONS:
            raise
        except BaseException as exc:  # noqa: BLE001 - one file's failure must not cost the chunk
            what = "out of memory" if isinstance(exc, MemoryError) else f"{type(exc).__name__}: {exc}"
            result.fail(_one_line(f"cannot prepare the decoded image: {what}"))
    return results


def _read_file(path: str, limits: DecodeLimits) -> bytes:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Refused(f"cannot read file: {exc.strerror or exc}") from None
    if not os.path.isfile(path):
        raise Refused("not a regular file")
    if st.st_size == 0:
        raise Refused("empty file")
    if st.st_size > limits.max_file_bytes:
        raise Refused(f"file is {st.st_size} bytes, over the {limits.max_file_bytes} byte limit")
    try:
        with open(path, "rb") as fh:
            # Bounded by the size check: read one byte more to notice a file that grew.
            data = fh.read(limits.max_file_bytes + 1)
    except OSError as exc:
        raise Refused(f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > limits.max_file_bytes:
        raise Refused(f"file is over the {limits.max_file_bytes} byte limit")
    return data


def parse_dicom_bytes(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> pydicom.FileDataset:
    """Parse a whole DICOM file held in memory (a STOW-RS part), under the same checks as
    a file read from disk: the 'DICM' marker, a deflate bomb, truncated values.

    Raises
    ------
    Refused
        With the reason, as a file's ``error`` row would give it.
    """
    if len(data) > limits.max_file_bytes:
        raise Refused(f"file is {len(data)} bytes, over the {limits.max_file_bytes} byte limit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _parse(data, limits)


def _looks_like_bare_dataset(data: bytes) -> bool:
    """A file without preamble may still be DICOM if it starts with group 0002 or 0008."""
    if len(data) < 8:
        return False
    for order in "<>":  # big endian files without meta exist too (retired, still seen)
        group, element = struct.unpack(order + "HH", data[:4])
        if group in (0x0002, 0x0008) and element < 0x0100:
            return True
    return False


def _parse(data: bytes, limits: DecodeLimits) -> pydicom.FileDataset:
    has_marker = data[128:132] == b"DICM"
    if not has_marker and not _looks_like_bare_dataset(data):
        raise Refused("not a DICOM file (no 'DICM' marker at byte 128)")
    force = not has_marker
    if has_marker and len(data) < 144:  # not even the first file meta element
        raise Refused(_meta_truncation(data) or "file truncated inside the file meta information (no data set)")
    if _may_be_deflated(data, has_marker):
        fp = io.BytesIO(data)
        try:
            read_preamble(fp, force)
            meta = _read_file_meta_info(fp)
        except Exception as exc:  # noqa: BLE001
            raise Refused(f"unreadable DICOM file meta information: {_one_line(str(exc))}") from None
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # pydicom inflates the whole data set in one call: check the size first, so a
            # deflate bomb is refused instead of filling memory.
            _check_inflated_size(data[fp.tell() :], limits.max_inflated_bytes)
    try:
        # BytesIO reads never allocate past the end of the data, so a declared length of
        # 4 GB on a small file yields a short value instead of a 4 GB buffer.
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except InvalidDicomError as exc:
        raise Refused(f"not a DICOM file ({_one_line(str(exc))})") from None
    except Exception as exc:  # noqa: BLE001
        truncated = _meta_truncation(data) if has_marker else None
        raise Refused(truncated or f"unreadable DICOM data set: {type(exc).__name__}: {exc}") from None
    if len(ds) == 0:
        truncated = _meta_truncation(data) if has_marker else None
        raise Refused(truncated or f"no data set after the file meta information (file truncated? {len(data)} bytes)")
    _check_complete(ds)
    return ds


def _meta_truncation(data: bytes) -> str | None:
    """The reason when a file with the 'DICM' marker ends inside its file meta group."""
    if len(data) <= 132:
        return "file truncated: it ends right after the 'DICM' marker (no file meta information, no data set)"
    if len(data) < 144:
        return f"file truncated: it ends at byte {len(data)}, inside the file meta information (no data set)"
    if data[132:138] == b"\x02\x00\x00\x00UL":  # (0002,0000) group length gives the end of the group
        (group_length,) = struct.unpack("<I", data[140:144])
        if len(data) < 144 + group_length:
            return (
                f"file truncated: it ends at byte {len(data)}, inside the file meta information "
                f"(which declares {group_length} bytes, to byte {144 + group_length}); no data set"
            )
    return None


def _check_complete(ds: pydicom.Dataset) -> None:
    """pydicom silently keeps a value cut short by the end of the file: refuse it."""
    for tag in ds.keys():  # raw top-level elements: keep_deferred, or an empty one of unknown VR is decoded (and raises)
        elem = ds.get_item(tag, keep_deferred=True)
        length, value = getattr(elem, "length", None), getattr(elem, "value", None)
        if isinstance(value, bytes) and isinstance(length, int) and length != 0xFFFFFFFF and len(value) < length:
            name = keyword_for_tag(elem.tag) or str(elem.tag)
            raise Refused(f"file truncated: {name} declares {length} bytes, the file holds {len(value)}")


_DEFLATED_UID_BYTES = str(DeflatedExplicitVRLittleEndian).encode()


def _may_be_deflated(data: bytes, has_marker: bool) -> bool:
    """Cheap pre-check: does the file meta group mention the deflated transfer syntax?"""
    if has_marker and data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL" and len(data) >= 144:
        # (0002,0000) group length gives the end of the meta group.
        (group_length,) = struct.unpack("<I", data[140:144])
        return _DEFLATED_UID_BYTES in data[144 : 144 + group_length]
    return _DEFLATED_UID_BYTES in data  # no group length: search it all (rare files)


def _check_inflated_size(zipped: bytes, cap: int) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    chunk = 1 << 20
    try:
        for start in range(0, len(zipped), chunk):
            piece = zipped[start : start + chunk]
            while piece:
                # At most `chunk` bytes of output per call: memory stays flat whatever the ratio.
                out = inflater.decompress(piece, min(chunk, cap + 1 - total))
                total += len(out)
                if total > cap:
                    raise Refused(f"deflated data set inflates to over {cap} bytes (deflate bomb?)")
                piece = inflater.unconsumed_tail
        total += len(inflater.flush())
    except zlib.error as exc:
        raise Refused(f"corrupt deflated data set: {exc}") from None
    if total > cap:
        raise Refused(f"deflated data set inflates to over {cap} bytes (deflate bomb?)")


def _read_identity(ds: pydicom.Dataset, instance: Instance) -> None:
    for keyword, attr in (
        ("SOPInstanceUID", "sop_instance_uid"),
        ("StudyInstanceUID", "study_instance_uid"),
        ("SeriesInstanceUID", "series_instance_uid"),
    ):
        value = text_value(ds, keyword)
        if value and not is_valid_uid(value):
            raise Refused(f"invalid {keyword} {value[:80]!r}")
        setattr(instance, attr, value)
    sop_class = text_value(ds, "SOPClassUID") or text_value(ds.get("file_meta", {}), "MediaStorageSOPClassUID")
    instance.sop_class_uid = sop_class if is_valid_uid(sop_class) else ""
    try:
        number = ds.get("InstanceNumber")
        instance.instance_number = None if number in (None, "") else int(number)
    except (TypeError, ValueError):
        instance.instance_number = None
    instance.position, instance.spacing = slice_position(ds, instance.instance_number)


def slice_position(ds: pydicom.Dataset, instance_number: int | None = None) -> tuple[float | None, float | None]:
    """``(position, spacing)`` of a slice along its series' normal; ``(None, None)`` when unknown.

    The position is ImagePositionPatient projected on the slice normal, the cross product
    of the row and column cosines of ImageOrientationPatient (mm); the spacing is
    SpacingBetweenSlices, else SliceThickness. Without usable geometry the InstanceNumber
    is the position, with spacing 1. Malformed values count as missing, never as an error.
    """
    ipp = _floats(ds, "ImagePositionPatient", 3)
    iop = _floats(ds, "ImageOrientationPatient", 6)
    if ipp is not None and iop is not None:
        normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
        length = float(np.linalg.norm(normal))
        if length > 1e-6:
            position = float(np.dot(np.asarray(ipp), normal / length))
            spacing = None
            for keyword in ("SpacingBetweenSlices", "SliceThickness"):
                value = _floats(ds, keyword, 1)
                if value is not None and value[0] > 0:
                    spacing = abs(value[0])
                    break
            return position, spacing
    if instance_number is not None:
        return float(instance_number), 1.0
    return None, None


def _floats(ds: pydicom.Dataset, keyword: str, count: int) -> list[float] | None:
    """``count`` finite numbers from a DS/FD element, or ``None`` when absent or malformed."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        values = [float(v) for v in (value if count > 1 else [value])]
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return values


def is_ours_or_directory(ds: pydicom.Dataset) -> str | None:
    """Why ``ds`` is never screened, whatever the rules say (a DICOMDIR, our own result), or ``None``."""
    meta = getattr(ds, "file_meta", None) or {}
    if text_value(meta, "MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return "DICOMDIR (media storage directory), not an image"
    if text_value(ds, "Manufacturer") == ICHSCAN_MANUFACTURER:
        return "written by ichscan (a screening result), not screened again"
    return None


def _check_screenable(ds: pydicom.Dataset, limits: DecodeLimits, any_modality: bool = False) -> None:
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = text_value(ds, "SOPClassUID") or text_value(meta, "MediaStorageSOPClassUID")
    pixel_keyword = next((k for k in _PIXEL_DATA_TAGS if k in ds), None)
    modality = text_value(ds, "Modality")
    class_name = UID(sop_class).name if sop_class else "unknown SOP class"
    if pixel_keyword is None and sop_class == CT_IMAGE_STORAGE:
        raise Refused("CT image without pixel data (file truncated?)")
    if pixel_keyword is None:
        raise NotScreenable(f"no pixel data ({class_name}, modality {modality or 'unknown'})")
    if not _is_ct(ds) and not any_modality:
        raise NotScreenable(f"modality {modality or 'missing'} is not CT ({class_name})")
    if pixel_keyword != "PixelData":
        raise NotScreenable(f"{pixel_keyword} is not integer CT pixel data")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames != 1:
        raise NotScreenable(f"multi-frame image ({frames} frames)")
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = text_value(ds, "PhotometricInterpretation") or "MONOCHROME2"
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotScreenable(f"colour image ({photometric}, {samples} samples per pixel), not greyscale")
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows <= 0 or cols <= 0:
        raise Refused(f"missing or invalid image size (Rows {rows}, Columns {cols})")
    if rows * cols > limits.max_pixels:
        raise Refused(f"image is {rows}x{cols}, over the {limits.max_pixels} pixel limit")
    bits = _int(ds, "BitsAllocated", 0)
    if bits not in (8, 16, 32):
        raise Refused(f"unsupported BitsAllocated {bits}")
    expected = rows * cols * (bits // 8)
    element = ds["PixelData"]
    transfer_syntax = _transfer_syntax(meta)
    if not transfer_syntax.is_compressed:
        length = len(element.value or b"")
        if length < expected:
            raise Refused(f"pixel data truncated: {length} bytes, {rows}x{cols}x{bits} bits needs {expected}")
    elif not element.value:
        raise Refused("compressed pixel data is empty")


def _is_ct(ds: pydicom.Dataset) -> bool:
    """Modality CT, or no modality and the CT Image Storage SOP class."""
    modality = text_value(ds, "Modality")
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = text_value(ds, "SOPClassUID") or text_value(meta, "MediaStorageSOPClassUID")
    return modality == "CT" or (not modality and sop_class == CT_IMAGE_STORAGE)


def _decode_pixels(ds: pydicom.Dataset, limits: DecodeLimits) -> np.ndarray:
    rows, cols = int(ds.Rows), int(ds.Columns)
    transfer_syntax = _transfer_syntax(getattr(ds, "file_meta", None) or {})
    if not transfer_syntax.is_compressed and _int(ds, "BitsAllocated", 0) in (8, 16, 32):
        return _native_pixels(ds, transfer_syntax, rows, cols)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise Refused(f"cannot decode pixel data ({transfer_syntax.name}): {_one_line(str(exc))}") from None
    except FATAL_EXCEPTIONS:
        raise
    except BaseException as exc:  # noqa: BLE001 - a Rust decoder's panic (pyo3 PanicException) is a BaseException
        raise Refused(
            f"pixel decoder failed ({transfer_syntax.name}): {type(exc).__name__}: {_one_line(str(exc))}"
        ) from None
    if arr.shape != (rows, cols):
        raise Refused(f"decoded pixel array has shape {arr.shape}, expected ({rows}, {cols})")
    if arr.dtype.kind not in "iu":
        raise Refused(f"pixel data of type {arr.dtype} is not integer")
    return arr


def _transfer_syntax(meta: object) -> UID:
    """The file's transfer syntax (Implicit VR Little Endian when absent); refused when unknown."""
    value = text_value(meta, "TransferSyntaxUID") or "1.2.840.10008.1.2"
    uid = UID(value)
    if not uid.is_transfer_syntax:
        shown = value if is_valid_uid(value) else repr(value[:80])
        raise Refused(f"unknown transfer syntax {shown} (TransferSyntaxUID)")
    return uid


def _native_pixels(ds: pydicom.Dataset, transfer_syntax: UID, rows: int, cols: int) -> np.ndarray:
    """Uncompressed pixel data straight from the buffer (pydicom's general path re-parses)."""
    bits = _int(ds, "BitsAllocated", 16)
    signed = _int(ds, "PixelRepresentation", 0) == 1
    order = ">" if transfer_syntax == "1.2.840.10008.1.2.2" else "<"
    dtype = np.dtype(f"{order}{'i' if signed else 'u'}{bits // 8}")
    arr = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * cols).reshape(rows, cols)
    arr = arr.astype(dtype.newbyteorder("="), copy=True)  # native order, writable
    stored = _int(ds, "BitsStored", bits)
    if 0 < stored < bits:
        # Bits above the high bit are not pixel data: drop them (sign-extend if signed).
        if signed:
            shift = bits - stored
            arr <<= shift
            arr >>= shift
        else:
            arr &= (1 << stored) - 1
    return arr


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    try:
        slope = ds.get("RescaleSlope")
        slope = 1.0 if slope in (None, "") else float(slope)  # not `or 1.0`: a slope of 0 is refused below
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise Refused(f"invalid rescale slope/intercept: {exc}") from None
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise Refused(f"invalid rescale slope {slope} / intercept {intercept}")
    if abs(slope) > MAX_RESCALE_SLOPE or abs(intercept) > MAX_RESCALE_INTERCEPT:
        raise Refused(
            f"implausible rescale slope {slope:g} / intercept {intercept:g} "
            f"(accepted: |slope| <= {MAX_RESCALE_SLOPE:g}, |intercept| <= {MAX_RESCALE_INTERCEPT:g})"
        )
    return slope, intercept


def text_value(ds: object, keyword: str) -> str:
    """An element's value as stripped text; empty when absent or malformed (``ds`` may be None)."""
    if ds is None:
        return ""
    try:
        value = ds.get(keyword)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a malformed element reads as missing
        return ""
    if value is None:
        return ""
    return str(value).strip().rstrip("\x00")


def _int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise Refused(f"invalid {keyword} {ds.get(keyword)!r}") from None


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
