"""Command line: thin Click commands that parse options and call one library function.

``cli`` is the group: global options (--plugins-dir, -v/-q, --log-format, --version), logging, and the
commands of :mod:`~ichscan.cli.screening`, :mod:`~ichscan.cli.train` and
:mod:`~ichscan.cli.tools`, plus those plugins add with the ``ichscan_register_commands``
hook. ``main`` is the console script ``ichscan`` (and ``python -m ichscan``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from ichscan import __version__
from ichscan.cli.options import CONTEXT_SETTINGS, plugin_manager
from ichscan.cli.pull import pull_command
from ichscan.cli.rules import rules_command
from ichscan.cli.screening import batch_command, screen_command, serve_command, watch_command
from ichscan.cli.tools import plugins_command, predict, synth
from ichscan.cli.train import evaluate, train
from ichscan.logs import LOG_FORMATS, setup_logging

__all__ = ["cli", "main"]

log = logging.getLogger("ichscan")


class PluginCommandGroup(click.Group):
    """A group whose commands are the built-in ones plus those plugins register.

    Plugins from --plugins-dir are known only once the group's own options are parsed, so
    plugin commands cannot be added when the module is imported (as llm and datasette do):
    Click asks ``get_command`` and ``list_commands`` after parsing them, and these ask the
    invocation's plugin manager. A built-in command keeps its name, and running one does
    not load plugins (``synth`` does not need torch).
    """

    def plugin_commands(self, ctx: click.Context) -> dict[str, click.Command]:
        """The commands plugins add, collected once per invocation.

        Plugins add to a fresh group rather than to ``cli`` itself: ``cli`` lives as long
        as the process, and the commands of one invocation's --plugins-dir must not stay
        behind for the next (in-process runs, tests).
        """
        obj = ctx.find_root().ensure_object(dict)
        if "plugin_commands" not in obj:
            collected = click.Group(self.name)
            plugin_manager(ctx).hook.ichscan_register_commands(cli=collected)
            for name in collected.commands.keys() & self.commands.keys():
                log.warning("a plugin's command %r is ignored: a built-in command has that name", name)
            obj["plugin_commands"] = {name: cmd for name, cmd in collected.commands.items() if name not in self.commands}
        return obj["plugin_commands"]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or self.plugin_commands(ctx).get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.plugin_commands(ctx)})


@click.group(cls=PluginCommandGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="ichscan")
@click.option(
    "--plugins-dir",
    "plugins_dirs",
    multiple=True,
    # Eager, so that 'ichscan --plugins-dir DIR --help' lists DIR's commands: --help is
    # eager and Click processes eager options in the order given.
    is_eager=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Load every .py file in this folder as a plugin (repeatable).",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="-v: ichscan's debug messages too; -vv: also those of the libraries (pydicom, pynetdicom).",
)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    envvar="ICHSCAN_LOG_FORMAT",
    show_envvar=True,
    help="text: one line per event for people; json: one JSON object per line (timestamp, level, logger, message, "
    "and the study/series/SOP instance UIDs an event is about; never patient names) for log collectors.",
)
def cli(plugins_dirs: tuple[Path, ...], verbose: int, quiet: bool, log_format: str) -> None:
    """Screen head CT DICOM images for intracranial hemorrhage.

    Labels: epidural, intraparenchymal, intraventricular, subarachnoid, subdural, any.
    Not for diagnostic use.
    """
    # --plugins-dir is read from the context's params by options.plugin_manager.
    setup_logging(verbose, quiet, log_format)


for _command in (batch_command, watch_command, serve_command, pull_command, screen_command, train, evaluate, synth, predict, plugins_command, rules_command):
    cli.add_command(_command)


def main(args: list[str] | None = None) -> None:
    # Model threads sleep between operations instead of spinning: the decode workers
    # share the cores with them (measured faster in benchmarks/bench_batch.py). Must be
    # set before torch loads its OpenMP runtime, i.e. before any command imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli.main(args=args, prog_name="ichscan")


if __name__ == "__main__":  # pragma: no cover
    main()
