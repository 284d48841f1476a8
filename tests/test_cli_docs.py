"""--version, help for every option, the man page and shell completion from the parser (issue 14)."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess

import pytest

from proxy import __version__
from proxy.cli import build_parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out == f"xmpp-dane-proxy {__version__}\n"


def test_every_command_and_option_has_help():
    parser = build_parser()
    missing = [str(a.option_strings) for a in options(parser) if not a.help]
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helped = {c.dest for c in action._choices_actions if c.help}
    for name, sub in subparsers(parser).items():
        if name not in helped:
            missing.append(name)
        missing += [f"{name} {a.option_strings or a.dest}" for a in options(sub) if not a.help]
    assert missing == [], f"commands/options without help text: {missing}"


def test_manpage_names_every_command_and_option(cli):
    code, page, err = cli("manpage")
    assert code == 0, err
    assert page.startswith(".TH XMPP\\-DANE\\-PROXY \"1\"") or page.startswith('.TH XMPP-DANE-PROXY "1"'), page[:80]
    text = re.sub(r"\\f[BIRP]|\\[,/]", "", page).replace("\\-", "-")   # roff fonts and hyphens
    assert f"xmpp-dane-proxy {__version__}" in text
    for name, sub in subparsers(build_parser()).items():
        assert f"xmpp-dane-proxy {name}" in text, name
        for action in options(sub):
            for opt in action.option_strings:
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), f"{name} {opt} not in the man page"
    if shutil.which("groff"):
        rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=page, capture_output=True, text=True)
        assert rendered.returncode == 0 and "check-config" in rendered.stdout, rendered.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "tcsh"])
def test_completion_scripts(cli, shell):
    code, script, err = cli("completion", shell)
    assert code == 0, err
    for command in subparsers(build_parser()):
        assert command in script, (shell, command)
    if shell != "tcsh":     # shtab's tcsh script completes commands only
        assert "--nameserver" in script and "--chain" in script
    if shell in ("bash", "zsh") and shutil.which(shell):
        syntax = subprocess.run([shell, "-n"], input=script, capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr


def test_completion_needs_a_known_shell(cli):
    code, _, err = cli("completion", "fish")
    assert code == 2 and "invalid choice" in err
