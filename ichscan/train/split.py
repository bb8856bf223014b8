"""Train/validation/test split by patient, so no patient's images leak across splits."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom

from ichscan.durable import replacing

SPLITS = ("train", "validation", "test")
FRACTIONS = (0.8, 0.1, 0.1)


def patient_key(path: str | os.PathLike[str]) -> str:
    """PatientID, else StudyInstanceUID, else the file name (one image = one 'patient')."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
        patient = str(ds.get("PatientID", "") or "").strip()
        if patient:
            return f"patient:{patient}"
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        if study:
            return f"study:{study}"
    except Exception:  # noqa: BLE001 - unreadable here is dealt with by the dataset
        pass
    return f"file:{Path(path).name}"


def split_by_patient(
    image_patients: dict[str, str], seed: int, fractions: tuple[float, float, float] = FRACTIONS
) -> dict[str, str]:
    """Assign each image to train/validation/test; every patient's images to one split.

    Patients are shuffled with ``seed`` and dealt out until each split holds about its
    fraction of the images (greedy, largest deficit first), so the image counts come
    close to 80/10/10 even when patients have different numbers of images.
    """
    by_patient: dict[str, list[str]] = {}
    for image, patient in sorted(image_patients.items()):
        by_patient.setdefault(patient, []).append(image)
    patients = sorted(by_patient)
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    total = len(image_patients)
    counts = [0, 0, 0]
    assignment: dict[str, str] = {}
    for patient in patients:
        images = by_patient[patient]
        deficits = [fractions[i] * total - counts[i] for i in range(3)]
        choice = int(np.argmax(deficits))
        counts[choice] += len(images)
        for image in images:
            assignment[image] = SPLITS[choice]
    return assignment


def write_split(path: str | os.PathLike[str], assignment: dict[str, str], image_patients: dict[str, str]) -> None:
    with replacing(Path(path)) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "patient", "split"])
        for image in sorted(assignment):
            writer.writerow([image, image_patients.get(image, ""), assignment[image]])


def read_split(path: str | os.PathLike[str]) -> dict[str, str]:
    """``image id -> split`` from a split.csv written by ``ichscan train``."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image_id", "split"} <= set(reader.fieldnames):
            raise ValueError(f"{path} is not a split file (columns image_id, split)")
        result = {}
        for row in reader:
            if row["split"] not in SPLITS:
                raise ValueError(f"{path}: unknown split {row['split']!r}")
            result[row["image_id"]] = row["split"]
    return result


def images_in(assignment: dict[str, str], split: str) -> list[str]:
    return sorted(image for image, s in assignment.items() if s == split)


def patient_keys(paths: Iterable[tuple[str, Path]]) -> dict[str, str]:
    return {image: patient_key(path) for image, path in paths}
