"""Print the project's dependencies for an offline install, one per line.

    python benchmarks/offline_requirements.py [--set bench|all] [pyproject.toml]

Used by fetch_wheels.sh (what to download) and gpu.sh (what to install offline). torch and
torchvision are always left out: the GPU machines bring their own. ``--set bench`` (the
default) also leaves out what only training and evaluation import (pandas, scikit-learn,
matplotlib, with scipy among their dependencies): that keeps the wheels folder near 40 MB
instead of 110, under the 64 MiB that can travel to a GPU machine with the repository.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

PREINSTALLED = {"torch", "torchvision"}
TRAINING_ONLY = {"pandas", "scikit-learn", "matplotlib"}


def name_of(requirement: str) -> str:
    """The distribution name: what precedes any version, marker or extra."""
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()


def requirements(pyproject: Path, which: str = "bench") -> list[str]:
    with open(pyproject, "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    leave_out = PREINSTALLED | (TRAINING_ONLY if which == "bench" else set())
    return [dep for dep in deps if name_of(dep) not in leave_out]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=("bench", "all"), default="bench")
    parser.add_argument("pyproject", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.set)))
