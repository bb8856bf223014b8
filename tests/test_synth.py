"""Tests for the synthetic head-CT phantom generator (ichscan.synth)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from ichscan import synth
from ichscan.dicom import decode_instance
from ichscan.labels import LABELS, SUBTYPES

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SMALL = 128  # fast images where the size does not matter


def file_hu(ds: pydicom.Dataset) -> np.ndarray:
    """HU from a file the way a reader must do it, RSNA 12-bit fix included."""
    stored = ds.pixel_array.astype(np.int32)
    intercept = float(ds.RescaleIntercept)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
        fixed = stored + 1000
        fixed[fixed >= 4096] -= 4096
        return (fixed - 1000).astype(np.float64)
    return stored * float(ds.RescaleSlope) + intercept


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def neighbours_any(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a square of half-width ``radius`` (no scipy)."""
    out = mask.copy()
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            out |= np.roll(np.roll(mask, dr, axis=0), dc, axis=1)
    return out


def with_and_without(name: str, seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    anatomy = synth.make_anatomy(np.random.default_rng(1000 + seed))
    without = synth.render_slice(np.random.default_rng(seed), size, [], 0.5, anatomy)
    with_ = synth.render_slice(np.random.default_rng(seed), size, [name], 0.5, anatomy)
    return without, with_


# ------------------------------------------------------------------------------------------
# render_slice
# ------------------------------------------------------------------------------------------


def test_render_slice_basic_densities() -> None:
    img = synth.render_slice(np.random.default_rng(0), 512, [], 0.5)
    assert img.shape == (512, 512) and img.dtype == np.float32
    corners = np.concatenate([img[:20, :20].ravel(), img[-20:, -20:].ravel()])
    assert abs(float(np.median(corners)) + 1000) < 5  # air
    centre = img[206:306, 206:306]
    brainish = centre[(centre > 15) & (centre < 50)]
    assert 20 <= float(np.median(brainish)) <= 45
    assert np.count_nonzero((centre > -5) & (centre < 15)) > 50  # ventricular CSF
    # Skull: a bright ring across the middle row, 6-8 mm of cortical bone at ~0.5 mm/pixel.
    row = img[256]
    bone = np.flatnonzero(row > 1000)
    assert bone.size > 0
    left_run = bone[bone < 256]
    assert 5 <= left_run.size <= 25
    # The head fills roughly 80% of the field (vertical extent of non-air).
    head_rows = np.flatnonzero((img > -500).any(axis=1))
    assert 0.65 <= (head_rows[-1] - head_rows[0]) / 512 <= 0.92


def test_render_slice_same_rng_same_image_and_anatomy_shared() -> None:
    anatomy = synth.make_anatomy(np.random.default_rng(3))
    a = synth.render_slice(np.random.default_rng(9), 160, ["subdural"], 0.4, anatomy)
    b = synth.render_slice(np.random.default_rng(9), 160, ["subdural"], 0.4, anatomy)
    np.testing.assert_array_equal(a, b)
    # Two slices of one study: same head outline (skull pixels largely shared).
    c = synth.render_slice(np.random.default_rng(10), 160, [], 0.45, anatomy)
    skull_a, skull_c = a > 500, c > 500
    assert np.count_nonzero(skull_a & skull_c) > 0.5 * np.count_nonzero(skull_a)


def test_render_slice_rejects_unknown_bleed() -> None:
    with pytest.raises(ValueError, match="unknown bleed"):
        synth.render_slice(np.random.default_rng(0), 128, ["any"])


@pytest.mark.parametrize("name", SUBTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_bleed_raises_hu_inside_skull(name: str, seed: int) -> None:
    without, with_ = with_and_without(name, seed)
    diff = with_ - without
    rising = diff >= 20
    assert np.count_nonzero(rising) >= 50
    # Only intracranial pixels change: never air or scalp, and of the skull only pixels
    # partly inside it (a thin subdural at ~1 mm/pixel is half such pixels).
    assert float(np.mean(without[rising] < 100)) >= 0.5
    assert float(np.median(without[rising])) < 45
    assert not np.any(diff[without < -500])

    bone = without > 300
    near_bone = neighbours_any(bone, 2) & rising
    interior = rising & np.roll(rising, 1, 0) & np.roll(rising, -1, 0)
    interior &= np.roll(rising, 1, 1) & np.roll(rising, -1, 1)
    interior_fraction = np.count_nonzero(interior) / np.count_nonzero(rising)
    if name in ("epidural", "subdural"):
        assert np.count_nonzero(near_bone) >= 20  # lies against the inner table
    elif name in ("intraparenchymal", "intraventricular"):
        assert np.count_nonzero(near_bone) == 0  # deep inside the brain
    if name == "intraparenchymal":
        assert interior_fraction > 0.6  # a solid blob
        assert np.count_nonzero(diff <= -4) >= 20  # with a hypodense oedema rim
    if name == "subarachnoid":
        assert interior_fraction < 0.5  # thin lines, not a blob
    if name == "intraventricular":
        assert float(np.median(without[rising])) < 20  # replaces ventricular CSF
        rows = np.nonzero(rising)[0]
        assert rows.mean() > 256 / 2  # dependent (posterior) part of the ventricle
        top = rows.min()
        assert np.count_nonzero(rising[top : top + 2]) >= 3  # flat fluid level


@pytest.mark.parametrize("name", SUBTYPES)
def test_masks_mark_the_bleed(name: str) -> None:
    anatomy = synth.make_anatomy(np.random.default_rng(77))
    without = synth.render_slice(np.random.default_rng(5), 256, [], 0.6, anatomy)
    with_, masks = synth.render_slice_with_masks(np.random.default_rng(5), 256, [name], 0.6, anatomy)
    assert set(masks) == {name}
    mask = masks[name]
    spacing = synth.pixel_spacing_mm(anatomy, 256)
    assert synth.is_visible(mask, spacing)
    assert float(with_[mask].mean() - without[mask].mean()) >= 20


def test_several_bleeds_in_one_slice() -> None:
    anatomy = synth.make_anatomy(np.random.default_rng(4))
    _, masks = synth.render_slice_with_masks(
        np.random.default_rng(4), 384, list(SUBTYPES), 0.5, anatomy
    )
    spacing = synth.pixel_spacing_mm(anatomy, 384)
    assert all(synth.is_visible(masks[name], spacing) for name in SUBTYPES)
    # Each pixel belongs to one bleed at most.
    total = sum(m.astype(int) for m in masks.values())
    assert total.max() == 1


# ------------------------------------------------------------------------------------------
# Conventions and transfer syntaxes
# ------------------------------------------------------------------------------------------


def _dataset(img: np.ndarray, convention: synth.ScannerConvention, ts: str) -> pydicom.Dataset:
    return synth.make_dataset(
        img,
        convention=convention,
        transfer_syntax=ts,
        pixel_spacing=0.45,
        sop_instance_uid="1.2.3.4",
        study_instance_uid="1.2.3.5",
        series_instance_uid="1.2.3.6",
        frame_of_reference_uid="1.2.3.7",
        patient_id="PHANTOM-0-0",
        patient_name="Phantom^0",
        study_date="20200101",
    )


@pytest.fixture(scope="module")
def hu_image() -> np.ndarray:
    img = synth.render_slice(np.random.default_rng(21), SMALL, ["epidural"], 0.5)
    img[0, :8] = [-3000, -1030, -1024, -1000, 0, 3071, 3095, 5000]  # exercise the clipping
    return img


@pytest.mark.parametrize("convention", list(synth.SCANNER_CONVENTIONS.values()), ids=str)
@pytest.mark.parametrize("ts", synth.TRANSFER_SYNTAXES, ids=lambda u: u.keyword)
def test_transfer_syntax_and_convention_round_trip(
    tmp_path: Path, hu_image: np.ndarray, convention: synth.ScannerConvention, ts: str
) -> None:
    if ts not in synth.available_transfer_syntaxes():
        pytest.skip(f"no encoder for {ts}")
    path = tmp_path / "x.dcm"
    synth.save_dataset(_dataset(hu_image, convention, ts), path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ts
    stored = ds.pixel_array
    np.testing.assert_array_equal(stored, convention.hu_to_stored(hu_image))
    assert stored.dtype == (np.int16 if convention.pixel_representation else np.uint16)
    lo, hi = convention.hu_range
    recovered = file_hu(ds)
    assert np.abs(recovered - np.clip(hu_image, lo, hi)).max() <= 1.0
    # Every convention holds the whole head unclipped (only air noise may be clipped).
    head = hu_image > -990
    head[0] = False
    assert np.abs(recovered[head] - hu_image[head]).max() <= 0.5 + 1e-4
    np.testing.assert_allclose(convention.stored_to_hu(stored), recovered)


def test_conventions_cover_the_required_variants() -> None:
    convs = list(synth.SCANNER_CONVENTIONS.values())
    assert {c.rescale_intercept for c in convs if c.pixel_representation == 1} == {0, -1024}
    assert {c.bits_stored for c in convs if c.pixel_representation == 0} == {12, 16}
    quirk = [c for c in convs if c.rsna_quirk]
    assert len(quirk) == 1
    q = quirk[0]
    assert (q.bits_stored, q.pixel_representation) == (12, 0) and q.rescale_intercept > -100
    hu = np.array([-1000, -1, 0, 40, 3095], dtype=np.float32)
    np.testing.assert_array_equal(q.hu_to_stored(hu), np.mod(hu.astype(int), 4096))
    # Without the fix, air reads as dense bone: the quirk is real.
    assert float(q.hu_to_stored(hu)[0]) + q.rescale_intercept > 3000


def test_missing_encoder_falls_back_to_explicit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hu_image: np.ndarray
) -> None:
    monkeypatch.setattr(synth, "_encoder_plugin", lambda uid: None)
    records = synth.generate(
        tmp_path, 1, 1, seed=1, size=SMALL, transfer_syntaxes=["JPEG2000Lossless"]
    )
    ds = pydicom.dcmread(records[0].path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert records[0].transfer_syntax_uid == ExplicitVRLittleEndian
    assert ds.pixel_array.shape == (SMALL, SMALL)


def test_failing_encoder_falls_back_to_explicit(
    monkeypatch: pytest.MonkeyPatch, hu_image: np.ndarray
) -> None:
    def broken(self: pydicom.Dataset, *args: object, **kwargs: object) -> None:
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(pydicom.Dataset, "compress", broken)
    convention = synth.SCANNER_CONVENTIONS["signed16"]
    ds = _dataset(hu_image, convention, RLELossless)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PixelData == convention.hu_to_stored(hu_image).tobytes()


def test_resolve_transfer_syntax() -> None:
    assert synth.resolve_transfer_syntax("RLELossless") == RLELossless
    assert synth.resolve_transfer_syntax(str(JPEG2000Lossless)) == JPEG2000Lossless
    with pytest.raises(ValueError, match="unsupported transfer syntax"):
        synth.resolve_transfer_syntax("JPEGBaseline8Bit")


# ------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------


def test_reproducible_bytes(tmp_path: Path) -> None:
    kwargs = dict(studies=5, slices=2, size=SMALL)
    first = synth.generate(tmp_path / "a", seed=5, **kwargs)
    second = synth.generate(tmp_path / "b", seed=5, **kwargs)
    other = synth.generate(tmp_path / "c", seed=6, **kwargs)
    a, b, c = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b"), tree_bytes(tmp_path / "c")
    assert a == b and len(a) == 10
    assert [r.labels for r in first] == [r.labels for r in second]
    assert set(a).isdisjoint(c)  # other UIDs, so other paths
    assert sorted(a.values()) != sorted(c.values())
    assert len({r.transfer_syntax_uid for r in first}) >= 2  # the mix is exercised
    assert {r.image_id for r in first}.isdisjoint({r.image_id for r in other})


def test_more_studies_keep_the_first_ones(tmp_path: Path) -> None:
    small = synth.generate(tmp_path / "a", 1, 2, seed=8, size=SMALL, layout="rsna")
    big = synth.generate(tmp_path / "b", 2, 2, seed=8, size=SMALL, layout="rsna")
    for r_small, r_big in zip(small, big):
        assert r_small.path.read_bytes() == r_big.path.read_bytes()


def test_labels_exact_and_any_consistent(tmp_path: Path) -> None:
    records = synth.generate(tmp_path, 4, 6, seed=12, size=192)
    for rec in records:
        assert list(rec.labels) == list(LABELS)
        assert set(rec.labels.values()) <= {0, 1}
        assert rec.labels["any"] == max(rec.labels[s] for s in SUBTYPES)
        image, masks = synth.render_record(rec)
        spacing = float(pydicom.dcmread(rec.path, stop_before_pixels=True).PixelSpacing[0])
        for name in SUBTYPES:
            expected = int(name in rec.drawn and synth.is_visible(masks[name], spacing))
            assert rec.labels[name] == expected, (rec.image_id, name)
        # The file holds exactly the image the masks belong to.
        ds = pydicom.dcmread(rec.path)
        convention = synth.SCANNER_CONVENTIONS[rec.convention]
        lo, hi = convention.hu_range
        assert np.abs(file_hu(ds) - np.clip(image, lo, hi)).max() <= 1.0
        if not rec.drawn:
            assert rec.labels["any"] == 0


def test_positive_fraction_and_all_subtypes(tmp_path: Path) -> None:
    records = synth.generate(tmp_path, 8, 10, seed=3, size=192, transfer_syntaxes="ExplicitVRLittleEndian")
    positives = sum(r.labels["any"] for r in records)
    assert 0.4 <= positives / len(records) <= 0.6
    counts = {name: sum(r.labels[name] for r in records) for name in SUBTYPES}
    assert all(count >= 5 for count in counts.values()), counts
    # Balanced-ish: no subtype more than three times as frequent as another.
    assert max(counts.values()) <= 3 * min(counts.values())
    per_slice = [sum(r.labels[s] for s in SUBTYPES) for r in records if r.labels["any"]]
    assert set(per_slice) <= {1, 2, 3}


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_positive_fraction_extremes(tmp_path: Path, fraction: float) -> None:
    records = synth.generate(tmp_path, 2, 3, seed=1, size=SMALL, positive_fraction=fraction)
    assert {r.labels["any"] for r in records} == {int(fraction)}


def test_rsna_layout_and_csv(tmp_path: Path) -> None:
    out = tmp_path / "new" / "nested"  # need not exist
    records = synth.generate(out, 2, 3, seed=4, layout="rsna", size=SMALL)
    files = sorted((out / "stage_2_train").iterdir())
    assert [f.name for f in files] == sorted(f"{r.image_id}.dcm" for r in records)
    for rec in records:
        assert re.fullmatch(r"ID_[0-9a-f]{12}", rec.image_id)
        assert rec.path == out / "stage_2_train" / f"{rec.image_id}.dcm"
    text = (out / "stage_2_train.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == "ID,Label"
    assert len(lines) == 1 + 6 * len(records)
    expected = [
        f"{rec.image_id}_{label},{rec.labels[label]}" for rec in records for label in LABELS
    ]
    assert lines[1:] == expected
    assert all(re.fullmatch(r"ID_[0-9a-f]{12}_[a-z]+,[01]", line) for line in lines[1:])
    assert text.endswith("\n") and "\r" not in text


def test_pacs_layout_and_dicom_attributes(tmp_path: Path) -> None:
    records = synth.generate(tmp_path / "pacs", 2, 2, seed=9, size=SMALL)
    assert len({r.study_instance_uid for r in records}) == 2
    for rec in records:
        rel = rec.path.relative_to(tmp_path / "pacs").parts
        assert rel == (
            rec.patient_id,
            rec.study_instance_uid,
            rec.series_instance_uid,
            f"{rec.sop_instance_uid}.dcm",
        )
        assert re.fullmatch(r"PHANTOM-9-\d+", rec.patient_id)
        ds = pydicom.dcmread(rec.path)
        assert ds.preamble == b"\x00" * 128
        meta = ds.file_meta
        assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert meta.MediaStorageSOPInstanceUID == rec.sop_instance_uid
        assert meta.TransferSyntaxUID == rec.transfer_syntax_uid
        assert meta.ImplementationClassUID
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                    ds.FrameOfReferenceUID):
            assert UID_RE.match(uid) and len(uid) <= 64
        assert ds.SOPInstanceUID == rec.sop_instance_uid
        assert ds.StudyInstanceUID == rec.study_instance_uid
        assert ds.SeriesInstanceUID == rec.series_instance_uid
        assert ds.Modality == "CT"
        assert ds.PatientID == rec.patient_id
        assert str(ds.PatientName) == f"Phantom^{rec.patient_id.rsplit('-', 1)[1]}"
        assert re.fullmatch(r"\d{8}", ds.StudyDate)
        assert ds.InstanceNumber == rec.slice_index + 1
        assert len(ds.ImagePositionPatient) == 3
        assert [float(x) for x in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceThickness) == 5.0
        assert ds.Rows == ds.Columns == SMALL
        assert ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsAllocated == 16 and ds.HighBit == ds.BitsStored - 1
        assert ds.PixelRepresentation in (0, 1)
        assert float(ds.RescaleSlope) == 1.0 and ds.RescaleType == "HU"
        assert float(ds.WindowCenter) == 40 and float(ds.WindowWidth) == 80
        assert 0.2 < float(ds.PixelSpacing[0]) == float(ds.PixelSpacing[1]) < 3.0
    # Slices of a study are 5 mm apart and share the frame of reference.
    study0 = [pydicom.dcmread(r.path) for r in records if r.study_index == 0]
    assert float(study0[1].ImagePositionPatient[2]) - float(study0[0].ImagePositionPatient[2]) == 5.0
    assert study0[0].FrameOfReferenceUID == study0[1].FrameOfReferenceUID


def test_sizes_vary_and_can_be_forced(tmp_path: Path) -> None:
    varied = synth.generate(tmp_path / "v", 4, 1, seed=2, transfer_syntaxes=[ExplicitVRLittleEndian])
    sizes = {r.size for r in varied}
    assert all(400 <= s <= 640 for s in sizes) and len(sizes) > 1
    spacings = []
    for rec in varied:
        ds = pydicom.dcmread(rec.path)
        assert ds.Rows == ds.Columns == rec.size
        spacings.append(float(ds.PixelSpacing[0]) * rec.size)
    assert all(200 <= fov <= 270 for fov in spacings)  # head size in mm stays plausible
    forced = synth.generate(
        tmp_path / "f", 2, 1, seed=2, size=96, transfer_syntaxes=[DeflatedExplicitVRLittleEndian]
    )
    for rec in forced:
        ds = pydicom.dcmread(rec.path)
        assert (ds.Rows, ds.Columns) == (96, 96)
        assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


def test_generate_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        synth.generate(tmp_path, 1, 1, seed=0, layout="flat")
    with pytest.raises(ValueError, match="seed"):
        synth.generate(tmp_path, 1, 1, seed=-1)
    with pytest.raises(ValueError, match="positive_fraction"):
        synth.generate(tmp_path, 1, 1, seed=0, positive_fraction=1.5)
    with pytest.raises(ValueError, match="transfer syntax"):
        synth.generate(tmp_path, 1, 1, seed=0, transfer_syntaxes=["nope"])
    with pytest.raises(ValueError, match="convention"):
        synth.generate(tmp_path, 1, 1, seed=0, conventions=["nope"])


def test_uids_unique_across_many_studies(tmp_path):
    """Study 1 slice 23 and study 12 slice 3 once shared a SOPInstanceUID."""
    records = synth.generate(tmp_path, studies=13, slices=25, seed=3, size=64, transfer_syntaxes=["ExplicitVRLittleEndian"])
    assert len({r.sop_instance_uid for r in records}) == len(records) == 325
    assert len({r.study_instance_uid for r in records}) == 13
    assert len({r.series_instance_uid for r in records}) == 13


# ------------------------------------------------------------------------------------------
# Styles
# ------------------------------------------------------------------------------------------

#: Computed with the generator before styles existed (commit c36ec00): see
#: ``default_output_digest``. It covers pixels, labels, image ids and geometry, not the
#: whole files (pydicom writes its own version into them). Float rounding may differ on
#: another platform or numpy; then regenerate it from c36ec00 there.
DEFAULT_DIGEST = "9c4c9456e8233176e98fb7e1f17adbbd0741239e091bc21386b39a98fbc5215f"


def default_output_digest(out: Path, **kwargs: object) -> str:
    records = synth.generate(
        out, 3, 4, seed=2026, size=64, layout="rsna", transfer_syntaxes="ExplicitVRLittleEndian", **kwargs
    )
    digest = hashlib.sha256()
    for rec in records:
        ds = pydicom.dcmread(rec.path)
        digest.update(rec.image_id.encode())
        digest.update(repr(sorted(rec.labels.items())).encode())
        digest.update(ds.pixel_array.tobytes())
        for keyword in ("RescaleIntercept", "BitsStored", "PixelRepresentation", "PixelSpacing",
                        "ImagePositionPatient", "SliceThickness"):
            digest.update(str(ds.get(keyword)).encode())
    digest.update((out / "stage_2_train.csv").read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("style", [None, "default", synth.SynthStyle()], ids=["none", "name", "object"])
def test_default_style_reproduces_the_original_output(tmp_path: Path, style: object) -> None:
    assert default_output_digest(tmp_path, style=style) == DEFAULT_DIGEST


def test_style_presets_and_overrides() -> None:
    assert synth.STYLES["default"] == synth.SynthStyle()
    assert {"default", "small-faint", "sharp-large"} <= set(synth.STYLES)
    faint = synth.STYLES["small-faint"]
    assert faint.head_scale < 1 and faint.bleed_scale < 1 and faint.bleed_contrast < 1
    assert faint.noise_scale > 1 and faint.blur_mm > 0 and faint.edge_mm > 0
    sharp = synth.STYLES["sharp-large"]
    assert sharp.bleed_scale > 1 and sharp.sharpen > 0
    for style in synth.STYLES.values():
        assert set(style.conventions) <= set(synth.SCANNER_CONVENTIONS)
    mixed = synth.resolve_style("small-faint", noise_scale=3.0, sharpen=None, conventions=["signed16"])
    assert mixed.noise_scale == 3.0 and mixed.head_scale == faint.head_scale
    assert mixed.conventions == ("signed16",) and hash(mixed)
    assert synth.SynthStyle().describe() == "default look"
    assert "noise_scale=3" in mixed.describe()
    with pytest.raises(ValueError, match="unknown style"):
        synth.resolve_style("glossy")
    with pytest.raises(ValueError, match="head_scale"):
        synth.SynthStyle(head_scale=2.0)
    with pytest.raises(ValueError, match="window"):
        synth.SynthStyle(window=(40.0, 0.0))


def styled_pair(style: synth.SynthStyle, bleeds: list[str], size: int = 128, seed: int = 3,
                z: float = 0.5) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(without, with, masks) of one slice in ``style``: the same head, texture and noise."""
    anatomy = synth.make_anatomy(np.random.default_rng(500 + seed))
    without = synth.render_slice(np.random.default_rng(seed), size, [], z, anatomy, style)
    with_, masks = synth.render_slice_with_masks(np.random.default_rng(seed), size, bleeds, z, anatomy, style)
    return without, with_, masks


def test_head_scale_changes_the_head_area_in_the_field_of_view() -> None:
    anatomy = synth.make_anatomy(np.random.default_rng(8))
    small = synth.SynthStyle(head_scale=0.7)
    areas = {}
    for style in (synth.SynthStyle(), small):
        img = synth.render_slice(np.random.default_rng(1), SMALL, [], 0.5, anatomy, style)
        areas[style.head_scale] = float(np.mean(img > -500))
    assert 0.28 <= areas[1.0] <= 0.5  # the default head spans about 80% of the field
    assert 0.42 <= areas[0.7] / areas[1.0] <= 0.56  # 0.7 ** 2 = 0.49
    assert synth.pixel_spacing_mm(anatomy, SMALL, small) == pytest.approx(
        synth.pixel_spacing_mm(anatomy, SMALL) / 0.7, rel=1e-4)


def test_bleed_scale_changes_bleed_size() -> None:
    area = {}
    for scale in (1.0, 0.6):
        style = synth.SynthStyle(bleed_scale=scale)
        area[scale] = sum(int(styled_pair(style, [name], 192)[2][name].sum()) for name in SUBTYPES)
    assert area[1.0] > 1000
    assert 0.15 <= area[0.6] / area[1.0] <= 0.6  # lengths 0.6x: areas about 0.36x


def test_bleed_contrast_scales_the_rise_in_hu() -> None:
    without, full, masks = styled_pair(synth.SynthStyle(), ["intraparenchymal", "subdural"], 192)
    _, faint, _ = styled_pair(synth.SynthStyle(bleed_contrast=0.6), ["intraparenchymal", "subdural"], 192)
    for name, mask in masks.items():
        rise_full = (full - without)[mask]
        rise_faint = (faint - without)[mask]
        assert float(rise_full.mean()) >= 25  # HU over the tissue it covers
        # Same noise, same shape: only the density difference shrinks, to 0.6 of it.
        np.testing.assert_allclose(rise_faint, 0.6 * rise_full, atol=0.05)


def air(img: np.ndarray, n: int = 12) -> np.ndarray:
    return np.concatenate([img[:n, :n].ravel(), img[:n, -n:].ravel(), img[-n:, :n].ravel(), img[-n:, -n:].ravel()])


def test_noise_scale_changes_noise_std_in_a_uniform_region() -> None:
    anatomy = synth.make_anatomy(np.random.default_rng(2))
    std = {}
    for scale in (1.0, 2.5, 0.0):
        img = synth.render_slice(np.random.default_rng(4), SMALL, [], 0.5, anatomy, synth.SynthStyle(noise_scale=scale))
        std[scale] = float(air(img).std())
    assert std[1.0] == pytest.approx(anatomy["noise_sigma"], rel=0.15)
    assert std[2.5] == pytest.approx(2.5 * std[1.0], rel=1e-3)  # the same normal draws, scaled
    assert std[0.0] == 0.0


def max_step(img: np.ndarray) -> float:
    return float(np.abs(np.diff(img, axis=1)).max())


def test_soft_bleed_edges_ramp_instead_of_stepping() -> None:
    hard_without, hard, hard_masks = styled_pair(synth.SynthStyle(), ["intraparenchymal"], 256)
    soft_without, soft, soft_masks = styled_pair(synth.SynthStyle(edge_mm=1.5), ["intraparenchymal"], 256)
    hard_rise, soft_rise = hard - hard_without, soft - soft_without
    assert max_step(soft_rise) < 0.6 * max_step(hard_rise)
    # More pixels part-way between tissue and bleed (partial volume), yet still a visible bleed.
    def partial(rise: np.ndarray) -> int:
        return int(np.count_nonzero((rise > 3) & (rise < 0.5 * rise.max())))
    assert partial(soft_rise) > 2 * partial(hard_rise)
    assert 0 < soft_masks["intraparenchymal"].sum() <= hard_masks["intraparenchymal"].sum()


def test_kernel_changes_edge_sharpness_and_noise() -> None:
    anatomy = synth.make_anatomy(np.random.default_rng(6))
    looks = {
        "standard": synth.SynthStyle(),
        "soft": synth.SynthStyle(blur_mm=1.2),
        "sharp": synth.SynthStyle(sharpen=1.0),
    }
    step, noise = {}, {}
    for name, style in looks.items():
        quiet = synth.render_slice(np.random.default_rng(2), 256, [], 0.5, anatomy, style.replace(noise_scale=0.0))
        step[name] = max_step(quiet)  # the sharpest edge: skull against air and scalp
        noisy = synth.render_slice(np.random.default_rng(2), 256, [], 0.5, anatomy, style)
        noise[name] = float(air(noisy, 20).std())
    assert step["soft"] < 0.7 * step["standard"] < 0.7 * step["sharp"]
    assert noise["soft"] < 0.6 * noise["standard"] < 0.6 * noise["sharp"]
    # A sharp kernel overshoots at edges (dark rims in the air beside the skull).
    quiet_sharp = synth.render_slice(np.random.default_rng(2), 256, [], 0.5, anatomy, looks["sharp"].replace(noise_scale=0.0))
    assert float(quiet_sharp.min()) < -1050


@pytest.mark.parametrize("style", ["small-faint", "sharp-large"])
def test_styled_files_labels_and_conventions(tmp_path: Path, style: str) -> None:
    look = synth.STYLES[style]
    records = synth.generate(tmp_path, 3, 4, seed=7, size=160, style=style, layout="rsna")
    assert {r.convention for r in records} <= set(look.conventions)
    assert all(r.style == look for r in records)
    for rec in records:
        ds = pydicom.dcmread(rec.path)
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == look.window
        image, masks = synth.render_record(rec)
        spacing = float(ds.PixelSpacing[0])
        for name in SUBTYPES:
            expected = int(name in rec.drawn and synth.is_visible(masks[name], spacing))
            assert rec.labels[name] == expected, (rec.image_id, name)
        lo, hi = synth.SCANNER_CONVENTIONS[rec.convention].hu_range
        assert np.abs(file_hu(ds) - np.clip(image, lo, hi)).max() <= 1.0
        # The screening reader (RSNA 12-bit fix included) sees the same picture.
        decoded = decode_instance(rec.path)
        assert np.abs(decoded.hu() - np.clip(image, lo, hi)).max() <= 1.0, decoded.error
    assert sum(r.labels["any"] for r in records) >= 2
    if style == "small-faint":
        assert "rsna12_quirk" in {r.convention for r in records}  # the wrap is exercised


def test_style_conventions_give_way_to_explicit_ones(tmp_path: Path) -> None:
    records = synth.generate(tmp_path, 2, 1, seed=1, size=64, style="small-faint", conventions=["signed16"])
    assert {r.convention for r in records} == {"signed16"}


# ------------------------------------------------------------------------------------------
# Volumetric mode
# ------------------------------------------------------------------------------------------


def by_series(records: list[synth.SynthRecord]) -> dict[str, list[synth.SynthRecord]]:
    out: dict[str, list[synth.SynthRecord]] = {}
    for rec in records:
        out.setdefault(rec.series_instance_uid, []).append(rec)
    return {uid: sorted(recs, key=lambda r: r.slice_index) for uid, recs in out.items()}


@pytest.mark.parametrize("layout", ["pacs", "rsna"])
def test_volumetric_series_geometry(tmp_path: Path, layout: str) -> None:
    from ichscan.dicom import slice_position

    records = synth.generate(tmp_path, 2, 6, seed=4, size=64, volumetric=True, layout=layout)
    assert all(r.volumetric for r in records)
    for recs in by_series(records).values():
        files = [pydicom.dcmread(r.path, stop_before_pixels=True) for r in recs]
        spacing = float(files[0].SpacingBetweenSlices)
        assert spacing == float(files[0].SliceThickness) == 5.0
        geometry = [slice_position(ds) for ds in files]
        positions = [p for p, _ in geometry]
        assert all(s == spacing for _, s in geometry)
        assert np.allclose(np.diff(positions), spacing, atol=1e-6)  # increasing, constant
        assert np.allclose(np.diff([r.z_mm for r in recs]), spacing)  # and so is the anatomy
        for ds in files:
            assert [float(x) for x in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert ds.ImagePositionPatient[:2] == files[0].ImagePositionPatient[:2]
            assert ds.FrameOfReferenceUID == files[0].FrameOfReferenceUID
            assert ds.PixelSpacing == files[0].PixelSpacing
    if layout == "rsna":
        lines = (tmp_path / "stage_2_train.csv").read_text().splitlines()
        assert lines[1:] == [f"{r.image_id}_{label},{r.labels[label]}" for r in records for label in LABELS]


def test_volumetric_stack_shrinks_its_spacing_to_fit_the_head() -> None:
    from ichscan.synth_volume import HEAD_HEIGHT_MM, stack_positions

    positions, spacing = stack_positions(np.random.default_rng(0), 60, 5.0)
    assert spacing < 5.0 and round(spacing, 3) == spacing
    assert 0 < positions[0] and positions[-1] < HEAD_HEIGHT_MM
    assert np.allclose(np.diff(positions), spacing)


@pytest.fixture(scope="module")
def volume_records(tmp_path_factory: pytest.TempPathFactory) -> list[synth.SynthRecord]:
    out = tmp_path_factory.mktemp("volume")
    return synth.generate(out, 5, 8, seed=21, size=128, volumetric=True, positive_fraction=0.8,
                          transfer_syntaxes="ExplicitVRLittleEndian")


def test_volumetric_labels_match_the_drawn_masks(volume_records: list[synth.SynthRecord]) -> None:
    for rec in volume_records:
        # A bleed is drawn on a slice iff the slice cuts it ...
        crossing = rec.cross_sections()
        assert set(rec.drawn) == set(crossing)
        assert {b.name for b in rec.volume_bleeds} >= set(crossing)
        # ... and labelled iff that cross-section passes the visibility rule.
        ds = pydicom.dcmread(rec.path)
        image, masks = synth.render_record(rec)
        for name in SUBTYPES:
            expected = int(name in rec.drawn and synth.is_visible(masks[name], float(ds.PixelSpacing[0])))
            assert rec.labels[name] == expected, (rec.image_id, name)
        assert rec.labels["any"] == max(rec.labels[s] for s in SUBTYPES)
        lo, hi = synth.SCANNER_CONVENTIONS[rec.convention].hu_range
        assert np.abs(file_hu(ds) - np.clip(image, lo, hi)).max() <= 1.0


def test_volumetric_bleeds_span_neighbouring_slices_and_fade(volume_records: list[synth.SynthRecord]) -> None:
    series = by_series(volume_records)
    assert sum(any(r.labels["any"] for r in recs) for recs in series.values()) >= 3
    assert any(not any(r.labels["any"] for r in recs) for recs in series.values())  # negative studies too
    bleeds = 0
    for recs in series.values():
        masks = [synth.render_record(r)[1] for r in recs]
        for bleed in recs[0].volume_bleeds:
            bleeds += 1
            positive = [r.labels[bleed.name] for r in recs]
            runs = "".join(map(str, positive)).split("0")
            assert max(len(run) for run in runs) >= 2, (bleed, positive)
            # Neighbouring cuts of one bleed overlap in-plane: a neighbour shows the same bleed.
            for i in range(len(recs) - 1):
                if positive[i] and positive[i + 1]:
                    assert np.count_nonzero(masks[i][bleed.name] & masks[i + 1][bleed.name]) > 0
            # The bleed fades towards its ends: smaller and fainter cross-sections there.
            factors = [r.cross_sections().get(bleed.name) for r in recs]
            cut = [f for f in factors if f is not None]
            assert min(size for size, _ in cut) < max(size for size, _ in cut) <= 1.0
    assert bleeds >= 4


def test_volumetric_faint_ends_exist_next_to_clear_cuts(volume_records: list[synth.SynthRecord]) -> None:
    """The case slice context is for: a faint or partial cut beside a full-contrast neighbour."""
    found = 0
    for recs in by_series(volume_records).values():
        for i, rec in enumerate(recs):
            for name, (size, contrast) in rec.cross_sections().items():
                neighbours = [recs[j].cross_sections().get(name) for j in (i - 1, i + 1) if 0 <= j < len(recs)]
                if contrast < 1.0 and any(n is not None and n[1] == 1.0 and n[0] > size for n in neighbours):
                    found += 1
    assert found >= 3


def test_volumetric_slices_show_one_head(tmp_path: Path) -> None:
    """Neighbouring slices share the anatomy (shifted a little), unlike independent slices."""
    quiet = synth.SynthStyle(noise_scale=0.0)

    def neighbour_correlation(volumetric: bool) -> float:
        records = synth.generate(tmp_path / str(volumetric), 1, 4, seed=5, size=SMALL, style=quiet,
                                 positive_fraction=0.0, volumetric=volumetric)
        images = [synth.render_record(r)[0] for r in records]
        brain = np.all([(img > 15) & (img < 50) for img in images], axis=0)
        return float(np.mean([np.corrcoef(a[brain], b[brain])[0, 1] for a, b in zip(images, images[1:])]))

    assert neighbour_correlation(True) > 0.7
    assert neighbour_correlation(True) > neighbour_correlation(False) + 0.2


def test_volumetric_reproducible_and_more_studies_keep_the_first(tmp_path: Path) -> None:
    kwargs = dict(slices=4, seed=9, size=64, volumetric=True, layout="rsna", positive_fraction=1.0)
    small = synth.generate(tmp_path / "a", 1, **kwargs)
    big = synth.generate(tmp_path / "b", 2, **kwargs)
    synth.generate(tmp_path / "c", 2, **kwargs)
    for r_small, r_big in zip(small, big):
        assert r_small.path.read_bytes() == r_big.path.read_bytes()
    assert tree_bytes(tmp_path / "b") == tree_bytes(tmp_path / "c")
    plain = synth.generate(tmp_path / "d", 1, 4, seed=9, size=64, layout="rsna", positive_fraction=1.0)
    assert [r.image_id for r in plain] == [r.image_id for r in small]  # same ids, other pixels
    assert plain[0].path.read_bytes() != small[0].path.read_bytes()


def test_synth_cli_style_and_volumetric(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ichscan.cli import cli

    help_text = CliRunner().invoke(cli, ["synth", "--help"]).output
    for option in ("--style", "--head-scale", "--bleed-scale", "--bleed-contrast", "--edge-mm", "--noise-scale",
                   "--blur-mm", "--sharpen", "--convention", "--window", "--slice-mm", "--volumetric"):
        assert option in help_text
    for name in synth.STYLES:
        assert f"{name}:" in help_text  # the presets are listed with their values
    out = tmp_path / "set"
    result = CliRunner().invoke(cli, [
        "synth", str(out), "--studies", "2", "--slices", "4", "--size", "64", "--layout", "rsna", "--volumetric",
        "--style", "small-faint", "--head-scale", "0.8", "--window", "35/90", "--convention", "signed16",
    ])
    assert result.exit_code == 0, result.output
    assert "wrote 8 slices" in result.output and "head_scale=0.8" in result.output
    lines = (out / "stage_2_train.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 * 8
    ds = pydicom.dcmread(next((out / "stage_2_train").iterdir()))
    assert float(ds.SpacingBetweenSlices) == 5.0 and ds.PixelRepresentation == 1
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (35.0, 90.0)
    bad = CliRunner().invoke(cli, ["synth", str(out), "--bleed-contrast", "9"])
    assert bad.exit_code == 2 and "bleed_contrast" in bad.output
