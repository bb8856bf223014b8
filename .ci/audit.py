"""Dependency audit for CI (see SECURITY.md): pip-audit over the runtime dependencies.

Fails (exit 1) on a known vulnerability in a package ichscan needs at run time, unless its
id is listed in .ci/audit-ignore.txt (one id a line, with the reason after a '#': a fix our
constraints do not allow, written up in SECURITY.md). When pip-audit cannot reach a
vulnerability service (a network that serves package files but not PyPI's JSON API or
OSV), it says which packages it could not audit and exits 0: an audit that could not run
is reported, never counted as a pass in silence.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent


def runtime_closure(root: str = "ichscan") -> dict[str, str]:
    """Every installed distribution ichscan needs at run time (no extras), with its version."""
    seen: dict[str, str] = {}
    todo = [root]
    while todo:
        name = re.split(r"[\s;<>=!~\[(]", todo.pop(), maxsplit=1)[0].strip()
        key = name.lower().replace("_", "-")
        if not key or key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist.version
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(requirement)
    seen.pop(root, None)
    return seen


def main() -> int:
    ignored = {line.split("#")[0].strip() for line in (HERE / "audit-ignore.txt").read_text().splitlines() if line.split("#")[0].strip()}
    packages = runtime_closure()
    requirements = HERE / "audit-requirements.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in sorted(packages.items())))
    try:
        command = [sys.executable, "-m", "pip_audit", "-r", str(requirements), "--no-deps", "--disable-pip", "-f", "json", "--progress-spinner", "off"]
        for vuln in sorted(ignored):
            command += ["--ignore-vuln", vuln]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    finally:
        requirements.unlink(missing_ok=True)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(f"pip-audit: no report ({done.stderr.strip().splitlines()[-1:] or ['no output']})")
        return 1
    code, lines = verdict(report)
    print("\n".join(lines))
    return code


def verdict(report: dict) -> tuple[int, list[str]]:
    """Exit code and lines to print for a pip-audit JSON report."""
    found = [(d["name"], d.get("version", "?"), v) for d in report["dependencies"] for v in d.get("vulns", [])]
    skipped = [d["name"] for d in report["dependencies"] if d.get("skip_reason")]
    lines = []
    for name, version, vuln in found:
        fixes = ", ".join(vuln.get("fix_versions", [])) or "none yet"
        lines.append(f"pip-audit: {name} {version}: {vuln['id']} (fixed in {fixes})")
    if found:
        lines.append(f"pip-audit: {len(found)} known vulnerabilities in runtime dependencies; fix or list them in .ci/audit-ignore.txt with the reason")
        return 1, lines
    if skipped and len(skipped) == len(report["dependencies"]):
        return 0, [f"pip-audit: no vulnerability data reachable from this machine: none of the {len(skipped)} runtime dependencies could be audited (audit NOT done)"]
    audited = len(report["dependencies"]) - len(skipped)
    tail = f"; {len(skipped)} could not be audited: {', '.join(skipped)}" if skipped else ""
    return 0, [f"pip-audit: {audited} runtime dependencies audited, no known vulnerabilities{tail}"]

if __name__ == "__main__":
    sys.exit(main())
