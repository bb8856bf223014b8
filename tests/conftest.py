"""Shared test fixtures.

Bundled DICOM files are listed straight from disk: never call
``pydicom.data.get_testdata_file(s)``, which tries to download and hangs offline.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def bundled_dicom_roots() -> list[Path]:
    """pydicom's own test files, plus the pydicom-data package's files when installed."""
    import pydicom

    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # the pydicom-data package
    except ImportError:
        pass
    else:
        roots.append(Path(data_store.__file__).parent / "data")
    return [root for root in roots if root.is_dir()]


def list_bundled_dicom_files() -> list[Path]:
    """Every regular file under the bundled roots (DICOM or not: README, .json, .gz...), sorted."""
    return [
        path
        for root in bundled_dicom_roots()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    ]


def bundled_id(path: Path) -> str:
    """A short, stable test id: the path below its bundled root."""
    for root in bundled_dicom_roots():
        if path.is_relative_to(root):
            return f"{'pydicom' if root.name == 'test_files' else 'pydicom-data'}/{path.relative_to(root)}"
    return str(path)


@pytest.fixture(scope="session")
def bundled_dicom_files() -> list[Path]:
    files = list_bundled_dicom_files()
    if not files:
        pytest.skip("no bundled DICOM test files (pydicom's test_files missing)")
    return files


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # One test per bundled file for any test that takes the `bundled_dicom_file` argument.
    if "bundled_dicom_file" in metafunc.fixturenames:
        files = list_bundled_dicom_files()
        metafunc.parametrize("bundled_dicom_file", files, ids=[bundled_id(p) for p in files])


@pytest.fixture(scope="session")
def make_phantoms(tmp_path_factory: pytest.TempPathFactory):
    """A factory: ``make_phantoms(name, **generate_args)`` writes synthetic phantoms
    (``ichscan.synth.generate``) to a new temporary folder and returns ``(folder, records)``.
    Session-scoped so module-scoped fixtures can build their phantom folders with it."""
    from ichscan.synth import generate

    def make(name: str = "phantoms", **generate_args) -> tuple[Path, list]:
        folder = tmp_path_factory.mktemp(name)
        return folder, generate(folder, **generate_args)

    return make
