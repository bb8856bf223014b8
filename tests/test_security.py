"""Checkpoints are untrusted input: loading one never runs code from it (torch.load with
weights_only=True everywhere), and a tampered file is refused with one line."""

import re
import subprocess
import sys

import torch

from helpers import CT_SMALL, ROOT


class _Payload:
    """Pickled, it asks the unpickler to run a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _malicious(path, marker, extra=None):
    torch.save({"format": "ichscan-checkpoint", "state_dict": _Payload(marker), **(extra or {})}, path)
    return path


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ichscan", *args], capture_output=True, text=True, timeout=300)


def test_a_malicious_checkpoint_runs_no_code_and_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    weights = _malicious(tmp_path / "evil.pt", marker)
    # Unpickled without weights_only, this file runs the command (the threat is real).
    torch.load(weights, weights_only=False)
    assert marker.exists()
    marker.unlink()
    for args in (["predict", str(CT_SMALL), "--weights", str(weights)], ["batch", str(CT_SMALL.parent), "--weights", str(weights), "--out", str(tmp_path / "r.csv")]):
        done = _run(*args)
        assert done.returncode != 0
        assert "not an ichscan checkpoint" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not marker.exists()


def test_a_malicious_last_checkpoint_is_refused_on_resume(tmp_path, make_phantoms):
    data = make_phantoms("security-rsna", studies=4, slices=2, seed=3, layout="rsna", size=64)[0]
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    _malicious(run / "last.pt", marker)
    done = _run("train", str(data), "--labels", str(data / "stage_2_train.csv"), "--out", str(run), "--resume", "--workers", "0", "--no-progress")
    assert done.returncode == 1, done.stderr
    assert "cannot resume from" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in (ROOT / "ichscan").rglob("*.py"):
        for match in re.finditer(r"torch\.load\((.*)", path.read_text(encoding="utf-8")):  # one call per line
            calls.append((path.name, match.group(1)))
    assert calls, "no torch.load found: the check looks in the wrong place"
    assert all("weights_only=True" in args for _, args in calls), calls


def test_dependency_audit_fails_on_a_known_vulnerability_and_says_when_it_could_not_run():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ci_audit", ROOT / ".ci" / "audit.py")
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    vulnerable = {"dependencies": [
        {"name": "pillow", "version": "9.0.0", "vulns": [{"id": "PYSEC-2023-1", "fix_versions": ["10.0.1"]}]},
        {"name": "numpy", "version": "2.0.0", "vulns": []},
    ]}
    code, lines = audit.verdict(vulnerable)
    assert code == 1 and "pillow 9.0.0: PYSEC-2023-1 (fixed in 10.0.1)" in lines[0]
    code, lines = audit.verdict({"dependencies": [{"name": "numpy", "version": "2.0.0", "vulns": []}]})
    assert code == 0 and "1 runtime dependencies audited" in lines[0]
    offline = {"dependencies": [{"name": "numpy", "skip_reason": "Dependency not found on PyPI"}]}
    code, lines = audit.verdict(offline)
    assert code == 0 and "audit NOT done" in lines[0]
    assert "torch" in audit.runtime_closure() and "pytest" not in audit.runtime_closure()  # runtime only
