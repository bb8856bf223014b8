"""``ichscan rules``: check a selection rules file, explain what the rules decide, show the default."""

from __future__ import annotations

from pathlib import Path

import click

from ichscan.cli.options import CONTEXT_SETTINGS


class RulesFileError(click.ClickException):
    """A rules file that cannot be used: ``Error: <one line>``, exit status 2 (as a usage error)."""

    exit_code = 2


def _load(rules_file: Path | None):
    from ichscan.rules import DEFAULT_RULES, RulesError, load_rules

    if rules_file is None:
        return DEFAULT_RULES
    try:
        return load_rules(rules_file)
    except RulesError as exc:
        raise RulesFileError(str(exc)) from None


@click.group("rules", context_settings=CONTEXT_SETTINGS)
def rules_command() -> None:
    """Selection rules: which files the screening commands screen (--rules FILE).

    The built-in rules screen axial head CT; everything else gets a skipped row whose
    reason names the rule. A rules file (TOML) changes them: start from 'ichscan rules show'.
    """


@rules_command.command("check", context_settings=CONTEXT_SETTINGS)
@click.argument("rules_file", metavar="FILE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def check_command(rules_file: Path) -> None:
    """Validate a rules file: exit 0 and a one-line summary, or exit 2 and the error."""
    rules = _load(rules_file)
    click.echo(f"{rules_file}: valid: {rules.describe()}")


@rules_command.command("explain", context_settings=CONTEXT_SETTINGS)
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--rules", "rules_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Rules file.  [default: the built-in rules]")
def explain_command(paths: tuple[Path, ...], rules_file: Path | None) -> None:
    """For each file (folders are walked), the rule that decides: the first it fails, with
    the reason its row would give, or 'screened: passes all N rules'."""
    from ichscan.rules import explain

    for path, verdict in explain(paths, _load(rules_file)):
        click.echo(f"{path}: {verdict}")


@rules_command.command("show", context_settings=CONTEXT_SETTINGS)
@click.option("--rules", "rules_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Show this file's rules in full instead.  [default: the built-in rules]")
def show_command(rules_file: Path | None) -> None:
    """Print the built-in rules as a TOML file to copy and edit (every setting, with comments)."""
    from ichscan.rules import to_toml

    click.echo(to_toml(_load(rules_file)), nl=False)
