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


def test_remove_orphaned_temporaries_takes_only_files_of_dead_processes(tmp_path):
    import subprocess
    import sys

    from ichscan.durable import remove_orphaned_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        series = tmp_path / "1.2" / "1.2.3"
        series.mkdir(parents=True)
        orphan = series / f".1.2.3.4.dcm.{dead_pid}.140000000000.tmp"
        ours = series / f".1.2.3.5.dcm.{os.getpid()}.140000000000.tmp"
        other = series / f".1.2.3.6.dcm.{live.pid}.140000000000.tmp"
        kept = [ours, other, series / "1.2.3.7.dcm", series / ".notes.tmp", series / f"1.2.3.8.dcm.{dead_pid}.1.tmp"]
        hidden_dir = tmp_path / ".trash"
        hidden_dir.mkdir()
        kept.append(hidden_dir / f".x.dcm.{dead_pid}.1.tmp")
        for path in [orphan, *kept]:
            path.write_bytes(b"half")
        assert remove_orphaned_temporaries(tmp_path) == 1
        assert not orphan.exists()
        assert all(path.exists() for path in kept)
        assert remove_orphaned_temporaries(tmp_path) == 0
    finally:
        live.kill()
        live.wait()
