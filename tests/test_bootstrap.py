"""scripts/bootstrap's modes (issue 14): `--runtime` installs the project without test extras
and runs pip only when pyproject.toml changed.  Run on a copy of the script with a recording
stand-in for .venv/bin/python, so nothing is installed."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from proxyenv import REPO


def tree(tmp: Path) -> Path:
    (tmp / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "bootstrap", tmp / "scripts" / "bootstrap")
    (tmp / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = tmp / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp / "calls"}\n')
    python.chmod(0o755)
    return tmp


def bootstrap(root: Path, *args: str) -> list[str]:
    calls = root / "calls"
    calls.unlink(missing_ok=True)
    subprocess.run(["bash", str(root / "scripts" / "bootstrap"), *args], check=True, timeout=60)
    return calls.read_text().splitlines() if calls.exists() else []


def test_runtime_installs_no_test_extras_and_only_when_pyproject_changes(tmp_path):
    root = tree(tmp_path)
    calls = bootstrap(root, "--runtime")
    assert "-m pip install -q -e ." in calls, calls
    assert not any("[test]" in c for c in calls), calls
    assert bootstrap(root, "--runtime") == []            # nothing changed: pip is not run
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert "-m pip install -q -e ." in bootstrap(root, "--runtime")


def test_a_test_install_serves_the_runtime_but_not_the_reverse(tmp_path):
    root = tree(tmp_path)
    bootstrap(root, "--runtime")
    # The full mode also wants Debian packages; on this machine they are installed already
    # (the suite needs them), so only pip is left to run: with the test extras.
    assert "-m pip install -q -e .[test]" in bootstrap(root)
    assert bootstrap(root) == []
    assert bootstrap(root, "--runtime") == []
