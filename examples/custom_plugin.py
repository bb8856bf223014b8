"""Screen a folder with a plugin registered in code: a reporter that counts positives
per subtype and prints them at the end.

    python examples/custom_plugin.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

import ichscan
from ichscan.pipeline import BatchOptions, run_batch
from ichscan.plugins import get_plugin_manager
from ichscan.reporting import Reporter
from ichscan.synth import generate


class SubtypeCounter(Reporter):
    name = "subtype-counter"

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def on_results(self, results, studies):
        for result in results:
            if result.status == "ok" and result.is_positive:
                self.counts[result.top_label] += 1

    def on_finish(self, summary, studies):
        print(f"screened {summary.files} files, {summary.positive} positive")
        for label, count in sorted(self.counts.items()):
            print(f"  top label {label}: {count}")


class CounterPlugin:
    def __init__(self) -> None:
        self.reporter = SubtypeCounter()

    @ichscan.hookimpl
    def ichscan_register_reporters(self, register, config):
        register(self.reporter)


def main(out_dir: str | None = None) -> Counter[str]:
    folder = Path(out_dir or tempfile.mkdtemp(prefix="ichscan-example-"))
    generate(folder / "dicom", studies=2, slices=4, seed=5)
    pm = get_plugin_manager()
    plugin = CounterPlugin()
    pm.register(plugin, name="subtype-counter")
    run_batch(BatchOptions(input_dir=folder / "dicom", out=folder / "results.csv", progress=False), pm)
    return plugin.reporter.counts


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
