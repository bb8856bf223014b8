#!/usr/bin/env python3
"""Fuzz the selection rules' reader: any bytes as a rules file -> SelectionRules or a one-line RulesError.

``load_rules`` is what ``--rules FILE`` and ``ichscan rules check/show`` call. Beyond "no
other exception", the rules it returns must work: ``to_toml`` (what ``ichscan rules show
--rules FILE`` prints) reads back to the same rules, and checking a data set gives a reason
or ``None``. Run::

    python benchmarks/fuzz/rules.py CORPUS_DIR [SEED_DIR] -timeout=5 -rss_limit_mb=1024
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Finding, check_reason, scratch  # noqa: E402

with atheris.instrument_imports(include=["ichscan", "tomllib"]):
    from pydicom import Dataset

    from ichscan.rules import RulesError, SelectionRules, load_rules, parse_rules, to_toml

PATH = os.path.join(scratch("rules"), "rules.toml")
SAMPLE = Dataset()
SAMPLE.Modality, SAMPLE.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
SAMPLE.SeriesDescription, SAMPLE.BodyPartExamined = "HEAD 5mm", "HEAD"
SAMPLE.SliceThickness, SAMPLE.ImageOrientationPatient = "5", [1, 0, 0, 0, 1, 0]


def TestOneInput(data: bytes) -> None:
    with open(PATH, "wb") as fh:
        fh.write(data)
    try:
        rules = load_rules(PATH)
    except RulesError as exc:
        check_reason(str(exc), "RulesError", limit=100_000)
        return
    if not isinstance(rules, SelectionRules):
        raise Finding(f"load_rules returned {rules!r}")
    why = rules.failure(SAMPLE)
    if why is not None:
        check_reason(why, "rule failure", limit=100_000)
    shown = to_toml(rules)
    try:
        again = parse_rules(shown, "shown")
    except RulesError as exc:
        raise Finding(f"'rules show' printed a file that does not read back: {exc}") from None
    if again.rules != rules.rules:
        changed = [a for a, b in zip(rules.rules, again.rules) if a != b]
        raise Finding(f"'rules show' printed other rules than it read: {changed[:1]!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
