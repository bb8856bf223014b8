"""Example plugin: also write every result as one JSON object per line.

Use it with:  ichscan --plugins-dir plugins/ batch DICOM_DIR --out results.csv
It writes results.jsonl beside --out (same stem). Copy it as a starting point
for your own reporter (a database, a message queue, a webhook...).
"""

from __future__ import annotations

import json

import ichscan
from ichscan.reporting import Reporter


class JsonLinesReporter(Reporter):
    name = "jsonl"

    def __init__(self, path):
        self.path = path
        self.fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in on_finish

    def on_results(self, results, studies):
        for r in results:
            record = {
                "path": r.path,
                "sop_instance_uid": r.sop_instance_uid,
                "study_instance_uid": r.study_instance_uid,
                "status": r.status,
                "error": r.error,
                "probabilities": r.probabilities,
                "top_label": r.top_label,
            }
            self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def on_finish(self, summary, studies):
        self.fh.close()


@ichscan.hookimpl
def ichscan_register_reporters(register, config):
    if config.out is not None:
        register(JsonLinesReporter(config.out.with_suffix(".jsonl")))
