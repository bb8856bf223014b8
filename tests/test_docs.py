"""The documentation stays true to the code: README set-up commands, links, hooks, options."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pluggy
import pytest
from click.testing import CliRunner

from ichscan import hookspecs

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# CI (.ci/run) and the quick start depend on these two lines, byte for byte.
INSTALL_AND_RUN = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/ichscan synth example-data "
    "--studies 4 --slices 12 --seed 1 && .venv/bin/ichscan batch example-data --out results.csv --html report.html"
)
INSTALL_AND_TEST = "python3 -m venv .venv && .venv/bin/pip install -e '.[test,ray]' && .venv/bin/python -m pytest"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return FENCE.findall(text)


def fenced_commands(text: str) -> list[str]:
    """Command lines of the shell blocks, in order: no comments, no blank lines."""
    commands = []
    for language, body in fenced_blocks(text):
        if language not in ("bash", "sh", "console", ""):
            continue
        commands += [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return commands


def hook_names() -> list[str]:
    tree = ast.parse(Path(hookspecs.__file__).read_text(encoding="utf-8"))
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("ichscan_")]


def test_readme_starts_with_the_setup_commands_and_stays_short():
    text = README.read_text(encoding="utf-8")
    assert fenced_commands(text)[:2] == [INSTALL_AND_RUN, INSTALL_AND_TEST]
    assert len(text.splitlines()) <= 130


def test_readme_warns_it_is_not_for_diagnosis():
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:12])
    assert "Not for diagnostic use" in head


def test_docs_linked_from_readme_exist():
    links = re.findall(r"\]\((docs/[^)#\s]+)", README.read_text(encoding="utf-8"))
    assert {Path(link).name for link in links} >= {
        "cli.md", "outputs.md", "conformance.md", "plugins.md", "internals.md", "benchmarks.md", "development.md",
    }
    for link in links:
        assert (ROOT / link).is_file(), f"README links to missing {link}"


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", ["README.md"] + sorted(f"docs/{p.name}" for p in DOCS.glob("*.md")))
def test_relative_links_resolve(page):
    source = ROOT / page
    text = FENCE.sub("", source.read_text(encoding="utf-8"))
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path = (source.parent / target) if target else source
        assert path.exists(), f"{page} links to missing {target}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page} links to missing anchor {target}#{anchor}"


def test_hookspecs_are_found():
    # Guards the test below against an empty list (a renamed module, a parse change).
    assert "ichscan_register_reporters" in hook_names()


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented(hook):
    text = (DOCS / "plugins.md").read_text(encoding="utf-8")
    assert f"### `{hook}`" in text, f"docs/plugins.md has no section for {hook}"
    examples = [body for language, body in fenced_blocks(text) if language == "python"]
    assert any(f"def {hook}(" in body for body in examples), f"docs/plugins.md has no example of {hook}"


def test_plugin_examples_match_the_hookspecs(tmp_path):
    """Each Python example in docs/plugins.md that implements a hook loads as a plugin;
    pluggy refuses an implementation whose arguments the specification lacks, and
    check_pending refuses a misspelt hook name."""
    text = (DOCS / "plugins.md").read_text(encoding="utf-8")
    examples = [body for language, body in fenced_blocks(text) if language == "python" and "@ichscan.hookimpl" in body]
    assert examples
    for number, body in enumerate(examples):
        path = tmp_path / f"doc_example_{number}.py"
        path.write_text(body, encoding="utf-8")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        pm = pluggy.PluginManager("ichscan")
        pm.add_hookspecs(hookspecs)
        pm.register(module, name=path.stem)
        pm.check_pending()
        assert pm.get_hookcallers(module), f"example {number} implements no hook"


def help_long_options(command: str) -> set[str]:
    """Long options in the option column of ``ichscan COMMAND --help``."""
    from ichscan.cli import cli  # a module today, a package tomorrow: both expose ``cli``

    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    options: set[str] = set()
    for line in result.output.splitlines():
        stripped = line.strip()
        if not stripped.startswith("-"):
            continue
        names = re.split(r"\s{2,}", stripped)[0]
        options.update(re.findall(r"--[a-z0-9][a-z0-9-]*", names))
    options.discard("--help")
    return options


def cli_section(command: str) -> str:
    """The part of docs/cli.md under ``## `ichscan COMMAND ...` `` up to the next section."""
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    match = re.search(rf"^## `ichscan {re.escape(command)}\b.*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"docs/cli.md has no section for ichscan {command}"
    return match.group(0)


@pytest.mark.parametrize("command", ["batch", "watch", "serve-scp", "pull"])
def test_every_option_is_in_the_cli_reference(command):
    options = help_long_options(command)
    assert "--out" in options, "the --help parsing found no options"
    section = cli_section(command)
    missing = sorted(o for o in options if not re.search(rf"`[^`]*{re.escape(o)}(?![a-z0-9-])", section))
    assert not missing, f"docs/cli.md, ichscan {command}: undocumented {missing}"
