"""Atomic and durable writes: a target is the old file or the new one, never a torn one."""

import os

import pytest

from ichscan.durable import rename_durably, replacing, temporary_name, write_durably


def test_replacing_swaps_the_file_in_whole(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    with replacing(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the rename
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["report.html"]


@pytest.mark.parametrize("durable", [False, True])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, durable):
    target = tmp_path / "studies.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(target, durable=durable) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["studies.csv"]


def test_write_durably_and_rename_durably(tmp_path):
    write_durably(tmp_path / "a.dcm", b"DICM" * 1000)
    assert (tmp_path / "a.dcm").read_bytes() == b"DICM" * 1000
    tmp = temporary_name(tmp_path / "b.dcm")
    tmp.write_bytes(b"b")
    rename_durably([(tmp, tmp_path / "b.dcm")])
    assert sorted(os.listdir(tmp_path)) == ["a.dcm", "b.dcm"]
    assert temporary_name(tmp_path / "b.dcm").name.startswith(".")  # hidden from folder walks
