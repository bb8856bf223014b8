"""examples/systemd: the units pass ``systemd-analyze verify`` (with this environment's
``ichscan`` in ExecStart), their command lines parse, and the stop timeout leaves room
for the graceful stop."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ICHSCAN, ROOT

UNITS = sorted((ROOT / "examples" / "systemd").glob("*.service"))
INSTALLED_PATH = "/opt/ichscan/bin/ichscan"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
needs_systemd_analyze = pytest.mark.skipif(
    not Path(SYSTEMD_ANALYZE).exists(), reason="systemd-analyze is not installed (it comes with systemd)"
)


def directives(text: str) -> dict[str, list[str]]:
    """``key -> values`` of a unit file, continuation lines joined (every section together)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, list[str]] = {}
    for line in joined.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def local_copy(unit: Path, folder: Path, text: str | None = None) -> Path:
    """The unit with this environment's ichscan in ExecStart, in ``folder`` under its own name."""
    text = unit.read_text() if text is None else text
    assert INSTALLED_PATH in text
    copy = folder / unit.name
    copy.write_text(text.replace(INSTALLED_PATH, str(ICHSCAN)))
    return copy


def verify_problems(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about ``unit``.

    verify exits 0 after an unknown directive or an unparsable value (it warns,
    'ignoring'), so every line that names the unit counts; lines about the host's
    other units do not. User= and missing ReadWritePaths= are not checked by verify,
    so a build machine without an ``ichscan`` user passes.
    """
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if unit.name in line]
    if proc.returncode != 0 and not lines:
        lines = [f"exit status {proc.returncode}: {proc.stderr.strip()}"]
    return lines


def test_units_are_there():
    assert {u.name for u in UNITS} == {"ichscan-watch.service", "ichscan-serve-scp.service"}


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_passes_systemd_analyze_verify(unit, tmp_path):
    assert verify_problems(local_copy(unit, tmp_path)) == []


@needs_systemd_analyze
@pytest.mark.parametrize(
    "change, expected",
    [
        (("ProtectHome=yes", "ProtectHomme=yes"), "Unknown key"),
        (("Restart=on-failure", "Restart=sometimes"), "restart specifier"),
        (("ProtectSystem=strict", "ProtectSystem=strictest"), "protect system"),
        ((INSTALLED_PATH, "/nonexistent/bin/ichscan"), "not executable"),
    ],
    ids=["misspelt-directive", "bad-restart", "bad-protect-system", "missing-binary"],
)
def test_verify_catches_a_broken_unit(tmp_path, change, expected):
    unit = UNITS[0]
    broken = unit.read_text().replace(*change, 1)
    assert broken != unit.read_text()
    if change[0] == INSTALLED_PATH:  # keep the broken path: the copy only swaps the installed one
        copy = tmp_path / unit.name
        copy.write_text(broken)
    else:
        copy = local_copy(unit, tmp_path, broken)
    problems = verify_problems(copy)
    assert any(expected in line for line in problems), problems


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_command_line_parses_and_stop_leaves_room_to_drain(unit):
    keys = directives(unit.read_text())
    argv = shlex.split(keys["ExecStart"][0])
    assert argv[0] == INSTALLED_PATH
    assert argv[1:3] == ["--log-format", "json"] and "--metrics-port" in argv
    # Every option is one ichscan knows (--help is eager, but unknown options fail first).
    proc = subprocess.run([str(ICHSCAN), *argv[1:], "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

    def option(name: str, default: float) -> float:
        return float(argv[argv.index(name) + 1]) if name in argv else default

    drain = option("--drain-timeout", 30.0) if "serve-scp" in argv else 0.0
    assert float(keys["TimeoutStopSec"][0]) > drain + option("--forward-wait", 30.0) + 20
    assert keys["KillSignal"] == ["SIGTERM"] and keys["KillMode"] == ["mixed"]
    assert keys["User"] == ["ichscan"] and keys["Group"] == ["ichscan"]
    for hardening in ("ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes", "Restart=on-failure"):
        key, value = hardening.split("=")
        assert keys[key] == [value]
    assert keys["ReadWritePaths"] == ["/var/lib/ichscan"]
    assert all(p.startswith("/var/lib/ichscan/") for p in argv if p.startswith("/") and p != INSTALLED_PATH)


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exposure_stays_low(unit, tmp_path):
    """systemd's own security review, offline: the hardening keeps the unit at 'OK' (< 2.0)."""
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(local_copy(unit, tmp_path))], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    if match is None:
        pytest.skip(f"this systemd-analyze has no offline security review: {proc.stderr.strip()[:200]}")
    assert float(match.group(1)) < 2.0, proc.stdout
